"""Compiling for an NVIDIA GPU on a machine that has none.

XLA:GPU compiles for a GPU it is told about: a `GpuTargetConfigProto` (text format; XLA
ships one per GPU model under xla/backends/gpu/target_config/specs) gives the device's
numbers, `jax.experimental.topologies.get_topology_desc` turns it into compile-only
devices, and a mesh of those devices goes through `jaxface.setup.build` like any other.
Nothing runs: there is no autotuning (XLA picks its default kernels), `cost_analysis()`
returns None, and no time is measured. What comes out is the optimised HLO and XLA's
buffer assignment (`memory_analysis()`), which `jaxface.hlo_stats` reads.

Needs the CUDA plugin and the compiler's own tools: `pip install -e '.[gpu-compile]'`
(no driver, no GPU). `JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1` is set before the plugin starts,
as it otherwise refuses to start without a driver.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from jaxface.hlo_stats import PRIMITIVE_TYPE, Peaks

# Known targets: name -> spec file shipped in jaxface/gpu_specs.
TARGETS = {"h200": "h200.txtpb"}
EXTRA = "gpu-compile"
PLUGIN_MODULE = "jax_plugins.xla_cuda13"


class TargetError(ValueError):
    """The target cannot be compiled for here: unknown, plugin missing, spec rejected."""


@dataclass(frozen=True)
class Target:
    name: str  # "h200", or the path of a spec file
    spec: str  # GpuTargetConfigProto text
    device_name: str  # e.g. "NVIDIA H200 141GB HBM3e"

    @property
    def peaks(self) -> Peaks:
        return spec_peaks(self.spec)

    @property
    def memory_bytes(self) -> int | None:
        m = re.search(r"device_memory_size:\s*(\d+)", self.spec)
        return int(m.group(1)) if m else None


def known() -> str:
    return ", ".join(sorted(TARGETS))


def load_target(name: str) -> Target:
    """A known target by name, or a GpuTargetConfigProto text file by path."""
    if name.lower() in TARGETS:
        spec = resources.files("jaxface.gpu_specs").joinpath(TARGETS[name.lower()]).read_text()
        name = name.lower()
    elif name.endswith((".txtpb", ".pbtxt", ".textproto")) and Path(name).is_file():
        spec = Path(name).read_text()
    else:
        raise TargetError(
            f"unknown GPU target {name!r}: known targets are {known()} "
            "(or the path of a GpuTargetConfigProto .txtpb file)"
        )
    m = re.search(r'^\s*name:\s*"([^"]+)"', spec, re.MULTILINE)
    return Target(name, spec, m.group(1) if m else name)


def spec_peaks(spec: str) -> Peaks:
    """Memory bandwidth and peak FLOP/s from a spec's numbers.

    A rate_info is units_per_core x ops_per_clock fused multiply-adds per clock (2 FLOPs)
    at clock_rate_ghz on each of core_count cores; keys are HLO PrimitiveType numbers."""

    def number(key: str) -> float:
        m = re.search(rf"\b{key}:\s*([0-9.e+]+)", spec)
        if not m:
            raise TargetError(f"GPU spec has no {key}")
        return float(m.group(1))

    cores = number("core_count")

    def rates(block: str) -> dict[int, float]:
        m = re.search(rf"{block}\s*\{{(.*?)\n\s*\}}", spec, re.DOTALL)
        out = {}
        for key, clock, units, ops in re.findall(
            r"key:\s*(\d+)\s+value\s*\{\s*clock_rate_ghz:\s*([0-9.]+)\s+units_per_core:\s*(\d+)"
            r"\s+ops_per_clock:\s*(\d+)",
            m.group(1) if m else "",
        ):
            out[int(key)] = 2 * float(clock) * 1e9 * int(units) * int(ops) * cores
        return out

    matrix = rates("matrix_unit_description")
    scalar = rates("scalar_unit_description")
    f32 = PRIMITIVE_TYPE["f32"]
    scalar_f32 = (
        scalar.get(f32) or 2 * number("clock_rate_ghz") * 1e9 * number("fpus_per_core") * cores
    )
    by_dtype = {name: matrix[key] for name, key in PRIMITIVE_TYPE.items() if key in matrix}
    return Peaks(number("memory_bandwidth"), by_dtype, scalar_f32)


def plugin_installed() -> bool:
    try:
        return importlib.util.find_spec(PLUGIN_MODULE) is not None
    except ModuleNotFoundError:
        return False


def devices(target: Target, num_devices: int = 1, hosts: int = 1) -> list:
    """`num_devices` compile-only devices of the target, on `hosts` hosts of
    num_devices / hosts each."""
    if hosts < 1 or num_devices % hosts:
        raise TargetError(
            f"--devices {num_devices} cannot be split over --hosts {hosts}: give a device "
            "count that is a multiple of the host count"
        )
    if not plugin_installed():
        raise TargetError(
            f"compiling for {target.name} needs the CUDA plugin and compiler: "
            f"pip install -e '.[{EXTRA}]'"
        )
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    from jax.experimental import topologies

    try:
        with _stderr_to(tempfile.TemporaryFile(mode="w+")) as log:
            topo = topologies.get_topology_desc(
                platform="cuda",
                topology=f"{hosts}x1x{num_devices // hosts}",
                target_config=target.spec,
            )
    except Exception as exc:  # noqa: BLE001 - jaxlib's own error type varies by version
        log.seek(0)
        detail = _parse_error(log.read()) or str(exc).splitlines()[0]
        raise TargetError(
            f"the installed jaxlib rejects the spec of {target.name}: {detail}"
        ) from None
    return list(topo.devices)


def mesh(target: Target, num_devices: int = 1, hosts: int = 1):
    """The trainer's 1-D mesh, over compile-only devices of `target` on `hosts` hosts."""
    import numpy as np
    from jax.sharding import Mesh

    from jaxface.mesh import DATA_AXIS

    return Mesh(np.array(devices(target, num_devices, hosts)), (DATA_AXIS,))


def _parse_error(log: str) -> str | None:
    """The text-format parser's message (line:column and the field it rejects)."""
    m = re.search(r"Error parsing text-format \S+: (.*)", log)
    return m.group(1).strip() if m else None


class _stderr_to:
    """Redirect file descriptor 2 (where XLA's C++ logs go) into `file` for a while."""

    def __init__(self, file):
        self.file = file

    def __enter__(self):
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        return self.file

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        return False
