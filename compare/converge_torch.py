"""One torchref run of python -m compare.converge: torchref's step (`torchref.engine`:
arcface_torch's model, Partial FC, SGD, GradScaler under fp16) from the shared initial
weights, over the shared loader's batches, every step's metrics kept, verification with
the trainer's protocol on torchref's own embeddings."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from compare.converge_run import Curves, read_init
from jaxface.config import derive
from jaxface.data.training import make_loader
from jaxface.data.verification import load_bin
from torchref.engine import Options, build, train_step
from torchref.iresnet import normalize_images


def run(spec: dict, cfg, say) -> tuple[dict, dict]:
    """(result, final embeddings by verification set) of one run that `spec` describes."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    derived = derive(cfg, 1)
    options = Options(precision=spec["compute"], tf32=spec["tf32"], sample_rate=cfg.sample_rate)
    # build() seeds torch with cfg.seed: the run's own draws (dropout, sampling) follow the
    # run's seed; the data does not (make_loader below reads the config as given).
    ref = build(cfg.replace(seed=spec["seed"]), derived, options, device)
    state_dict, centres = read_init(Path(spec["init"]))
    ref.model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
    with torch.no_grad():
        ref.head.weight.copy_(torch.from_numpy(centres))
    if spec.get("draws_in"):
        rows = iter(np.load(spec["draws_in"]))
        ref.head.draw = lambda: torch.from_numpy(next(rows))
    targets = [(Path(p).stem, *load_bin(p)) for p in spec["val_paths"]]
    curves = Curves(derived.global_batch)
    loader = make_loader(cfg, derived.global_batch)
    lrs: list[float] = []
    t_start = time.perf_counter()
    final = {}
    try:
        for step in range(1, spec["steps"] + 1):
            images, labels = loader.batch(step - 1)
            lrs.append(ref.optimizer.param_groups[0]["lr"])  # the rate this step uses
            loss = train_step(ref, torch.from_numpy(images), torch.from_numpy(labels))
            curves.pending.append((loss, ref.grad_norm))
            if step == 1:
                loss.item()
                curves.compile_s = time.perf_counter() - t_start
                curves.restart_clock(step)
            if step % cfg.frequent == 0 or step == spec["steps"]:
                # The only host sync, every `frequent` steps, as torchref.train.
                losses, norms = (
                    torch.stack(x).float().cpu().tolist() for x in zip(*curves.pending, strict=True)
                )
                curves.pending.clear()
                curves.add(
                    step,
                    loss=losses,
                    lr=lrs[-len(losses) :],
                    grad_norm=norms,
                    # GradScaler skips a step whose gradients overflowed.
                    skipped=[not np.isfinite(n) for n in norms],
                )
                say(curves.progress(step, spec["steps"]))
            if targets and (step % cfg.verbose == 0 or step == spec["steps"]):
                final = curves.add_val(step, targets, lambda x: _embed(ref, x, derived), say)
                curves.restart_clock(step)
    finally:
        loader.close()
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    device_name = f"{name} (torch {torch.__version__})"
    return {
        **curves.as_dict(),
        "wall_s": time.perf_counter() - t_start,
        "device": device_name,
    }, final


@torch.no_grad()
def _embed(ref, images: np.ndarray, derived) -> np.ndarray:
    """float32 embeddings in eval mode, as arcface_torch's verification callback."""
    model = ref.model
    model.eval()
    try:
        out = []
        for start in range(0, len(images), derived.global_batch):
            chunk = torch.from_numpy(images[start : start + derived.global_batch])
            x = normalize_images(chunk.to(ref.device))
            if ref.options.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(model(x).float().cpu().numpy())
        return np.concatenate(out)
    finally:
        model.train()
