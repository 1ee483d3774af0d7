"""python -m compare.profile --config configs/r50.py [--precision bf16] [--batch 128]
       [--steps 20] [--devices 1] [--out DIR] [--target h200] [--config.KEY=VALUE ...]

What to read before tuning jaxface's step on a GPU, from one run: XLA's cost analysis of
the compiled step (FLOPs and bytes accessed per step, so arithmetic intensity) next to the
model's own FLOP count, XLA's memory analysis, the optimised HLO (DIR/step.hlo.txt:
fusions, layouts, copies, with counts printed), the step time and MFU, and a jax.profiler
trace of a few steps (DIR/trace, for TensorBoard's profile plugin or Perfetto).
DIR/profile.json holds the numbers.

--target GPU (h200, or a GpuTargetConfigProto .txtpb file) compiles the same step for that
GPU on a machine without one (`pip install -e '.[gpu-compile]'`) and reads the compiled
program instead of running it: kernels per step by kind, HBM traffic, a roofline estimate
and the predicted samples/s, the memory analysis, DIR/step.hlo.txt and DIR/profile.json.
A compile-time estimate: nothing is run or timed (docs/gpu.md).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from compare.capability import peak_tflops
from compare.flops import train_flops_per_image
from compare.variants import COLUMNS, PRECISIONS
from jaxface import cli
from jaxface.gpu_target import TargetError

GOAL_SAMPLES_PER_S = 8000  # r50, bf16, batch 128 on one H200: the project's goal


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return {k: float(v) for k, v in (cost or {}).items() if k in ("flops", "bytes accessed")}


def hlo_counts(text: str) -> dict:
    """How many fusions, copies, transposes, convolutions, all-reduces/gathers the HLO has."""
    ops = ("fusion", "copy", "transpose", "convolution", "all-reduce", "all-gather", "sort")
    return {op: len(re.findall(rf"= \S+ {op}\(", text)) for op in ops}


def main(argv: list[str] | None = None) -> int:
    return cli.run("python -m compare.profile", _main, argv, ((TargetError, 2),))


def _memory(memory) -> dict:
    out = {
        "arguments": int(memory.argument_size_in_bytes),
        "outputs": int(memory.output_size_in_bytes),
        "aliased": int(memory.alias_size_in_bytes),
        "temporaries": int(memory.temp_size_in_bytes),
    }
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


def profile_target(args, cfg) -> int:
    """Compile the step for a GPU this machine does not have and read the program."""
    from jaxface import collectives, gpu_target, hlo_stats
    from jaxface.setup import build

    target = gpu_target.load_target(args.target)
    # Checks the plugin, the spec and the host split first.
    mesh = gpu_target.mesh(target, args.devices, args.hosts)
    compute, tf32, _, _ = COLUMNS[args.precision]
    cfg = cfg.replace(precision=compute, tf32=tf32, batch_size=args.batch)
    run = build(cfg, mesh)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    compiled = run.lower().compile()
    compile_s = time.perf_counter() - t
    hlo = compiled.as_text()
    (out / "step.hlo.txt").write_text(hlo)
    peaks = target.peaks
    stats = hlo_stats.analyse(hlo, peaks)
    found, last_conv = collectives.analyse(hlo, peaks, args.devices)
    link = collectives.link_bytes_per_s(target.name, args.hosts, args.network_gbps)
    comm = collectives.summary(found, last_conv, link)
    numbers = hlo_stats.summary(
        stats, peaks, run.derived.global_batch, args.launch_us, comm["exposed_ms"] / 1e3
    )
    memory = _memory(compiled.memory_analysis())
    model_flops = run.derived.global_batch * train_flops_per_image(
        cfg.network, cfg.num_classes, cfg.embedding_size, cfg.sample_rate
    )
    summary = {
        "target": target.name,
        "device": f"{args.devices} x {target.device_name} (compile-only)"
        + (f" on {args.hosts} hosts" if args.hosts > 1 else ""),
        "units": "per device, except global_batch and estimated_samples_per_s (all devices)",
        "estimate": "compile-time: no autotuning, nothing run or timed",
        "config": args.config,
        "network": cfg.network,
        "num_classes": cfg.num_classes,
        "precision": args.precision,
        "global_batch": run.derived.global_batch,
        "compile_s": compile_s,
        "model_flops_per_step": model_flops,
        **numbers,
        "memory": memory,
        "communication": comm,
        "largest_kernels": [
            {"name": k.name, "kind": k.kind, "bytes": k.bytes, "times": k.times}
            for k in stats.largest(10)
        ],
    }
    (out / "profile.json").write_text(json.dumps(summary, indent=1))
    goal = GOAL_SAMPLES_PER_S * args.devices if args.devices else None
    gib = 1024**3
    print(
        f"{cfg.network} {args.precision}, global batch {run.derived.global_batch}, "
        f"{cfg.num_classes:,} classes, compiled for {summary['device']} in {compile_s:.0f} s\n"
        "COMPILE-TIME ESTIMATE: XLA's untuned program read, not run; nothing was timed.",
    )
    for line in hlo_stats.format_summary(numbers, goal):
        print(line)
    if found:
        for line in collectives.format_table(comm):
            print(line)
    print(
        f"model {model_flops / args.devices / 1e12:.2f} TFLOP/step per device\n"
        f"memory per device: arguments {memory['arguments'] / gib:.2f} GiB, temporaries "
        f"{memory['temporaries'] / gib:.2f} GiB, peak {memory['peak'] / gib:.2f} GiB of "
        f"{(target.memory_bytes or 0) / gib:.0f} GiB\n"
        f"wrote {out / 'step.hlo.txt'}, {out / 'profile.json'}"
    )
    return 0


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m compare.profile", description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--precision", default="bf16", choices=PRECISIONS)
    parser.add_argument("--batch", type=int, default=128, help="per device")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--trace-steps", type=int, default=5)
    parser.add_argument("--devices", type=int, default=1, help="in all")
    parser.add_argument(
        "--hosts", type=int, default=1, help="with --target: the devices split over this many hosts"
    )
    parser.add_argument(
        "--network-gbps",
        type=float,
        default=400.0,
        help="with --target and --hosts > 1: each GPU's network bandwidth, Gb/s (400)",
    )
    parser.add_argument("--out", default="work_dirs/profile")
    parser.add_argument(
        "--target",
        default=None,
        help="compile for this GPU instead of running (h200, or a spec .txtpb file)",
    )
    parser.add_argument(
        "--launch-us",
        type=float,
        default=0.0,
        help="with --target: add this many microseconds per kernel to the estimate",
    )
    args, rest = parser.parse_known_args(argv)
    from jaxface.config import load_config, parse_overrides

    if args.target:
        from jaxface import gpu_target

        gpu_target.load_target(args.target)  # an unknown name fails before the config loads
    cfg = load_config(args.config, parse_overrides(rest))
    if args.target:
        return profile_target(args, cfg)
    import jax

    from compare.run_jax import build, device_info

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = {
        "precision": args.precision,
        "batch": args.batch,
        "devices": args.devices,
        "data": "synthetic",
    }
    step_fn, state, batches, close, derived = build(spec, cfg)
    images, labels = next(batches)
    t = time.perf_counter()
    compiled = step_fn.lower(state, images, labels).compile()
    compile_s = time.perf_counter() - t
    hlo = compiled.as_text()
    (out / "step.hlo.txt").write_text(hlo)
    memory = compiled.memory_analysis()

    def run(n):
        nonlocal state
        for _ in range(n):
            state, metrics = compiled(state, images, labels)
        jax.block_until_ready(metrics["loss"])

    run(2)
    t = time.perf_counter()
    run(args.steps)
    step_s = (time.perf_counter() - t) / args.steps
    with jax.profiler.trace(str(out / "trace")):
        run(args.trace_steps)
    close()

    info = device_info()
    model_flops = derived.global_batch * train_flops_per_image(
        cfg.network, cfg.num_classes, cfg.embedding_size, cfg.sample_rate
    )
    peak = peak_tflops(info["device_name"], args.precision)
    summary = {
        **info,
        "config": args.config,
        "network": cfg.network,
        "precision": args.precision,
        "global_batch": derived.global_batch,
        "compile_s": compile_s,
        "ms_per_step": 1000 * step_s,
        "samples_per_s": derived.global_batch / step_s,
        "model_flops_per_step": model_flops,
        "xla_cost": _cost(compiled),
        "mfu": model_flops / step_s / (peak * 1e12 * args.devices) if peak else None,
        "memory": {
            "arguments": memory.argument_size_in_bytes,
            "outputs": memory.output_size_in_bytes,
            "aliased": memory.alias_size_in_bytes,
            "temporaries": memory.temp_size_in_bytes,
        },
        "hlo_ops": hlo_counts(hlo),
    }
    (out / "profile.json").write_text(json.dumps(summary, indent=1))
    xla = summary["xla_cost"]
    intensity = xla.get("flops", 0) / xla["bytes accessed"] if xla.get("bytes accessed") else 0
    mfu = f"{100 * summary['mfu']:.1f} %" if summary["mfu"] is not None else "n/a"
    print(
        f"{cfg.network} {args.precision}, global batch {derived.global_batch} on "
        f"{info['device']}: {summary['ms_per_step']:.1f} ms/step, "
        f"{summary['samples_per_s']:,.0f} samples/s, MFU {mfu} (compile {compile_s:.0f} s)\n"
        f"GFLOP per step: model {model_flops / 1e9:,.1f}, XLA {xla.get('flops', 0) / 1e9:,.1f}; "
        f"bytes accessed {xla.get('bytes accessed', 0) / 1e9:.2f} GB "
        f"(intensity {intensity:.0f} FLOP/byte)\n"
        f"memory: temporaries {memory.temp_size_in_bytes / 1e9:.2f} GB, arguments "
        f"{memory.argument_size_in_bytes / 1e9:.2f} GB\n"
        f"HLO: {', '.join(f'{k} {v}' for k, v in summary['hlo_ops'].items())}\n"
        f"wrote {out / 'step.hlo.txt'}, {out / 'trace'}, {out / 'profile.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
