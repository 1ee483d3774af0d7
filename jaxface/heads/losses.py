"""Per-sample margin losses for the class-sharded head: AdaFace, CurricularFace, MagFace,
ElasticFace (Arc, Cos and their "+" variants).

Each differs from the combined margin (`jaxface.heads.margins`) in that the target's margin,
or the treatment of the negatives, depends on quantities of the whole row: the embedding's
norm before normalisation (AdaFace, MagFace), the target cosine (CurricularFace's hard
negatives, ElasticFace+'s margin order), a running statistic kept in the train state
(AdaFace's norm mean and std, CurricularFace's t) or a random draw per sample (ElasticFace).

Inside `partial_fc_loss`'s shard_map every device holds the whole global batch's embeddings
(all-gathered, so their norms are the global batch's on every device) and the cosines
against its own block of classes. A loss works in two stages:

1. `rows(ctx)`: per-row quantities of the global batch, computed identically (replicated)
   on every device: the margins, the new running state, a regulariser. `ctx.target_cos`
   is the target cosine of every row, the owner's value summed over the class shards
   (a psum; without gradient: the official code uses it only under no_grad or as a mask).
2. `logits(cos, is_target, rows)`: this device's block of logits [B, classes]. Nothing
   per class leaves the device that owns the class.

Gradient modes (the `margin_grad` key), as for the combined margin: `exact` differentiates
the margin formula as the official code's autograd does; `straight_through` makes the
target logit's derivative with respect to its cosine 1 (times the scale), arcface_torch's
convention. Only the dependence on the cosine is cut: MagFace's margin still passes its
gradient to the feature norm in both modes. Files followed and every difference:
docs/losses.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxface.config import LOSSES, NORM_LOSSES  # noqa: F401 - the names, listed once
from jaxface.heads.margins import exact_at


class RowContext(NamedTuple):
    """What a loss may read about the global batch (every array [B], replicated)."""

    norms: jax.Array  # the embeddings' L2 norms before normalisation (with gradient)
    target_cos: jax.Array | None  # each row's target cosine (no gradient), if asked for
    state: Any  # the loss's running state (a dict of float32 scalars)
    key: jax.Array | None  # this step's key (typed), for losses that draw


def _offset(cos, value, grad: str):
    """`value` (a function of cos), with d/dcos = 1 under straight_through."""
    if grad == "exact":
        return value
    return cos + jax.lax.stop_gradient(value - cos)


def _arc(cos, m, grad: str):
    """cos(arccos(cos) + m); exact gradients are taken within 1e-6 of +-1 (`exact_at`)."""
    if grad == "exact":
        return exact_at(lambda c: jnp.cos(jnp.arccos(c) + m), cos)
    c = jax.lax.stop_gradient(cos)
    return cos + jax.lax.stop_gradient(jnp.cos(jnp.arccos(c) + m) - c)


@dataclass(frozen=True)
class PerSampleLoss:
    """Base: scale, gradient mode, and what the head must compute for it."""

    scale: float = 64.0
    grad: str = "straight_through"
    needs_target_cos = False
    needs_key = False

    def init_state(self) -> dict:
        return {}

    def rows(self, ctx: RowContext) -> tuple[dict, dict, jax.Array]:
        """(per-row quantities, new state, regulariser added to the loss)."""
        return {}, ctx.state, jnp.zeros((), jnp.float32)

    def logits(self, cos, is_target, rows: dict) -> jax.Array:
        raise NotImplementedError


@dataclass(frozen=True)
class AdaFace(PerSampleLoss):
    """mk-minchul/AdaFace head.py: margin scaler z = clip(h (|x| - mean) / (std + eps), -1, 1)
    from the norm's running mean and std; target logit cos(theta - m z) - (m + m z)."""

    m: float = 0.4
    h: float = 0.333
    t_alpha: float = 0.01
    eps: float = 1e-3

    def init_state(self) -> dict:
        # head.py's buffers: batch_mean 20, batch_std 100.
        return {"norm_mean": jnp.float32(20.0), "norm_std": jnp.float32(100.0)}

    def rows(self, ctx):
        norms = jax.lax.stop_gradient(jnp.clip(ctx.norms, 0.001, 100.0))
        n = norms.shape[0]
        mean = jnp.mean(norms)
        std = jnp.sqrt(jnp.sum(jnp.square(norms - mean)) / max(n - 1, 1))  # unbiased, as torch
        a = self.t_alpha
        state = {
            "norm_mean": mean * a + (1 - a) * ctx.state["norm_mean"],
            "norm_std": std * a + (1 - a) * ctx.state["norm_std"],
        }
        # The statistics are updated first and then used, as head.py.
        z = (norms - state["norm_mean"]) / (state["norm_std"] + self.eps) * self.h
        z = jnp.clip(z, -1.0, 1.0)
        return {"angular": -self.m * z, "additive": self.m + self.m * z}, state, jnp.zeros(())

    def logits(self, cos, is_target, rows):
        e = self.eps
        cos = jnp.clip(cos, -1 + e, 1 - e)  # every entry, as head.py
        g_ang, g_add = rows["angular"][:, None], rows["additive"][:, None]
        c = cos if self.grad == "exact" else jax.lax.stop_gradient(cos)
        target = jnp.cos(jnp.clip(jnp.arccos(c) + g_ang, e, math.pi - e)) - g_add
        target = target if self.grad == "exact" else cos + jax.lax.stop_gradient(target - c)
        return jnp.where(is_target, target, cos) * self.scale


@dataclass(frozen=True)
class CurricularFace(PerSampleLoss):
    """HuangYG123/CurricularFace head/metrics.py: ArcFace target with its fallback below
    cos(pi - m); every negative above the target's cos(theta + m) becomes cos (t + cos),
    t the running mean (momentum 0.01) of the target cosine."""

    m: float = 0.5
    needs_target_cos = True

    def init_state(self) -> dict:
        return {"t": jnp.float32(0.0)}

    def _margined(self, cos):
        """cos(theta + m) written as the official code writes it, and its fallback."""
        sin = jnp.sqrt(1.0 - jnp.square(cos))
        cos_m = cos * math.cos(self.m) - sin * math.sin(self.m)
        threshold, mm = math.cos(math.pi - self.m), math.sin(math.pi - self.m) * self.m
        return cos_m, jnp.where(cos > threshold, cos_m, cos - mm)

    def rows(self, ctx):
        tc = ctx.target_cos
        t = jnp.mean(tc) * 0.01 + 0.99 * ctx.state["t"]  # updated, then used
        return {"t": t, "target_m": self._margined(tc)[0]}, {"t": t}, jnp.zeros(())

    def logits(self, cos, is_target, rows):
        hard = cos > rows["target_m"][:, None]
        negatives = jnp.where(hard, cos * (rows["t"] + cos), cos)
        if self.grad == "exact":
            target = exact_at(lambda c: self._margined(c)[1], cos)
        else:
            target = _offset(cos, self._margined(jax.lax.stop_gradient(cos))[1], self.grad)
        return jnp.where(is_target, target, negatives) * self.scale


@dataclass(frozen=True)
class MagFace(PerSampleLoss):
    """IrvingMeng/MagFace models/magface.py: a = clip(|x|, l_a, u_a), margin linear in a from
    l_m to u_m, easy margin (cos(theta + m) where cos > 0), plus lambda_g * mean(a / u_a^2 +
    1 / a). The margin's gradient reaches the norm (MagFace's point) in both modes."""

    l_a: float = 10.0
    u_a: float = 110.0
    l_m: float = 0.45
    u_m: float = 0.8
    lambda_g: float = 35.0

    def rows(self, ctx):
        a = jnp.clip(ctx.norms, self.l_a, self.u_a)
        margin = (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m
        g = jnp.mean(a / self.u_a**2 + 1.0 / a)
        return {"margin": margin}, ctx.state, self.lambda_g * g

    def logits(self, cos, is_target, rows):
        m = rows["margin"][:, None]

        def margined(c):
            sin = jnp.sqrt(1.0 - jnp.square(c))
            return jnp.where(c > 0, c * jnp.cos(m) - sin * jnp.sin(m), c)

        if self.grad == "exact":
            target = exact_at(margined, cos)
        else:  # the cosine's gradient cut, the margin's (the norm's) kept
            c = jax.lax.stop_gradient(cos)
            target = cos - c + margined(c)
        return jnp.where(is_target, target, cos) * self.scale


@dataclass(frozen=True)
class ElasticFace(PerSampleLoss):
    """fdbtrs/ElasticFace utils/losses.py: a margin per sample drawn from N(m, std);
    ElasticArcFace cos(theta + m_i), ElasticCosFace cos - m_i. `plus`: the drawn margins
    sorted ascending and handed out by the descending order of the target cosines, as the
    official code does (row i gets sorted[argsort(-cos_target)[i]])."""

    kind: str = "arc"  # arc | cos
    m: float = 0.5
    std: float = 0.05
    plus: bool = False
    needs_key = True

    @property
    def needs_target_cos(self):  # type: ignore[override]
        return self.plus

    def draw(self, key, n: int) -> jax.Array:
        """The step's margins [n] (before the "+" reordering)."""
        return self.m + self.std * jax.random.normal(key, (n,), jnp.float32)

    def rows(self, ctx):
        margin = self.draw(ctx.key, ctx.norms.shape[0])
        if self.plus:
            order = jnp.argsort(-ctx.target_cos)
            margin = jnp.sort(margin)[order]
        return {"margin": margin}, ctx.state, jnp.zeros(())

    def logits(self, cos, is_target, rows):
        m = rows["margin"][:, None]
        target = _arc(cos, m, self.grad) if self.kind == "arc" else cos - m
        return jnp.where(is_target, target, cos) * self.scale


def loss_from_config(cfg):
    """The head's loss for `cfg`: the combined Margin (loss=margin) or a PerSampleLoss."""
    from jaxface.heads.margins import margin_from_config

    name, common = cfg.loss, dict(scale=cfg.scale, grad=cfg.margin_grad)
    if name == "margin":
        return margin_from_config(cfg)
    if name == "adaface":
        return AdaFace(m=cfg.adaface_m, h=cfg.adaface_h, t_alpha=cfg.adaface_t_alpha, **common)
    if name == "curricularface":
        return CurricularFace(m=cfg.curricular_m, **common)
    if name == "magface":
        return MagFace(
            l_a=cfg.magface_l_a,
            u_a=cfg.magface_u_a,
            l_m=cfg.magface_l_m,
            u_m=cfg.magface_u_m,
            lambda_g=cfg.magface_lambda_g,
            **common,
        )
    if name in ("elasticface_arc", "elasticface_cos"):
        return ElasticFace(
            kind=name.rsplit("_", 1)[1],
            m=cfg.elastic_m,
            std=cfg.elastic_std,
            plus=cfg.elastic_plus,
            **common,
        )
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
