"""arcface_torch's CombinedMarginLoss: margins on the target cosine, straight-through."""

from __future__ import annotations

import math

import torch


class CombinedMarginLoss(torch.nn.Module):
    """Cosines [B, num_local] and labels [B] (-1: target not in this shard) to scaled logits.

    As arcface_torch: ArcFace (m1 = 1, m3 = 0) rewrites the target cosine to cos(theta + m2)
    under no_grad, so the gradient w.r.t. every cosine is just `s` (straight-through); CosFace
    (m3 > 0) subtracts m3. arcface_torch silently ignores m1 and m2 when m3 > 0 and has no
    SphereFace; torchref refuses those combinations instead of training something else.
    """

    def __init__(
        self, s: float, m1: float, m2: float, m3: float, interclass_filtering_threshold: float = 0
    ):
        super().__init__()
        if m1 != 1.0 or (m3 > 0 and m2 != 0):
            raise ValueError(
                f"margin_list=({m1}, {m2}, {m3}): arcface_torch implements only ArcFace "
                "(1, m2, 0) and CosFace (1, 0, m3); use jaxface for other combinations"
            )
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.interclass_filtering_threshold = interclass_filtering_threshold

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        index_positive = torch.where(labels != -1)[0]
        target_cols = labels[index_positive]

        if self.interclass_filtering_threshold > 0:
            with torch.no_grad():
                dirty = (logits > self.interclass_filtering_threshold).float()
                # The target entry is never dirty; rows whose target lives in another shard
                # have every entry above the threshold zeroed.
                dirty[index_positive, target_cols] = 0
            logits = (1 - dirty) * logits

        if self.m3 == 0.0:
            with torch.no_grad():
                # In place, outside autograd: the backward pass sees the unmodified cosine.
                target = logits[index_positive, target_cols].arccos()
                logits.arccos_()
                logits[index_positive, target_cols] = target + self.m2
                logits.cos_()
            return logits * self.s
        target = logits[index_positive, target_cols] - self.m3
        logits = logits.clone()
        logits[index_positive, target_cols] = target
        return logits * self.s


# --- Per-sample losses, as their official code states them (docs/losses.md lists the files
# followed and every difference). Each takes the clamped cosines [B, num_local] of this
# rank, labels (-1: the target lives on another rank), the global batch's embedding norms
# [B] (with gradient) and target cosines [B] (summed over ranks, no gradient), and returns
# (scaled logits, regulariser). `straight_through` applies the margin's change of the target
# value as a constant offset (arcface_torch's convention); otherwise autograd differentiates
# the official formula.


def _owned(labels: torch.Tensor):
    index = torch.where(labels != -1)[0]
    return index, labels[index]


def _offset(cos: torch.Tensor, value: torch.Tensor, straight_through: bool) -> torch.Tensor:
    return cos + (value - cos).detach() if straight_through else value


class AdaFaceLoss(torch.nn.Module):
    """mk-minchul/AdaFace head.py, AdaFace.forward from the cosine on."""

    needs_target_cos = False

    def __init__(self, s=64.0, m=0.4, h=0.333, t_alpha=0.01, straight_through=False):
        super().__init__()
        self.s, self.m, self.h, self.t_alpha, self.eps = s, m, h, t_alpha, 1e-3
        self.straight_through = straight_through
        self.register_buffer("batch_mean", torch.ones(1) * 20)
        self.register_buffer("batch_std", torch.ones(1) * 100)

    def forward(self, cosine, labels, norms, target_cos):
        cosine = cosine.clamp(-1 + self.eps, 1 - self.eps)
        safe_norms = torch.clip(norms, min=0.001, max=100).clone().detach()
        with torch.no_grad():
            mean, std = safe_norms.mean(), safe_norms.std()
            self.batch_mean = mean * self.t_alpha + (1 - self.t_alpha) * self.batch_mean
            self.batch_std = std * self.t_alpha + (1 - self.t_alpha) * self.batch_std
        scaler = (safe_norms - self.batch_mean) / (self.batch_std + self.eps) * self.h
        scaler = torch.clip(scaler, -1, 1)
        index, cols = _owned(labels)
        m_arc = torch.zeros_like(cosine)
        m_arc[index, cols] = (self.m * scaler * -1)[index].to(cosine.dtype)
        theta_m = torch.clip(cosine.acos() + m_arc, min=self.eps, max=math.pi - self.eps)
        m_cos = torch.zeros_like(cosine)
        m_cos[index, cols] = (self.m + self.m * scaler)[index].to(cosine.dtype)
        out = _offset(cosine, theta_m.cos() - m_cos, self.straight_through)
        return out * self.s, cosine.new_zeros(())


class CurricularFaceLoss(torch.nn.Module):
    """HuangYG123/CurricularFace head/metrics.py, CurricularFace.forward from the cosine on;
    the hard-negative mask and t from the global target cosines."""

    needs_target_cos = True

    def __init__(self, s=64.0, m=0.5, straight_through=False):
        super().__init__()
        self.s, self.m, self.straight_through = s, m, straight_through
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        self.threshold, self.mm = math.cos(math.pi - m), math.sin(math.pi - m) * m
        self.register_buffer("t", torch.zeros(1))

    def _margined(self, target_logit):
        sin_theta = torch.sqrt(1.0 - torch.pow(target_logit, 2))
        return target_logit * self.cos_m - sin_theta * self.sin_m

    def forward(self, cos_theta, labels, norms, target_cos):
        with torch.no_grad():
            cos_theta_m_all = self._margined(target_cos)[:, None]  # every row's, for the mask
            self.t = target_cos.mean() * 0.01 + (1 - 0.01) * self.t
        index, cols = _owned(labels)
        target_logit = cos_theta[index, cols]
        cos_theta_m = self._margined(target_logit)
        final = torch.where(target_logit > self.threshold, cos_theta_m, target_logit - self.mm)
        final = _offset(target_logit, final, self.straight_through)
        mask = cos_theta > cos_theta_m_all
        out = cos_theta.clone()
        hard_example = out[mask]
        out[mask] = hard_example * (self.t + hard_example)
        out[index, cols] = final
        return out * self.s, cos_theta.new_zeros(())


class MagFaceLoss(torch.nn.Module):
    """IrvingMeng/MagFace models/magface.py: MagLinear (easy margin) + MagLoss, with
    lambda_g * loss_g added as its trainer does."""

    needs_target_cos = False

    def __init__(self, s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0,
                 straight_through=False):  # fmt: skip
        super().__init__()
        self.s, self.l_a, self.u_a, self.l_m, self.u_m = s, l_a, u_a, l_m, u_m
        self.lambda_g, self.straight_through = lambda_g, straight_through

    def forward(self, cos_theta, labels, norms, target_cos):
        x_norm = norms[:, None].clamp(self.l_a, self.u_a)
        ada_margin = (self.u_m - self.l_m) / (self.u_a - self.l_a) * (x_norm - self.l_a) + self.l_m
        cos_m, sin_m = torch.cos(ada_margin), torch.sin(ada_margin)
        c = cos_theta.detach() if self.straight_through else cos_theta
        sin_theta = torch.sqrt(1.0 - torch.pow(c, 2))
        cos_theta_m = torch.where(c > 0, c * cos_m - sin_theta * sin_m, c)
        if self.straight_through:  # the cosine's gradient cut, the margin's (the norm's) kept
            cos_theta_m = cos_theta - c + cos_theta_m
        one_hot = torch.zeros_like(cos_theta)
        index, cols = _owned(labels)
        one_hot[index, cols] = 1.0
        out = one_hot * cos_theta_m + (1.0 - one_hot) * cos_theta
        loss_g = torch.mean(1 / (self.u_a**2) * x_norm + 1 / x_norm)
        return out * self.s, self.lambda_g * loss_g


class ElasticFaceLoss(torch.nn.Module):
    """fdbtrs/ElasticFace utils/losses.py: ElasticArcFace / ElasticCosFace, `plus` as its
    code defines it. Margins come from `draw(n)`: torch.normal(m, std) from a generator
    seeded alike on every rank (each rank needs every row's margin); tests may replace it."""

    def __init__(self, kind="arc", s=64.0, m=0.5, std=0.05, plus=False, seed=0,
                 straight_through=False):  # fmt: skip
        super().__init__()
        self.kind, self.s, self.m, self.std, self.plus = kind, s, m, std, plus
        self.straight_through = straight_through
        self.generator = torch.Generator().manual_seed(seed)
        self.needs_target_cos = plus

    def draw(self, n: int) -> torch.Tensor:
        return torch.normal(self.m, self.std, (n,), generator=self.generator)

    def forward(self, cos_theta, labels, norms, target_cos):
        margin = self.draw(cos_theta.size(0)).to(cos_theta)
        if self.plus:
            with torch.no_grad():
                _, order = torch.sort(target_cos, dim=0, descending=True)
                margin, _ = torch.sort(margin, dim=0)
            margin = margin[order]
        index, cols = _owned(labels)
        m_hot = torch.zeros_like(cos_theta)
        m_hot[index, cols] = margin[index]
        out = (cos_theta.acos() + m_hot).cos() if self.kind == "arc" else cos_theta - m_hot
        out = _offset(cos_theta, out, self.straight_through)
        return out * self.s, cos_theta.new_zeros(())


def make_loss(cfg) -> torch.nn.Module:
    """The head's loss module for `cfg` (config key `loss`)."""
    st = cfg.margin_grad == "straight_through"
    if cfg.loss == "margin":
        m1, m2, m3 = cfg.margin_list
        return CombinedMarginLoss(cfg.scale, m1, m2, m3, cfg.interclass_filtering_threshold)
    if cfg.loss == "adaface":
        return AdaFaceLoss(cfg.scale, cfg.adaface_m, cfg.adaface_h, cfg.adaface_t_alpha, st)
    if cfg.loss == "curricularface":
        return CurricularFaceLoss(cfg.scale, cfg.curricular_m, st)
    if cfg.loss == "magface":
        return MagFaceLoss(cfg.scale, cfg.magface_l_a, cfg.magface_u_a, cfg.magface_l_m,
                           cfg.magface_u_m, cfg.magface_lambda_g, st)  # fmt: skip
    if cfg.loss in ("elasticface_arc", "elasticface_cos"):
        return ElasticFaceLoss(cfg.loss.rsplit("_", 1)[1], cfg.scale, cfg.elastic_m,
                               cfg.elastic_std, cfg.elastic_plus, cfg.seed, st)  # fmt: skip
    raise ValueError(f"unknown loss {cfg.loss!r}")
