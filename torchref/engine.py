"""Building the reference's pieces from a config and one training step, arcface_torch's way."""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

from torchref.iresnet import IResNet, normalize_images
from torchref.losses import make_loss
from torchref.models import get_model
from torchref.optim import PolyScheduler, make_optimizer
from torchref.partial_fc import PartialFC, world

PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class Options:
    """What the config files do not say because only PyTorch has it."""

    precision: str = "fp32"  # fp32 | fp16 (autocast + GradScaler) | bf16 (autocast)
    tf32: bool = False  # TF32 matmuls and convolutions on Ampere+ GPUs
    channels_last: bool = False
    compile: bool = False  # torch.compile the backbone
    sample_rate: float = 1.0  # Partial FC sampling; 1 keeps every class


@dataclass
class Reference:
    backbone: torch.nn.Module  # DDP-wrapped when the world is larger than one
    head: PartialFC
    optimizer: torch.optim.Optimizer
    scheduler: PolyScheduler
    scaler: torch.amp.GradScaler
    clip_norm: float
    options: Options
    device: torch.device
    # The last step's backbone gradient norm (unscaled, before clipping; inf or nan on a
    # step GradScaler skips), a device tensor: compare.converge records it as jaxface's
    # `backbone_grad_norm` metric.
    grad_norm: torch.Tensor | None = None

    @property
    def model(self) -> IResNet:
        """The bare backbone (what `model.pt` holds)."""
        module = self.backbone
        module = getattr(module, "module", module)  # DDP
        return getattr(module, "_orig_mod", module)  # torch.compile


def set_matmul_precision(tf32: bool) -> None:
    """TF32 on or off for CUDA matmuls and cuDNN convolutions; 'highest' on CPU."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")


def build(cfg, derived, options: Options, device: torch.device) -> Reference:
    """Backbone, head, optimizer, schedule and scaler for `cfg` on this rank."""
    if options.precision not in PRECISIONS:
        raise ValueError(f"precision {options.precision!r} must be one of {PRECISIONS}")
    rank, world_size = world()
    set_matmul_precision(options.tf32)
    # XLA flushes denormal numbers to zero; PyTorch on CPU computes them, many times slower
    # once a model fits its data: flush them too, so that the two run alike.
    torch.set_flush_denormal(True)
    torch.manual_seed(cfg.seed)
    half = options.precision in ("fp16", "bf16")
    model = get_model(
        cfg.network,
        dropout=cfg.dropout,
        num_features=cfg.embedding_size,
        fp16=half,
        autocast_dtype=torch.bfloat16 if options.precision == "bf16" else torch.float16,
    ).to(device)
    if options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    backbone: torch.nn.Module = model
    if world_size > 1:
        # Running statistics stay per rank (broadcast_buffers=False), as arcface_torch.
        # Newer torch deprecates the flag, but its replacement still syncs at init, and
        # its own warning says to keep broadcast_buffers=False for rank-local buffers.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated")
            backbone = torch.nn.parallel.DistributedDataParallel(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False,
                bucket_cap_mb=16,
                # A ViT's mask_token gets no gradient without masking (as arcface_torch).
                find_unused_parameters=hasattr(model, "mask_token"),
            )
        if options.precision == "fp16":
            # arcface_torch always compresses gradients to fp16 for the all-reduce; torchref
            # does it under fp16 only, so fp32 runs stay comparable to jaxface.
            backbone.register_comm_hook(None, fp16_compress_hook)
    if options.compile:
        backbone = torch.compile(backbone)
    torch.manual_seed(cfg.seed + rank)  # each rank draws its own block of class centres
    margin = make_loss(cfg)
    head = PartialFC(margin, cfg.embedding_size, cfg.num_classes, options.sample_rate).to(device)
    optimizer = make_optimizer(cfg, model, head)
    scheduler = PolyScheduler(
        optimizer, cfg.lr, derived.schedule_steps, derived.warmup_steps, cfg.lr_power
    )
    scaler = torch.amp.GradScaler(
        device.type, growth_interval=100, enabled=options.precision == "fp16"
    )
    return Reference(
        backbone, head, optimizer, scheduler, scaler, cfg.grad_clip_norm, options, device
    )


def train_step(ref: Reference, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One optimizer step on this rank's uint8 NHWC images and int labels; returns the loss.

    The loss stays on the device: no host sync here.
    """
    x = normalize_images(images.to(ref.device, non_blocking=True))
    if ref.options.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    labels = labels.to(ref.device, non_blocking=True)
    embeddings = ref.backbone(x)
    loss = ref.head(embeddings, labels)
    ref.scaler.scale(loss).backward()
    ref.scaler.unscale_(ref.optimizer)  # no-op when the scaler is disabled
    # clip_grad_norm_'s two halves, so that the norm is there with clipping off too.
    params = [p for p in ref.model.parameters() if p.grad is not None]
    ref.grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if ref.clip_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, ref.clip_norm, ref.grad_norm)
    ref.scaler.step(ref.optimizer)
    ref.scaler.update()
    ref.optimizer.zero_grad(set_to_none=True)
    ref.scheduler.step()
    return loss.detach()


def init_distributed(device_type: str) -> None:
    """Join the torchrun process group (gloo on CPU, NCCL on GPU); nothing if not launched
    by torchrun."""
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


@contextlib.contextmanager
def distributed(device_type: str):
    init_distributed(device_type)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
