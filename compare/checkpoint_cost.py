"""python -m compare.checkpoint_cost [--config configs/demo.py] [--classes 500000]
       [--embedding 512] [--sample-rate 0.1] [--batch 64] [--steps 10] [--repeats 3]
       [--dir DIR] [--out FILE] [--config.KEY=VALUE ...]

What a checkpoint costs training: steps/s over windows of --steps train steps with no
save, and with a save started at the window's first step exactly as the trainer starts one
(jaxface.train: the state as saved, then the Checkpointer's asynchronous orbax save). Also
the save's blocking part (the caller waits while orbax copies the arrays off the devices),
how long its background write outlives the window, and a save on its own (blocking, and
written). Windows alternate, --repeats of each; medians are reported. The head is the
point: at `--classes` C and `--embedding` E the centres and their momentum are 2 x C x E
float32 (10 M x 512: 41 GB). Checkpoints go to DIR (a temporary folder under the system's
temporary directory by default), removed at the end. Prints one line per measure and
writes FILE (JSON) if given. A benchmark, not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from compare.timing import random_batches
from jaxface import cli
from jaxface.checkpoint import Checkpointer, array_specs, is_head_name
from jaxface.config import load_config, parse_overrides
from jaxface.diskspace import format_bytes, tree_bytes
from jaxface.mesh import make_mesh
from jaxface.setup import build

DEFAULTS = {"network": "iresnet_tiny", "num_image": 1_000_000, "num_devices": 1}


def measure(args, overrides: dict) -> dict:
    cfg = load_config(
        args.config,
        {
            **DEFAULTS,
            "num_classes": args.classes,
            "embedding_size": args.embedding,
            "sample_rate": args.sample_rate,
            "batch_size": args.batch,
            **overrides,
        },
    )
    run = build(cfg, make_mesh(cfg.num_devices))
    state = run.init_state()
    batches = [
        jax.device_put(b, run.data_sharding)
        for b in random_batches(cfg, run.derived.global_batch, 4)
    ]
    folder = Path(args.dir or tempfile.mkdtemp(prefix="jaxface-checkpoint-cost-"))
    checkpointer = Checkpointer(folder / "checkpoints", keep=1)
    step = 0

    def steps(n: int):
        nonlocal state, step
        for _ in range(n):
            step += 1
            state, metrics = run.train_step(state, *batches[step % len(batches)])
        jax.block_until_ready((state, metrics))

    def save() -> float:
        """jaxface.train's save(): returns the seconds the caller was blocked."""
        t = time.perf_counter()
        checkpointer.save(step, run.to_saved(state), {"step": step})
        return time.perf_counter() - t

    try:
        steps(3)  # compile, and the first steps' allocations
        t = time.perf_counter()
        save()  # compiles to_saved; orbax's first save creates its folders
        checkpointer.wait()
        first_save_s = time.perf_counter() - t
        steps(1)
        t = time.perf_counter()
        alone_blocking = save()
        checkpointer.wait()
        alone_total = time.perf_counter() - t
        rows = {"no_save": [], "save": [], "blocking_s": [], "write_after_window_s": []}
        for _ in range(args.repeats):
            t = time.perf_counter()
            steps(args.steps)
            rows["no_save"].append(args.steps / (time.perf_counter() - t))
            t = time.perf_counter()
            rows["blocking_s"].append(save())
            steps(args.steps)
            rows["save"].append(args.steps / (time.perf_counter() - t))
            t = time.perf_counter()
            checkpointer.wait()
            rows["write_after_window_s"].append(time.perf_counter() - t)
        written = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    finally:
        checkpointer.close()
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    head = sum(
        int(np.prod(shape)) * np.dtype(dtype).itemsize
        for name, (shape, dtype) in array_specs(run.abstract_state).items()
        if is_head_name(name)
    )
    return {
        "device": f"{run.mesh.size} x {run.mesh.devices.flat[0].device_kind}",
        "network": cfg.network,
        "num_classes": cfg.num_classes,
        "embedding_size": cfg.embedding_size,
        "sample_rate": cfg.sample_rate,
        "global_batch": run.derived.global_batch,
        "checkpoint_bytes": tree_bytes(run.abstract_state),
        "head_bytes": head,
        "written_bytes": written,
        "folder": str(folder),
        "first_save_s": first_save_s,
        "save_alone_blocking_s": alone_blocking,
        "save_alone_total_s": alone_total,
        "steps_per_window": args.steps,
        "repeats": args.repeats,
        "steps_per_s_no_save": med["no_save"],
        "steps_per_s_with_save": med["save"],
        "save_blocking_s": med["blocking_s"],
        "write_after_window_s": med["write_after_window_s"],
        "raw": rows,
    }


def report(r: dict) -> list[str]:
    fb = format_bytes
    slower = 1 - r["steps_per_s_with_save"] / r["steps_per_s_no_save"]
    return [
        f"{r['network']}, {r['num_classes']:,} classes x {r['embedding_size']} (head and its "
        f"momentum {fb(r['head_bytes'])}), sample_rate {r['sample_rate']}, global batch "
        f"{r['global_batch']}, on {r['device']}",
        f"checkpoint {fb(r['checkpoint_bytes'])} of arrays, {fb(r['written_bytes'])} on disk "
        f"in {r['folder']}",
        f"a save alone: caller blocked {r['save_alone_blocking_s']:.2f} s, written in "
        f"{r['save_alone_total_s']:.2f} s",
        f"steps/s over {r['steps_per_window']} steps (median of {r['repeats']}): "
        f"{r['steps_per_s_no_save']:.3f} without a save, {r['steps_per_s_with_save']:.3f} "
        f"with one ({100 * slower:.0f} % fewer); the save blocked the loop "
        f"{r['save_blocking_s']:.2f} s, its write ran {r['write_after_window_s']:.2f} s past "
        "the window",
    ]


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m compare.checkpoint_cost", description=__doc__)
    parser.add_argument("--config", default="configs/demo.py")
    parser.add_argument("--classes", type=int, default=500_000)
    parser.add_argument("--embedding", type=int, default=512)
    parser.add_argument("--sample-rate", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=64, help="per device")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where checkpoints are written (kept)")
    parser.add_argument("--out", default=None, help="write the numbers here (JSON)")
    args, rest = parser.parse_known_args(argv)
    result = measure(args, parse_overrides(rest))
    for line in report(result):
        print(line)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run("python -m compare.checkpoint_cost", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
