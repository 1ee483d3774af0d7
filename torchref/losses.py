"""arcface_torch's CombinedMarginLoss: margins on the target cosine, straight-through."""

from __future__ import annotations

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
