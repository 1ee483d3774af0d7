"""Combined margin: target logit cos(m1*theta + m2) - m3, all logits times s.

(1, 0.5, 0) is ArcFace, (1, 0, 0.4) CosFace, (1.35, 0, 0) SphereFace's multiplicative
margin in the combined form of the InsightFace paper; any mix works. arcface_torch accepts
only m1 == 1 and, when m3 > 0, silently drops m2: here every combination means the formula.

Gradient modes:
- `straight_through` (the default): the margin moves the target logit's value, but its
  gradient is taken as if the margin were a constant offset: d logit / d cos = s. This is what
  arcface_torch computes (it applies the margin under no_grad), so every released
  InsightFace model was trained this way, and it stays finite at cos -> +-1.
- `exact`: the true derivative of cos(m1*arccos(c) + m2), s * sin(m1*theta + m2) * m1 /
  sin(theta), which grows without bound as theta -> 0. The value is the formula's at the
  true cosine; only the derivative is taken within 1e-6 of +-1 (`exact_at`), where it is finite.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

_EXACT_EPS = 1e-6


def exact_at(f, cos: jnp.ndarray) -> jnp.ndarray:
    """f(cos) with the derivative f'(clip(cos, -1 + 1e-6, 1 - 1e-6)) (times 1).

    Clipping the input itself would change the value near |cos| = 1 (by up to 0.044 for
    ArcFace's m = 0.5 at cos = 1); arccos's derivative is infinite there, so only the point
    where the derivative is taken moves."""
    inside = cos + jax.lax.stop_gradient(jnp.clip(cos, -1.0 + _EXACT_EPS, 1.0 - _EXACT_EPS) - cos)
    at_inside = f(inside)
    # Every gradient, the cosine's and that of what f closes over (MagFace's margin, a
    # function of the norm), flows through f(inside) once; the rest only moves the value.
    return at_inside + jax.lax.stop_gradient(f(jax.lax.stop_gradient(cos)) - at_inside)


@dataclass(frozen=True)
class Margin:
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    scale: float = 64.0
    filter_threshold: float = 0.0  # > 0: negative cosines above it are zeroed
    grad: str = "straight_through"

    def __post_init__(self):
        if self.grad not in ("straight_through", "exact"):
            raise ValueError(f"margin grad mode must be straight_through or exact: {self.grad!r}")

    def _angular(self, cos: jnp.ndarray) -> jnp.ndarray:
        if self.m1 == 1.0 and self.m2 == 0.0:
            return cos
        theta = jnp.arccos(cos)
        return jnp.cos(self.m1 * theta + self.m2)

    def target_logit(self, cos: jnp.ndarray) -> jnp.ndarray:
        """The margin-adjusted cosine of the target class (not yet scaled)."""
        if self.grad == "exact":
            return exact_at(self._angular, cos) - self.m3
        shifted = self._angular(jax.lax.stop_gradient(cos)) - self.m3
        return cos + jax.lax.stop_gradient(shifted - cos)

    def logits(self, cos: jnp.ndarray, is_target: jnp.ndarray) -> jnp.ndarray:
        """Scaled logits from cosines [..., classes] and a boolean mask of target entries."""
        if self.filter_threshold > 0:
            # Likely mislabelled: a negative class closer than the threshold. Its cosine is
            # zeroed (no gradient), as arcface_torch's interclass filtering.
            dirty = (cos > self.filter_threshold) & ~is_target
            cos = jnp.where(dirty, 0.0, cos)
        # The margin on each row's target cosine ([B, 1]; the sum has one non-zero term, so
        # it is exact), not on every entry: with arccos and cos over the whole [B, C] matrix
        # XLA wrote the adjusted logits as a buffer of their own.
        target_cos = jnp.where(is_target, cos, 0.0).sum(axis=-1, keepdims=True)
        adjusted = jnp.where(is_target, self.target_logit(target_cos), cos)
        return adjusted * self.scale


def margin_from_config(cfg) -> Margin:
    m1, m2, m3 = cfg.margin_list
    return Margin(
        m1=m1,
        m2=m2,
        m3=m3,
        scale=cfg.scale,
        filter_threshold=cfg.interclass_filtering_threshold,
        grad=cfg.margin_grad,
    )
