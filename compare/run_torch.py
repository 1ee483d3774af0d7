"""One PyTorch row: torchref's step (arcface_torch's model, Partial FC, SGD, GradScaler),
stock or tuned, one process per device under torchrun."""

from __future__ import annotations

import itertools
import os

import torch
import torch.distributed as dist

from compare.capability import unsupported
from compare.timing import measure, random_batches
from compare.variants import COLUMNS
from jaxface.config import derive
from jaxface.data.training import make_loader, prepare
from torchref.engine import Options, build, init_distributed, train_step
from torchref.partial_fc import world


def run(spec: dict, cfg) -> dict:
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    init_distributed(device.type)
    rank, world_size = world()
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    capability = float("{}.{}".format(*torch.cuda.get_device_capability(device))) if cuda else None
    info = {
        "device": f"{world_size} x {name}",
        "device_name": name,
        "platform": "gpu" if cuda else "cpu",
        "versions": {"torch": torch.__version__},
        "rank": rank,
    }
    why = unsupported(spec["precision"], info["platform"], capability)
    if why:
        return {**info, "skipped": why}
    compute, tf32, _, _ = COLUMNS[spec["precision"]]
    tuned = spec["flavour"] == "tuned"
    cfg = cfg.replace(batch_size=spec["batch"])
    derived = derive(cfg, world_size)
    options = Options(
        precision=compute,
        tf32=tf32,
        channels_last=tuned,
        compile=tuned and spec.get("torch_compile", False),
        sample_rate=cfg.sample_rate,
    )
    ref = build(cfg, derived, options, device)
    batches = _batches(spec, cfg, derived, device, rank, world_size)

    def step():
        images, labels = next(batches)
        return train_step(ref, images, labels)

    def sync(loss):
        if cuda:
            torch.cuda.synchronize(device)
        else:
            loss.item()

    result = measure(step, sync, spec["warmup"], spec["steps"], derived.global_batch)
    if world_size > 1:  # the slowest rank sets the pace
        rate = torch.tensor([result["samples_per_s"], -result["ms_per_step"]], dtype=torch.float64)
        dist.all_reduce(rate, op=dist.ReduceOp.MIN)
        result["samples_per_s"], result["ms_per_step"] = float(rate[0]), -float(rate[1])
    result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device) if cuda else None
    result["loss"] = float(step())
    if dist.is_initialized():
        dist.destroy_process_group()
    return {**info, **result}


def _batches(spec, cfg, derived, device, rank, world_size):
    """An endless iterator of this rank's (uint8 NHWC images, int64 labels) on `device`."""
    rows = derived.global_batch // world_size
    if spec["data"] == "rec":
        if rank == 0:  # the demo's synthetic set, packed once (a jax row may have done it)
            prepare(cfg)
        if dist.is_initialized():
            dist.barrier()
        loader = make_loader(cfg, derived.global_batch, rank, world_size)

        def from_loader():
            step = 0
            while True:
                images, labels = loader.batch(step)
                step += 1
                yield (
                    torch.from_numpy(images).to(device, non_blocking=True),
                    torch.from_numpy(labels).long().to(device, non_blocking=True),
                )

        return from_loader()
    pool = [
        (
            torch.from_numpy(images[rank * rows : (rank + 1) * rows]).to(device),
            torch.from_numpy(labels[rank * rows : (rank + 1) * rows]).long().to(device),
        )
        for images, labels in random_batches(cfg, derived.global_batch, spec.get("pool", 8))
    ]
    return itertools.cycle(pool)
