"""One arcface_torch training step from a given state, on 1 rank or W gloo ranks (CPU).

The parity tests (and `compare/`) use it to check jaxface against the reference: it takes
the backbone state dict, the global class centres [C, E], the global batch, runs one step
with W processes exactly as arcface_torch would (DDP, per-rank BatchNorm, head split
unevenly over ranks) and returns the loss and the state after the step. Running statistics
are the mean over ranks (jaxface keeps one copy; arcface_torch saves rank 0's).
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from jaxface.config import validate
from torchref.engine import Options, build, train_step
from torchref.partial_fc import class_split


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step_on_this_rank(
    cfg, derived, state_dict, centres, images, labels, options, loss_draw=None
) -> dict:
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    ref = build(cfg, derived, options, torch.device("cpu"))
    if loss_draw is not None:  # ElasticFace: the margins jaxface drew for this step
        ref.head.margin_softmax.draw = loss_draw
    ref.model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()})
    start, num_local = class_split(cfg.num_classes, world_size, rank)
    with torch.no_grad():
        ref.head.weight.copy_(torch.from_numpy(np.array(centres[start : start + num_local])))
    rows = len(images) // world_size
    loss = train_step(
        ref,
        torch.from_numpy(images[rank * rows : (rank + 1) * rows]),
        torch.from_numpy(labels[rank * rows : (rank + 1) * rows]),
    )
    return {
        "loss": float(loss),
        "state_dict": {k: v.detach().numpy().copy() for k, v in ref.model.state_dict().items()},
        "centres": ref.head.weight.detach().numpy().copy(),
        # The per-sample loss's running state (AdaFace's norm statistics, CurricularFace's t).
        "loss_state": {
            k: v.detach().numpy().copy() for k, v in ref.head.margin_softmax.named_buffers()
        },
    }


def _worker(rank: int, world_size: int, port: int, folder: str, cfg_values, derived) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        data = np.load(Path(folder) / "in.npz")
        sd = {k[3:]: data[k] for k in data.files if k.startswith("sd/")}
        out = _step_on_this_rank(
            validate(cfg_values),
            derived,
            sd,
            data["centres"],
            data["images"],
            data["labels"],
            Options(),
        )
        flat = {f"sd/{k}": v for k, v in out["state_dict"].items()}
        np.savez(Path(folder) / f"out_{rank}.npz", loss=out["loss"], centres=out["centres"], **flat)
    finally:
        dist.destroy_process_group()


def reference_step(
    cfg,
    derived,
    state_dict: dict[str, np.ndarray],
    centres: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
    world_size: int = 1,
    options: Options | None = None,
    loss_draw=None,
) -> dict:
    """Loss, backbone state dict and global centres [C, E] after one step on `world_size`
    CPU ranks. `images` / `labels` are the global batch, split over ranks in order.
    `loss_draw` (one rank only) replaces ElasticFace's margin draw: n -> [n] margins."""
    if world_size == 1:
        return _step_on_this_rank(
            cfg, derived, state_dict, centres, images, labels, options or Options(), loss_draw
        )
    if loss_draw is not None:
        raise ValueError("loss_draw works on one rank only")
    if options not in (None, Options()):
        raise ValueError("multi-rank reference steps run with the default Options only")
    with tempfile.TemporaryDirectory() as folder:
        np.savez(
            Path(folder) / "in.npz",
            centres=centres,
            images=images,
            labels=labels,
            **{f"sd/{k}": v for k, v in state_dict.items()},
        )
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        mp.spawn(
            _worker,
            args=(world_size, _free_port(), folder, cfg.to_dict(), derived),
            nprocs=world_size,
            join=True,
        )
        outs = [np.load(Path(folder) / f"out_{r}.npz") for r in range(world_size)]
        losses = [float(o["loss"]) for o in outs]
        sd = {}
        for key in (k[3:] for k in outs[0].files if k.startswith("sd/")):
            values = [o[f"sd/{key}"] for o in outs]
            if key.endswith(("running_mean", "running_var")):
                sd[key] = np.mean(values, axis=0, dtype=np.float64).astype(values[0].dtype)
            else:
                # DDP keeps parameters identical on every rank; check rather than assume.
                if not all(np.array_equal(values[0], v) for v in values[1:]):
                    raise RuntimeError(f"ranks disagree on {key} after the step")
                sd[key] = values[0]
        return {
            "loss": losses[0],
            "rank_losses": losses,
            "state_dict": sd,
            "centres": np.concatenate([o["centres"] for o in outs]),
        }
