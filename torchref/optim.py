"""Optimizer and LR schedule, as arcface_torch's (and jaxface.optim's) but from the config."""

from __future__ import annotations

import torch


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, power: float) -> float:
    """jaxface.optim.lr_schedule: linear warm-up from 0, then polynomial decay to 0."""
    if step < warmup_steps:
        return base_lr * step / max(warmup_steps, 1)
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return base_lr * min(max(1.0 - progress, 0.0), 1.0) ** power


class PolyScheduler(torch.optim.lr_scheduler.LRScheduler):
    """Warm-up then polynomial decay, stepped once per optimizer step.

    Optimizer step k uses lr_at(k). arcface_torch's PolyScheduler repeats lr(0) for its first
    two steps (it resets `last_epoch` after construction) and hard-codes power 2; torchref
    follows the config (`lr_power`) and jaxface's schedule so both frameworks see one LR.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        base_lr: float,
        max_steps: int,
        warmup_steps: int,
        power: float = 1.0,
        last_epoch: int = -1,
    ):
        self.base_lr = base_lr
        self.max_steps = max_steps
        self.warmup_steps = warmup_steps
        self.power = power
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        lr = lr_at(
            max(self.last_epoch, 0), self.base_lr, self.warmup_steps, self.max_steps, self.power
        )
        return [lr for _ in self.optimizer.param_groups]


def make_optimizer(cfg, backbone: torch.nn.Module, head: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay on every parameter) or AdamW, over backbone and head."""
    groups = [{"params": backbone.parameters()}, {"params": head.parameters()}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            groups, lr=cfg.lr, betas=cfg.adamw_betas, eps=cfg.adamw_eps,
            weight_decay=cfg.weight_decay,
        )  # fmt: skip
    raise ValueError(f"config key 'optimizer'={cfg.optimizer!r} must be sgd or adamw")
