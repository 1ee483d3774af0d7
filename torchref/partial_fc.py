"""arcface_torch's PartialFC_V2: class centres split unevenly over ranks, softmax across ranks.

Rank r of W owns C // W classes, plus one if r < C % W, as a contiguous block in rank order.
Without an initialised process group everything runs as one rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.functional import linear, normalize

from jaxface.head_shards import split_sizes
from torchref.losses import CombinedMarginLoss


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when no process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def class_split(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """(class_start, num_local) of `rank` in arcface_torch's uneven split."""
    sizes = split_sizes(num_classes, world_size)
    return sum(sizes[:rank]), sizes[rank]


class _AllGather(torch.autograd.Function):
    """[B, E] per rank -> [W*B, E]; backward sums each rank's rows back to their owner."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        _, world_size = world()
        if world_size == 1:
            return tensor.clone()
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor.contiguous())  # [B, E] -> W x [B, E]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        rank, world_size = world()
        if world_size == 1:
            return grad
        grad = grad.contiguous()
        dist.all_reduce(grad)  # [W*B, E] summed over ranks; each keeps its own rows
        own = grad.chunk(world_size)[rank]
        # arcface_torch multiplies by W: DDP then averages the backbone gradients over the W
        # ranks, which leaves the gradient of the mean loss over the global batch.
        return own * world_size


class _DistCrossEntropy(torch.autograd.Function):
    """Softmax cross-entropy over classes split across ranks; loss = -mean(log max(p, 1e-30))."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _, world_size = world()
        batch = logits.size(0)
        max_logits = logits.max(dim=1, keepdim=True)[0]
        if world_size > 1:
            dist.all_reduce(max_logits, dist.ReduceOp.MAX)  # [B, 1] global row max
        probs = (logits - max_logits).exp()
        sum_exp = probs.sum(dim=1, keepdim=True)
        if world_size > 1:
            dist.all_reduce(sum_exp)  # [B, 1] global sum of exponentials
        probs = probs / sum_exp
        index = torch.where(labels != -1)[0]
        target = torch.zeros(batch, 1, device=logits.device)
        target[index] = probs[index].gather(1, labels[index, None])
        if world_size > 1:
            dist.all_reduce(target)  # [B, 1]: only the owning rank contributes
        ctx.save_for_backward(index, probs, labels)
        return target.clamp_min(1e-30).log().mean() * -1

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        index, probs, labels = ctx.saved_tensors
        g = probs.clone()
        g[index, labels[index]] -= 1
        return g * (grad / probs.size(0)), None


class PartialFC(torch.nn.Module):
    """The class-sharded margin softmax head. `weight` [num_local, E] is this rank's block."""

    def __init__(
        self,
        margin_loss: torch.nn.Module,  # CombinedMarginLoss or a per-sample loss
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
    ):
        super().__init__()
        self.rank, self.world_size = world()
        self.margin_softmax = margin_loss
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.sample_rate = sample_rate
        self.class_start, self.num_local = class_split(num_classes, self.world_size, self.rank)
        self.num_sample = int(sample_rate * self.num_local)
        self.weight = torch.nn.Parameter(torch.normal(0, 0.01, (self.num_local, embedding_size)))
        # () -> sorted class indices to score this step, in place of the random draw:
        # compare.converge hands torchref jaxface's draws so that sampled runs coincide.
        self.draw = None

    def _sample(self, labels: torch.Tensor, positive_rows: torch.Tensor) -> torch.Tensor:
        """Keep every positive class plus random negatives; relabel into the kept index."""
        with torch.no_grad():
            positive = torch.unique(labels[positive_rows], sorted=True)
            if self.draw is not None:
                index = torch.as_tensor(self.draw(), device=self.weight.device).long()
            elif self.num_sample >= positive.size(0):
                perm = torch.rand(self.num_local, device=self.weight.device)
                perm[positive] = 2.0
                index = torch.topk(perm, k=self.num_sample)[1].sort()[0]
            else:
                index = positive
            self.weight_index = index  # kept for inspection, as arcface_torch
            labels[positive_rows] = torch.searchsorted(index, labels[positive_rows])
        return self.weight[index]

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        local_labels = local_labels.reshape(-1).long()
        embeddings = _AllGather.apply(local_embeddings.float())
        if self.world_size > 1:
            parts = [torch.empty_like(local_labels) for _ in range(self.world_size)]
            dist.all_gather(parts, local_labels)  # [B] -> W x [B]
            labels = torch.cat(parts)
        else:
            labels = local_labels.clone()

        positive_rows = (labels >= self.class_start) & (labels < self.class_start + self.num_local)
        labels[~positive_rows] = -1
        labels[positive_rows] -= self.class_start
        weight = self._sample(labels, positive_rows) if self.sample_rate < 1 else self.weight

        # Logits in float32 whatever the autocast state, as arcface_torch with fp16 heads off.
        with torch.autocast(embeddings.device.type, enabled=False):
            logits = linear(normalize(embeddings), normalize(weight.float()))
        logits = logits.clamp(-1, 1)
        if isinstance(self.margin_softmax, CombinedMarginLoss):
            logits = self.margin_softmax(logits, labels)
            return _DistCrossEntropy.apply(logits, labels)
        # Per-sample losses: the global batch's norms (every rank holds every embedding)
        # and, where asked for, each row's target cosine from the rank that owns it.
        norms = embeddings.norm(dim=1)
        target_cos = None
        if self.margin_softmax.needs_target_cos:
            with torch.no_grad():
                target_cos = torch.zeros(logits.size(0), dtype=logits.dtype)
                index = torch.where(labels != -1)[0]
                target_cos[index] = logits[index, labels[index]]
                if self.world_size > 1:
                    dist.all_reduce(target_cos)
        logits, extra = self.margin_softmax(logits, labels, norms, target_cos)
        return _DistCrossEntropy.apply(logits, labels) + extra
