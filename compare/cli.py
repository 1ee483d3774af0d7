"""python -m compare --config configs/r50.py [--frameworks jax,torch]
       [--precision fp32,tf32,fp16,bf16] [--batch 128,256] [--steps 30] [--devices D]
       [--data synthetic|rec] [--out DIR] [--config.KEY=VALUE ...]

jaxface and the PyTorch reference on the same config and hardware: every row (framework x
flavour x precision x batch) runs in a process of its own (PyTorch on D devices under
torchrun), warm-up and compilation excluded, timed with device synchronisation. Writes
DIR/table.md (laid out like arcface_torch's published tables, then ms/step, peak memory and
MFU per row), DIR/results.json (versions, device, flags) and DIR/chart.png. A row that fails
or that the device cannot run is reported in its row; the others still run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from compare import report
from compare.capability import peak_tflops
from compare.flops import train_flops_per_image
from compare.variants import FRAMEWORKS, INSTALL, PRECISIONS, Variant, plan
from jaxface.config import ConfigError, load_config, parse_overrides


class UsageError(ValueError):
    """Bad arguments: reported in one line, exit status 2."""


def _list(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    for item in items:
        if item not in allowed:
            raise UsageError(f"unknown {what} {item!r} (choose from {', '.join(allowed)})")
    if not items:
        raise UsageError(f"no {what} given")
    return list(dict.fromkeys(items))


def _batches(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--batch {text!r} must be comma-separated integers") from None
    if not values or min(values) < 1:
        raise UsageError(f"--batch {text!r} must be positive integers")
    return values


def _check_installed(frameworks: list[str]) -> None:
    for framework in frameworks:
        if importlib.util.find_spec(framework) is None:
            raise UsageError(f"{framework} is not installed; install it with: {INSTALL[framework]}")


def worker_command(variant: Variant, spec: dict, out: Path, devices: int) -> list[str]:
    """The command that runs one row."""
    args = ["-m", "compare.worker", "--spec", json.dumps(spec), "--out", str(out)]
    if variant.framework == "torch" and devices > 1:
        torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}"]
        return [sys.executable, *torchrun, *args]
    return [sys.executable, *args]


def worker_env(devices: int) -> dict:
    """The environment of a worker process on `devices` devices."""
    env = dict(os.environ)
    # jax on a CPU host: D virtual devices (the flag only concerns the host platform).
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    # PyTorch 2.13's oneDNN AVX-512 channels_last convolutions corrupt the heap on some
    # AVX-512/AMX Xeons (seen here: SIGSEGV or "free(): invalid next size" in the tuned CPU
    # rows, fine at AVX2). It concerns CPU kernels only, so GPU rows are not affected.
    env.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
    return env


def run_variant(variant: Variant, spec: dict, devices: int, timeout: float) -> dict:
    """Run one row in its own process; whatever happens, a row comes back."""
    with tempfile.TemporaryDirectory(prefix="compare-") as tmp:
        out = Path(tmp) / "row.json"
        command = worker_command(variant, spec, out, devices)
        try:
            proc = subprocess.run(
                command, env=worker_env(devices), capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:g} s"}
        if out.exists():
            row = json.loads(out.read_text())
            if proc.returncode and "error" not in row:
                row["error"] = f"exit status {proc.returncode}"
            return row
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit status {proc.returncode}: {tail[0]}"}


def _add_mfu(row: dict, meta: dict, override: float | None) -> None:
    if "samples_per_s" not in row:
        return
    flops = train_flops_per_image(
        meta["network"], meta["num_classes"], meta["embedding_size"], meta["sample_rate"]
    )
    row["flops_per_image"] = flops
    peak = override or peak_tflops(row.get("device_name", ""), row["precision"])
    row["mfu"] = flops * row["samples_per_s"] / (peak * 1e12 * meta["devices"]) if peak else None


def _parse(argv):
    parser = argparse.ArgumentParser(
        prog="python -m compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--frameworks", default="jax,torch")
    parser.add_argument("--precision", default=",".join(PRECISIONS))
    parser.add_argument("--batch", default="128", help="per device, comma-separated")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps after compiling")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument(
        "--data",
        choices=("synthetic", "rec"),
        default="synthetic",
        help="random batches kept on the device (--pool of them), or the real loader",
    )
    parser.add_argument(
        "--pool",
        type=int,
        default=8,
        help="synthetic data: distinct random batches cycled (one repeated batch is learnt "
        "by heart: the loss falls to ~0 and PyTorch's CPU kernels crawl on denormal numbers)",
    )
    parser.add_argument("--out", default="work_dirs/compare")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per row")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole run: rows not started by then are reported as skipped "
        "(order --precision by importance)",
    )
    parser.add_argument(
        "--torch-compile", action="store_true", help="torch tuned also uses torch.compile"
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="per device, for MFU where the device is not in the table",
    )
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, rest = _parse(argv)

    try:
        frameworks = _list(args.frameworks, FRAMEWORKS, "framework")
        precisions = _list(args.precision, PRECISIONS, "precision")
        batches = _batches(args.batch)
        if args.steps < 1 or args.devices < 1 or args.pool < 1:
            raise UsageError("--steps, --devices and --pool must be at least 1")
        _check_installed(frameworks)
        overrides = parse_overrides(rest)
        cfg = load_config(args.config, overrides)
    except (UsageError, ConfigError) as exc:
        print(f"python -m compare: error: {exc}", file=sys.stderr)
        return 2
    variants = plan(frameworks, precisions, batches)
    meta = {
        "dataset": cfg.rec if args.data == "rec" else "synthetic, on the device",
        "data_note": (
            f"the real loader over {cfg.rec}"
            if args.data == "rec"
            else f"a pool of {args.pool} random batches on the device, cycled"
        )
        + "; denormal numbers flushed to zero in both frameworks (XLA's default; "
        "torch.set_flush_denormal(True) for PyTorch on CPU)",
        "num_classes": cfg.num_classes,
        "network": cfg.network,
        "embedding_size": cfg.embedding_size,
        "sample_rate": cfg.sample_rate,
        "devices": args.devices,
        "steps": args.steps,
        "warmup": args.warmup,
        "data": args.data,
        "config": args.config,
        "overrides": overrides,
        "command": " ".join(["python -m compare", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": "?",
        "versions": {},
    }
    rows, start = [], time.perf_counter()
    for i, variant in enumerate(variants, start=1):
        spec = {
            **variant.to_dict(),
            "config": args.config,
            "overrides": overrides,
            "steps": args.steps,
            "warmup": args.warmup,
            "devices": args.devices,
            "data": args.data,
            "pool": args.pool,
            "torch_compile": args.torch_compile,
        }
        elapsed = time.perf_counter() - start
        if args.budget is not None and elapsed >= args.budget:
            result = {"skipped": f"the --budget of {args.budget:g} s was spent"}
        else:
            # A row is silent for a while (a fresh process imports, compiles and warms up).
            print(
                f"[{i}/{len(variants)}] {variant.name}: starting (import, compile, "
                f"{args.warmup} warm-up steps, then {args.steps} timed) ...",
                flush=True,
            )
            result = run_variant(variant, spec, args.devices, args.timeout)
        row = {
            **result,
            **variant.to_dict(),
            "network": cfg.network,
            "num_classes": cfg.num_classes,
            "dataset": meta["dataset"],
            "devices": args.devices,
        }
        _add_mfu(row, meta, args.peak_tflops)
        rows.append(row)
        if "samples_per_s" in row:
            meta["device"] = row["device"]
            said = f"{row['samples_per_s']:,.0f} samples/s, {row['ms_per_step']:.1f} ms/step"
        else:
            said = report._cell(row)
        meta["versions"].update(row.get("versions", {}))
        elapsed = time.perf_counter() - start
        eta = elapsed / i * (len(variants) - i)
        print(
            f"[{i}/{len(variants)}] {variant.name}: {said} "
            f"({elapsed:.0f} s so far, about {eta:.0f} s to go)",
            flush=True,
        )
    paths = report.write(Path(args.out), meta, rows)
    print()
    print(paths["table"].read_text(), end="")
    print(f"\nwrote {paths['table']}, {paths['json']}, {paths['chart']}")
    return 0
