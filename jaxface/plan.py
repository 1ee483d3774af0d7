"""python -m jaxface.plan --config configs/r50.py [--config.KEY=VALUE ...] --devices D
       [--memory-gb G] [--target h200 [--hosts H]]

Compiles the training step for a D-device mesh without allocating anything (the state and
batch are abstract) and prints XLA's per-device memory analysis; with --memory-gb, also the
largest class count whose step fits that much device memory.

--target GPU (h200, or a GpuTargetConfigProto .txtpb file) compiles for D compile-only
devices of that GPU, so the numbers are the GPU compiler's own buffer assignment (cuDNN
workspaces, GPU fusions); --memory-gb defaults to the GPU's memory. --hosts H spreads the D
devices over H hosts of D/H GPUs (the collectives then cross the network). It needs
`pip install -e '.[gpu-compile]'`; without the plugin the plan falls back to the CPU
stand-in below and says so.
Without --target, D virtual CPU devices stand in for the accelerators: XLA:CPU's buffer
assignment is an estimate of a GPU's (fusion and convolution workspaces differ), good for
planning class counts, whose cost (centres, momentum, gradients, logits) is the same on any
backend.
"""

from __future__ import annotations

import argparse
import os
import sys

GIB = 1024**3


def step_memory(cfg, num_devices: int, target=None, hosts: int = 1) -> dict[str, int]:
    """Per-device bytes of the compiled train step for `cfg` on `num_devices` devices: CPU
    devices, or compile-only devices of `target` (a jaxface.gpu_target.Target) on `hosts`
    hosts."""
    # jax is imported here, not at the top: main() must set XLA_FLAGS (the virtual device
    # count) before jax first loads.
    from jaxface.mesh import make_mesh
    from jaxface.setup import build

    if target is not None:
        from jaxface import gpu_target

        mesh = gpu_target.mesh(target, num_devices, hosts)
    else:
        mesh = make_mesh(num_devices)
    run = build(cfg, mesh)
    stats = run.lower().compile().memory_analysis()
    out = {
        "arguments": int(stats.argument_size_in_bytes),
        "outputs": int(stats.output_size_in_bytes),
        "aliased": int(stats.alias_size_in_bytes),
        "temporaries": int(stats.temp_size_in_bytes),
        "code": int(stats.generated_code_size_in_bytes),
    }
    # Donated state is updated in place: its outputs alias its arguments.
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    head = 2 * run.derived.num_local_classes * cfg.embedding_size * 4  # centres + one slot
    out["centres_and_momentum"] = head
    return out


def largest_class_count(
    cfg, num_devices: int, memory_bytes: int, target=None, hosts: int = 1
) -> tuple[int, dict]:
    """Memory is affine in the class count: fit it from two compiles, check the answer."""

    def memory(classes):
        return step_memory(cfg.replace(num_classes=classes), num_devices, target, hosts)

    c0 = max(cfg.num_classes, 1000 * num_devices)
    c1 = 2 * c0
    m0 = memory(c0)["peak"]
    m1 = memory(c1)["peak"]
    per_class = (m1 - m0) / (c1 - c0)
    fixed = m0 - per_class * c0

    def fit(a, b):  # the class count where the line through two (classes, peak) meets the budget
        slope = (b[1] - a[1]) / (b[0] - a[0]) if b[0] != a[0] else per_class
        slope = slope if slope > 0 else per_class
        classes = a[0] + (memory_bytes - a[1]) / slope
        return max(int(classes) // num_devices * num_devices, num_devices)

    # Memory is affine only to within XLA's buffer packing: refit through the nearest
    # compile (secant steps) instead of shrinking by a fixed fraction, which took a dozen
    # compiles when the first estimate was off by a few percent.
    near, best = (c1, m1), fit((c0, m0), (c1, m1))
    checked = memory(best)
    for _ in range(4):
        if checked["peak"] <= memory_bytes or best <= num_devices:
            break
        near, best = (best, checked["peak"]), fit(near, (best, checked["peak"]))
        best = min(best, int(near[0] * 0.995) // num_devices * num_devices)  # always down
        checked = memory(best)
    while checked["peak"] > memory_bytes and best > num_devices:  # rarely: the last resort
        best = int(best * 0.98) // num_devices * num_devices
        checked = memory(best)
    return best, {"bytes_per_class": per_class, "fixed_bytes": fixed, **checked}


def _activations_per_image(cfg) -> float:
    from jaxface.models import get_model
    from jaxface.precision import policy_from_config
    from jaxface.residuals import activation_bytes_per_image

    model = get_model(
        cfg.network, embedding_size=cfg.embedding_size, policy=policy_from_config(cfg),
        remat=cfg.remat,
    )  # fmt: skip
    return activation_bytes_per_image(model)


def _print_memory(title: str, mem: dict) -> None:
    print(title)
    for key in ("arguments", "outputs", "aliased", "temporaries", "peak"):
        print(f"  {key:<12} {mem[key] / GIB:10.3f} GiB")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _cpu_devices_before_jax(argv)
    # Not at the top: the virtual CPU devices must be set before anything loads jax
    # (jaxface.mesh does).
    from jaxface import cli
    from jaxface.gpu_target import TargetError
    from jaxface.mesh import MeshError

    return cli.run("jaxface.plan", _main, argv, ((MeshError, 2), (TargetError, 2)))


def _cpu_devices_before_jax(argv: list[str]) -> None:
    """Without a GPU target (or without the plugin to compile for one), `--devices D`
    virtual CPU devices stand in: XLA reads their count when jax first loads."""
    from jaxface import gpu_target

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--devices", type=int, default=None)
    parser.add_argument("--target", default=None)
    args, _ = parser.parse_known_args(argv)
    on_cpu = args.target is None or not gpu_target.plugin_installed()
    if "jax" in sys.modules or not on_cpu or args.devices is None:
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={args.devices}"
        + " --xla_backend_optimization_level=0"  # buffer sizes do not depend on it
    )


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxface.plan", description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--devices", type=int, required=True, help="mesh size to plan for")
    parser.add_argument(
        "--memory-gb", type=float, default=None, help="find the largest class count for this"
    )
    parser.add_argument(
        "--target", default=None, help="plan for this GPU (h200, or a spec .txtpb file)"
    )
    parser.add_argument(
        "--hosts", type=int, default=1, help="with --target: the devices split over this many hosts"
    )
    args, rest = parser.parse_known_args(argv)
    from jaxface import gpu_target

    if args.hosts != 1 and not args.target:
        parser.error(f"--hosts {args.hosts} needs --target (the CPU stand-in has no hosts)")

    target = gpu_target.load_target(args.target) if args.target else None
    if target is not None and not gpu_target.plugin_installed():
        print(
            f"jaxface.plan: the CUDA plugin is not installed (pip install -e "
            f"'.[{gpu_target.EXTRA}]'): planning with the CPU stand-in instead of "
            f"{target.device_name}'s own buffer assignment",
            file=sys.stderr,
        )
        memory_default = target.memory_bytes
        target = None
    else:
        memory_default = target.memory_bytes if target is not None else None
    from jaxface.config import derive, load_config, parse_overrides

    cfg = load_config(args.config, parse_overrides(rest))
    hosts = args.hosts if target is not None else 1
    # Each compile of a large step takes tens of seconds on a CPU: say what is happening.
    print(f"compiling the train step for {args.devices} device(s) ...", flush=True)
    mem = step_memory(cfg, args.devices, target, hosts)
    where = f" ({target.device_name}, compile-only)" if target is not None else ""
    if hosts > 1:
        where = f" on {hosts} hosts{where}"
    _print_memory(
        f"{cfg.network}, {cfg.num_classes:,} classes, sample_rate {cfg.sample_rate}, batch "
        f"{cfg.batch_size}/device, {cfg.precision}, {args.devices} devices{where}: per device",
        mem,
    )
    memory_bytes = int(args.memory_gb * 1e9) if args.memory_gb else None
    if memory_bytes is None and args.target and memory_default:
        memory_bytes = memory_default
    if memory_bytes:
        print(
            f"finding the largest class count within {memory_bytes / 1e9:g} GB (three or more "
            "compiles) ...",
            flush=True,
        )
        best, fit = largest_class_count(cfg, args.devices, memory_bytes, target, hosts)
        print(
            f"largest class count within {memory_bytes / 1e9:g} GB per device: {best:,} "
            f"({fit['bytes_per_class'] * args.devices:,.0f} bytes per class over the mesh, "
            f"{fit['fixed_bytes'] / GIB:.2f} GiB fixed; checked: peak "
            f"{fit['peak'] / GIB:.2f} GiB)"
        )
    per_image = _activations_per_image(cfg)
    batch = derive(cfg, args.devices).batch_per_device
    print(
        f"  saved activations {per_image / 2**20:.2f} MiB per image, "
        f"{per_image * batch / GIB:.3f} GiB per device (remat={cfg.remat}; "
        "see jaxface.residuals)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
