"""python -m torchref.train --config configs/r50.py [torch flags] [--config.KEY=VALUE ...]

The PyTorch reference trainer, reading jaxface's config files. One process, or one per
device under torchrun (gloo on CPU, NCCL on GPU):

    torchrun --nproc_per_node 8 -m torchref.train --config configs/r50.py --precision fp16

Writes to `<output>/torchref/`: metrics.jsonl, model.pt (rank 0, arcface_torch's state
dict) and checkpoint_gpu_{rank}.pt (arcface_torch's layout). Exit status: 0 done, 1
non-finite loss, 2 bad config or arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from jaxface import cli
from jaxface.config import ConfigError, derive, load_config, parse_overrides
from jaxface.data.recordio import RecordIOError
from jaxface.data.training import make_loader, prepare
from torchref.engine import PRECISIONS, Options, build, distributed, train_step
from torchref.partial_fc import world


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m torchref.train")
    parser.add_argument("--config", default="configs/demo.py")
    parser.add_argument(
        "--precision", choices=PRECISIONS, help="default: the config's (fp32 or bf16)"
    )
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    parser.add_argument("--sample-rate", type=float, default=1.0, help="Partial FC sampling")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda if present)")
    return parser.parse_known_args(argv)


def train(cfg, options: Options, device: torch.device) -> dict:
    rank, world_size = world()
    if cfg.num_devices is not None and cfg.num_devices != world_size:
        raise ConfigError(
            f"{cfg.source}: config key 'num_devices'={cfg.num_devices}, but torchrun started "
            f"{world_size} process(es)"
        )
    derived = derive(cfg, world_size)
    # The same loader as jaxface.train, so one config gives both frameworks the same batches.
    if rank == 0:
        prepare(cfg)
    if dist.is_initialized():
        dist.barrier()
    try:
        ref = build(cfg, derived, options, device)
    except ValueError as exc:  # a margin or precision torchref does not implement
        raise ConfigError(f"{cfg.source}: {exc}") from None
    loader = make_loader(cfg, derived.global_batch, rank, world_size)
    out = Path(cfg.output) / "torchref"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print(
            f"torchref: {cfg.network}, {cfg.num_classes:,} classes over {world_size} "
            f"{device.type} process(es), global batch {derived.global_batch}, "
            f"{options.precision}, {derived.run_steps:,} steps -> {out}",
            flush=True,
        )
    log = (out / "metrics.jsonl").open("w") if rank == 0 else None
    pending: list[torch.Tensor] = []
    first_loss = last_loss = None
    t0 = time.perf_counter()
    t_window, n_window = t0, 0
    try:
        for step in range(1, derived.run_steps + 1):
            images, labels = loader.batch(step - 1)
            loss = train_step(ref, torch.from_numpy(images), torch.from_numpy(labels))
            pending.append(loss)
            n_window += 1
            if step % cfg.frequent and step != derived.run_steps:
                continue
            # The only host sync: every `frequent` steps, not every step (unlike arcface_torch).
            losses = torch.stack(pending).cpu().tolist()
            pending.clear()
            if not all(math.isfinite(v) for v in losses):
                raise FloatingPointError(
                    f"loss is {losses[-1]} at step {step}; lower config key 'lr'"
                )
            first_loss = losses[0] if first_loss is None else first_loss
            last_loss = sum(losses) / len(losses)
            now = time.perf_counter()
            rate = n_window * derived.global_batch / (now - t_window)
            t_window, n_window = now, 0
            if log is not None:
                record = {
                    "step": step,
                    "loss": last_loss,
                    "lr": ref.optimizer.param_groups[0]["lr"],
                    "samples_per_sec": rate,
                }
                log.write(json.dumps(record) + "\n")
                log.flush()
                print(
                    f"step {step}/{derived.run_steps}  loss {last_loss:.4f}  "
                    f"lr {record['lr']:.5f}  {rate:.0f} samples/s",
                    flush=True,
                )
    finally:
        loader.close()
        if log is not None:
            log.close()
    if rank == 0:
        torch.save(ref.model.state_dict(), out / "model.pt")
    torch.save(
        {
            "epoch": 0,
            "global_step": derived.run_steps,
            "state_dict_backbone": ref.model.state_dict(),
            "state_dict_softmax_fc": ref.head.state_dict(),
            "state_optimizer": ref.optimizer.state_dict(),
            "state_lr_scheduler": ref.scheduler.state_dict(),
        },
        out / f"checkpoint_gpu_{rank}.pt",
    )
    if dist.is_initialized():
        dist.barrier()
    return {"first_loss": first_loss, "final_loss": last_loss, "wall_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    codes = ((FloatingPointError, 1), (RecordIOError, 2))
    return cli.run("torchref.train", _main, argv, codes)


def _main(argv: list[str]) -> int:
    args, rest = _parse(argv)
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config(args.config, parse_overrides(rest))
    options = Options(
        precision=args.precision or cfg.precision,
        tf32=args.tf32,
        channels_last=args.channels_last,
        compile=args.compile,
        sample_rate=args.sample_rate,
    )
    with distributed(device_type):
        rank, _ = world()
        device = torch.device(device_type)
        if device_type == "cuda":
            device = torch.device("cuda", rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        summary = train(cfg, options, device)
    if rank == 0:
        print(
            f"done: loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f} "
            f"in {summary['wall_s']:.1f} s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
