"""python -m jaxface.plan --config configs/r50.py [--config.KEY=VALUE ...] --devices D
       [--memory-gb G]

Compiles the training step for a D-device mesh without allocating anything (the state and
batch are abstract) and prints XLA's per-device memory analysis; with --memory-gb, also the
largest class count whose step fits that much device memory. Runs on CPU: D virtual
devices stand in for the accelerators. XLA:CPU's buffer assignment is an estimate of a
GPU's (fusion and convolution workspaces differ), good for planning class counts, whose
cost (centres, momentum, gradients, logits) is the same on any backend.
"""

from __future__ import annotations

import argparse
import os
import sys

GIB = 1024**3


def step_memory(cfg, num_devices: int) -> dict[str, int]:
    """Per-device bytes of the compiled train step for `cfg` on `num_devices` devices."""
    # jax is imported here, not at the top: main() must set XLA_FLAGS (the virtual device
    # count) before jax first loads.
    from jaxface.mesh import make_mesh
    from jaxface.setup import build

    run = build(cfg, make_mesh(num_devices))
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


def largest_class_count(cfg, num_devices: int, memory_bytes: int) -> tuple[int, dict]:
    """Memory is affine in the class count: fit it from two compiles, check the answer."""
    c0 = max(cfg.num_classes, 1000 * num_devices)
    c1 = 2 * c0
    m0 = step_memory(cfg.replace(num_classes=c0), num_devices)["peak"]
    m1 = step_memory(cfg.replace(num_classes=c1), num_devices)["peak"]
    per_class = (m1 - m0) / (c1 - c0)
    fixed = m0 - per_class * c0
    best = int((memory_bytes - fixed) / per_class) // num_devices * num_devices
    checked = step_memory(cfg.replace(num_classes=max(best, 1)), num_devices)
    while checked["peak"] > memory_bytes and best > num_devices:  # the fit is an estimate
        best = int(best * 0.98) // num_devices * num_devices
        checked = step_memory(cfg.replace(num_classes=best), num_devices)
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
    parser = argparse.ArgumentParser(prog="python -m jaxface.plan", description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--devices", type=int, required=True, help="mesh size to plan for")
    parser.add_argument(
        "--memory-gb", type=float, default=None, help="find the largest class count for this"
    )
    args, rest = parser.parse_known_args(argv)
    if "jax" not in sys.modules:  # virtual CPU devices, before jax starts
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.devices}"
            + " --xla_backend_optimization_level=0"  # buffer sizes do not depend on it
        )
    from jaxface.config import ConfigError, derive, load_config, parse_overrides
    from jaxface.mesh import MeshError

    try:
        cfg = load_config(args.config, parse_overrides(rest))
        mem = step_memory(cfg, args.devices)
        _print_memory(
            f"{cfg.network}, {cfg.num_classes:,} classes, sample_rate {cfg.sample_rate}, batch "
            f"{cfg.batch_size}/device, {cfg.precision}, {args.devices} devices: per device",
            mem,
        )
        per_image = _activations_per_image(cfg)
        batch = derive(cfg, args.devices).batch_per_device
        print(
            f"  saved activations {per_image / 2**20:.2f} MiB per image, "
            f"{per_image * batch / GIB:.3f} GiB per device (remat={cfg.remat}; "
            "see jaxface.residuals)"
        )
        if args.memory_gb:
            best, fit = largest_class_count(cfg, args.devices, int(args.memory_gb * 1e9))
            print(
                f"largest class count within {args.memory_gb:g} GB per device: {best:,} "
                f"({fit['bytes_per_class'] * args.devices:,.0f} bytes per class over the mesh, "
                f"{fit['fixed_bytes'] / GIB:.2f} GiB fixed; checked: peak "
                f"{fit['peak'] / GIB:.2f} GiB)"
            )
    except (ConfigError, MeshError) as exc:
        print(f"jaxface.plan: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
