"""Kernels, HBM traffic and a roofline estimate of one step, read from optimised GPU HLO.

The text is what `compiled.as_text()` gives after XLA:GPU's passes (fusion, cuDNN and cuBLAS
rewrites, scheduling). The counting rules, the same as the issue that asked for this:

- every top-level instruction of the ENTRY computation that launches work is one kernel: a
  fusion, a custom-call (cuDNN convolution, cuBLAS GEMM, ...), a copy, a transpose, a
  collective, any other op that is not bookkeeping (parameter, constant, tuple,
  get-tuple-element, bitcast, the `-done` half of an async pair, ...);
- a while loop contributes its body's kernels times its known trip count (and its
  condition's times trip count + 1); a `call` or an async wrapper contributes what it calls;
  a conditional its largest branch;
- a kernel's HBM traffic is the bytes of its operands plus the bytes of its result;
- its time is max(FLOPs / peak FLOP/s, bytes / bandwidth) (a roofline), FLOPs counted for
  convolutions and dots only (everything else is bandwidth-bound on a GPU), at the
  matrix-unit rate of the operands' dtype.

It is a compile-time estimate: no autotuning, no measured kernel times, no overlap, no
caches. Launch gaps are not in the roofline; `Stats.overhead_ms` adds a fixed cost per
kernel for the cost of many small kernels.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field

# Bytes per element of each HLO element type.
DTYPE_BYTES = {
    "pred": 1,
    "s2": 0.25,
    "u2": 0.25,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
    "token": 0,
}
# f8 and f4 variants: one byte (or half).
_SHAPE = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,<=?\s]*)\]")

# The kinds a kernel is counted as, in the order they are printed.
KINDS = (
    "cudnn_conv",
    "gemm",
    "reduction_fusion",
    "loop_fusion",
    "other_fusion",
    "copy",
    "transpose",
    "collective",
    "pallas",
    "other",
)
KIND_TITLES = {
    "cudnn_conv": "cuDNN convolutions",
    "gemm": "GEMMs",
    "reduction_fusion": "reduction fusions",
    "loop_fusion": "loop fusions",
    "other_fusion": "other fusions",
    "copy": "copies",
    "transpose": "transposes (and transpose fusions)",
    "collective": "collectives",
    "other": "other",
    "pallas": "Pallas kernels",
}
# Instructions that launch nothing.
_FREE = {
    "parameter",
    "constant",
    "tuple",
    "get-tuple-element",
    "bitcast",
    "after-all",
    "add-dependency",
    "opt-barrier",
    "domain",
    "partition-id",
    "replica-id",
    "iota-free",
}
# Instructions that read several elements of an operand per output element: a loop fusion
# holding one of them is not capped at its output's size.
_MANY_TO_ONE = {
    "reduce",
    "reduce-window",
    "dot",
    "convolution",
    "sort",
    "scatter",
    "custom-call",
    "select-and-scatter",
    "fft",
    "cholesky",
    "triangular-solve",
}

_COLLECTIVES = {
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
    "collective-broadcast",
    "ragged-all-to-all",
}
# HLO PrimitiveType numbers (xla_data.proto): the keys of a GpuTargetConfigProto's rates.
PRIMITIVE_TYPE = {
    "s8": 2,
    "s16": 3,
    "s32": 4,
    "u8": 6,
    "u32": 8,
    "f16": 10,
    "f32": 11,
    "f64": 12,
    "bf16": 16,
    "f8e5m2": 19,
    "f8e4m3fn": 20,
}


class HloParseError(ValueError):
    """The text is not optimised HLO this module can read."""


@dataclass
class Instruction:
    name: str
    shape: str  # the result's type text, a tuple "(...)" or one array
    opcode: str
    operands: list[str]
    attrs: str  # everything after the operand list
    index: int | None = None  # a parameter's number

    def attr(self, key: str) -> str | None:
        m = re.search(rf"\b{key}=(%?[\w.\-$]+)", self.attrs)
        return m.group(1).lstrip("%") if m else None


@dataclass
class Computation:
    name: str
    entry: bool
    instructions: list[Instruction] = field(default_factory=list)
    by_name: dict[str, Instruction] = field(default_factory=dict)


@dataclass(frozen=True)
class Peaks:
    """What the roofline divides by: bytes/s of device memory, FLOP/s by operand dtype."""

    bandwidth: float  # bytes/s
    matrix_flops: dict  # HLO dtype name -> FLOP/s on the matrix (tensor) units
    scalar_flops: float  # FLOP/s of float32 on the CUDA cores, the fallback

    def flops_for(self, dtype: str) -> float:
        return self.matrix_flops.get(dtype, self.scalar_flops)


@dataclass
class Kernel:
    kind: str
    name: str
    bytes: float
    flops: float
    times: int  # launches per step (trip counts of the loops around it)
    peak: float = 0.0  # FLOP/s at which its FLOPs run (0: no FLOPs counted)
    written: float = 0.0  # bytes of its result alone


@dataclass
class Stats:
    kernels: list[Kernel]
    unknown_trip_counts: int = 0

    def count(self) -> int:
        return sum(k.times for k in self.kernels)

    def by_kind(self) -> dict[str, int]:
        c = Counter()
        for k in self.kernels:
            c[k.kind] += k.times
        return {kind: c[kind] for kind in KINDS if c[kind]}

    def traffic(self) -> float:
        """HBM bytes per step: operands + results of every kernel launch."""
        return sum(k.bytes * k.times for k in self.kernels)

    def flops(self) -> float:
        return sum(k.flops * k.times for k in self.kernels)

    def roofline_s(self, peaks: Peaks) -> float:
        """Sum over kernels of max(FLOPs / peak, bytes / bandwidth), in seconds."""
        total = 0.0
        for k in self.kernels:
            compute = k.flops / k.peak if k.flops and k.peak else 0.0
            total += k.times * max(compute, k.bytes / peaks.bandwidth)
        return total

    def largest(self, n: int = 10) -> list[Kernel]:
        return sorted(self.kernels, key=lambda k: -k.bytes * k.times)[:n]


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO type text: an array `f32[8,128]{1,0}` or a tuple of them."""
    total = 0.0
    for dtype, dims in _SHAPE.findall(shape):
        size = DTYPE_BYTES.get(dtype)
        if size is None:
            size = 0.5 if dtype.startswith("f4") else 1 if dtype.startswith("f8") else None
        if size is None:
            continue  # not a type (an attribute that looks like one)
        total += size * _elements(dims)
    return total


def _elements(dims: str) -> int:
    n = 1
    for d in dims.split(","):
        d = d.strip().replace("<=", "")
        if d and d != "?":
            n *= int(d)
    return n


def _dims(shape: str) -> list[int]:
    m = _SHAPE.search(shape)
    if not m:
        return []
    return [int(d.strip().replace("<=", "")) for d in m.group(2).split(",") if d.strip()]


def _dtype(shape: str) -> str:
    m = _SHAPE.search(shape)
    return m.group(1) if m else ""


def _first_array(shape: str) -> str:
    """The first array of a tuple type (a cuDNN call returns (result, workspace))."""
    m = _SHAPE.search(shape)
    return m.group(0) if m else shape


def _matching(text: str, start: int) -> int:
    """Index just past the bracket that closes the one at `start`."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    i = start
    in_str = False
    while i < len(text):
        ch = text[i]
        if in_str:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in pairs:
            stack.append(pairs[ch])
        elif stack and ch == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
        i += 1
    raise HloParseError(f"unbalanced brackets in: {text[:120]}")


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*[\s(]")


def _parse_instruction(line: str) -> Instruction | None:
    m = _INSTR.match(line)
    if not m:
        return None
    name, rest = m.group(1), line[m.end() :]
    if rest.startswith("("):
        end = _matching(rest, 0)
    else:
        end = rest.index(" ") if " " in rest else len(rest)  # layouts hold no spaces
    shape, rest = rest[:end], rest[end:].lstrip()
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    close = _matching(rest, op.end() - 1)
    operands = re.findall(r"%([\w.\-]+)", rest[op.end() : close - 1])
    index = None
    if op.group(1) == "parameter":
        number = rest[op.end() : close - 1].strip()
        index = int(number) if number.isdigit() else None
    return Instruction(name, shape, op.group(1), operands, rest[close:], index)


def parse(text: str) -> dict[str, Computation]:
    """Computations of an HLO module's text by name; the entry one has `entry` set."""
    comps: dict[str, Computation] = {}
    current: Computation | None = None
    for line in text.splitlines():
        if current is None:
            stripped = line.rstrip()
            if stripped.endswith("{") and not line.startswith((" ", "\t", "HloModule")):
                m = _HEADER.match(line)
                if m:
                    current = Computation(m.group(2), bool(m.group(1)))
            continue
        if line.strip() == "}":
            comps[current.name] = current
            current = None
            continue
        inst = _parse_instruction(line)
        if inst is not None:
            current.instructions.append(inst)
            current.by_name[inst.name] = inst
    if not any(c.entry for c in comps.values()):
        raise HloParseError("no ENTRY computation: not the text of an HLO module")
    return comps


def _trip_count(inst: Instruction) -> int | None:
    m = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)', inst.attrs)
    return int(m.group(1)) if m else None


def _conv_flops(inst: Instruction, comp: Computation, backward: str | None) -> float:
    """2 x output elements x filter elements / output features, for the forward conv the
    instruction computes or differentiates (cuDNN's backward calls swap the roles)."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", inst.attrs)
    shapes = [comp.by_name[o].shape if o in comp.by_name else "" for o in inst.operands]
    result = _first_array(inst.shape)
    if backward == "input":  # operands (dy, w), result dx
        y, w = shapes[0], shapes[1] if len(shapes) > 1 else ""
    elif backward == "filter":  # operands (x, dy), result dw
        y, w = shapes[1] if len(shapes) > 1 else "", result
    else:  # operands (x, w), result y
        y, w = result, shapes[1] if len(shapes) > 1 else ""
    w_dims = _dims(w)
    if not labels or not w_dims:
        return 0.0
    rhs = labels.group(2)
    out_features = w_dims[rhs.index("o")] if "o" in rhs and len(rhs) == len(w_dims) else 1
    return 2.0 * _elements(",".join(map(str, _dims(y)))) * math.prod(w_dims) / out_features


def _dot_flops(inst: Instruction, comp: Computation, dims_json: dict | None = None) -> float:
    """2 x result elements x contracted size."""
    lhs = comp.by_name.get(inst.operands[0]) if inst.operands else None
    if lhs is None:
        return 0.0
    if dims_json is not None:
        contracting = [int(d) for d in dims_json.get("lhs_contracting_dimensions", [])]
    else:
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.attrs)
        contracting = [int(d) for d in m.group(1).split(",") if d] if m else []
    lhs_dims = _dims(lhs.shape)
    k = math.prod(lhs_dims[d] for d in contracting if d < len(lhs_dims))
    return 2.0 * _elements(",".join(map(str, _dims(_first_array(inst.shape))))) * k


def _backend_config(inst: Instruction) -> dict:
    i = inst.attrs.find("backend_config=")
    if i < 0:
        return {}
    start = i + len("backend_config=")
    if start >= len(inst.attrs) or inst.attrs[start] != "{":
        return {}
    try:
        return json.loads(inst.attrs[start : _matching(inst.attrs, start)])
    except (json.JSONDecodeError, HloParseError):
        return {}


def _inner_flops(comps: dict[str, Computation], name: str | None) -> tuple[float, str]:
    """FLOPs and operand dtype of the dots and convolutions inside a fused computation."""
    comp = comps.get(name or "")
    if comp is None:
        return 0.0, ""
    flops, dtype = 0.0, ""
    for inst in comp.instructions:
        if inst.opcode == "dot":
            flops += _dot_flops(inst, comp)
        elif inst.opcode == "convolution":
            flops += _conv_flops(inst, comp, None)
        else:
            continue
        lhs = comp.by_name.get(inst.operands[0]) if inst.operands else None
        dtype = dtype or (_dtype(lhs.shape) if lhs else "")
    return flops, dtype


def _contains(comps: dict[str, Computation], name: str | None, opcode: str) -> bool:
    comp = comps.get(name or "")
    return comp is not None and any(i.opcode == opcode for i in comp.instructions)


def _operand_bytes(inst: Instruction, comp: Computation, comps: dict[str, Computation]) -> float:
    """Bytes a kernel reads: each operand's size, capped for an elementwise loop fusion.

    A loop fusion without reductions computes each output element from at most one element
    of each operand, so it reads at most (its output elements) x (the operand's element size)
    of an operand: a split of a flat vector into parts reads each part, not the whole vector
    once per part."""
    cap = None
    fused = comps.get(inst.attr("calls") or "") if inst.opcode == "fusion" else None
    touched = _touched_rows(fused) if fused is not None else {}
    # A gather reads one operand element per output element, as an elementwise loop does.
    elementwise = fused is not None and (
        inst.attr("kind") == "kLoop" or any(i.opcode == "gather" for i in fused.instructions)
    )
    if elementwise and not any(i.opcode in _MANY_TO_ONE for i in fused.instructions):
        cap = _array_elements(inst.shape)
    total = 0.0
    for number, name in enumerate(inst.operands):
        if name in comp.by_name:
            shape = comp.by_name[name].shape
            full = shape_bytes(shape)
            elements = _array_elements(shape)
            if cap is not None and elements > cap:
                full *= cap / elements
            total += min(full, touched.get(number, full))
    return total


def _touched_rows(fused: Computation) -> dict[int, float]:
    """Fusion parameters (by number) read only through gathers, or written only through
    scatters: the bytes each really moves (the gathered rows; the scattered updates), not
    its whole size. A Partial FC head gathers and updates a tenth of a 2.56 GB block."""
    users: dict[str, list[tuple[Instruction, int]]] = {}
    for inst in fused.instructions:
        for position, name in enumerate(inst.operands):
            users.setdefault(name, []).append((inst, position))
    touched = {}
    for param in fused.instructions:
        if param.opcode != "parameter" or param.index is None:
            continue
        uses = users.get(param.name, [])
        if uses and all(u.opcode == "gather" and pos == 0 for u, pos in uses):
            touched[param.index] = sum(shape_bytes(u.shape) for u, _ in uses)
        elif uses and all(u.opcode == "scatter" and pos == 0 for u, pos in uses):
            # scatter(operand, indices, updates): the rows of the updates
            touched[param.index] = sum(
                shape_bytes(fused.by_name[u.operands[-1]].shape)
                for u, _ in uses
                if u.operands[-1] in fused.by_name
            )
    return touched


def scatter_written_bytes(inst: Instruction, comps: dict[str, Computation]) -> float | None:
    """Bytes a fusion whose result is a scatter writes: the rows its updates cover (the
    rest of the buffer is updated in place, untouched); None for any other kernel."""
    fused = comps.get(inst.attr("calls") or "") if inst.opcode == "fusion" else None
    if fused is None or not fused.instructions:
        return None
    root = fused.instructions[-1]
    if root.opcode != "scatter" or root.operands[-1] not in fused.by_name:
        return None
    return shape_bytes(fused.by_name[root.operands[-1]].shape)


def _array_elements(shape: str) -> int:
    return sum(_elements(dims) for _, dims in _SHAPE.findall(shape))


def _kernel(
    inst: Instruction, comp: Computation, comps: dict[str, Computation]
) -> tuple[str, float, str]:
    """(kind, FLOPs, operand dtype) of one kernel-launching instruction."""
    op = inst.opcode
    if op == "fusion":
        called = inst.attr("calls")
        kind_attr = inst.attr("kind") or ""
        flops, dtype = _inner_flops(comps, called)
        config = json.dumps(_backend_config(inst))
        if _contains(comps, called, "convolution") or "cudnn" in config and "conv" in config:
            return "cudnn_conv", flops, dtype
        if _contains(comps, called, "dot") or "gemm" in config:
            return "gemm", flops, dtype
        if kind_attr == "kInput":
            if _contains(comps, called, "reduce") or not _contains(comps, called, "transpose"):
                return "reduction_fusion", flops, dtype
            return "transpose", flops, dtype  # a tiled transpose, maybe with outputs
        if kind_attr == "kLoop":
            return "loop_fusion", flops, dtype
        return "other_fusion", flops, dtype
    if op == "custom-call":
        target = inst.attr("custom_call_target") or ""
        m = re.search(r'custom_call_target="([^"]+)"', inst.attrs)
        target = m.group(1) if m else target
        if "cudnn$conv" in target:
            backward = None
            if "BackwardInput" in target:
                backward = "input"
            elif "BackwardFilter" in target:
                backward = "filter"
            x = comp.by_name.get(inst.operands[0]) if inst.operands else None
            return "cudnn_conv", _conv_flops(inst, comp, backward), _dtype(x.shape) if x else ""
        if target == "__gpu$xla.gpu.triton":  # a Pallas kernel (its FLOPs are not counted)
            return "pallas", 0.0, ""
        if "gemm" in target or "matmul" in target:
            config = _backend_config(inst)
            dims = config.get("gemm_backend_config", config).get("dot_dimension_numbers", {})
            x = comp.by_name.get(inst.operands[0]) if inst.operands else None
            return "gemm", _dot_flops(inst, comp, dims), _dtype(x.shape) if x else ""
        return "other", 0.0, ""
    if op in ("copy", "copy-start"):
        return "copy", 0.0, ""
    if op == "transpose":
        return "transpose", 0.0, ""
    base = op.removesuffix("-start")
    if base in _COLLECTIVES:
        return "collective", 0.0, ""
    if op == "convolution":
        x = comp.by_name.get(inst.operands[0]) if inst.operands else None
        return "cudnn_conv", _conv_flops(inst, comp, None), _dtype(x.shape) if x else ""
    if op == "dot":
        x = comp.by_name.get(inst.operands[0]) if inst.operands else None
        return "gemm", _dot_flops(inst, comp), _dtype(x.shape) if x else ""
    return "other", 0.0, ""


def analyse(text: str, peaks: Peaks | None = None) -> Stats:
    """Kernels of the ENTRY computation, loops unrolled by their trip counts."""
    comps = parse(text)
    entry = next(c for c in comps.values() if c.entry)
    stats = Stats([])
    _walk(entry, comps, 1, stats, peaks, depth=0)
    return stats


def _walk(comp, comps, times, stats, peaks, depth):
    if depth > 64:
        raise HloParseError("computations nest deeper than 64 levels")
    for inst in comp.instructions:
        op = inst.opcode
        if op in _FREE or op.endswith("-done"):
            continue
        if op == "while":
            n = _trip_count(inst)
            if n is None:
                stats.unknown_trip_counts += 1
                n = 1
            for key, extra in (("body", 0), ("condition", 1)):
                called = comps.get(inst.attr(key) or "")
                if called is not None:
                    _walk(called, comps, times * (n + extra), stats, peaks, depth + 1)
            continue
        if op in ("call", "async-start"):
            called = comps.get(inst.attr("calls") or inst.attr("to_apply") or "")
            if called is not None:
                _walk(called, comps, times, stats, peaks, depth + 1)
                continue
        if op == "conditional":
            names = re.findall(r"%([\w.\-]+)", _branch_list(inst))
            best = None
            for name in names:
                sub = Stats([])
                if name in comps:
                    _walk(comps[name], comps, times, sub, peaks, depth + 1)
                if best is None or sub.traffic() > best.traffic():
                    best = sub
            if best is not None:
                stats.kernels.extend(best.kernels)
            continue
        kind, flops, dtype = _kernel(inst, comp, comps)
        written = scatter_written_bytes(inst, comps)
        written = shape_bytes(inst.shape) if written is None else written
        traffic = _operand_bytes(inst, comp, comps) + written
        peak = peaks.flops_for(dtype) if peaks else 0.0
        stats.kernels.append(Kernel(kind, inst.name, traffic, flops, times, peak, written))


def _branch_list(inst: Instruction) -> str:
    m = re.search(r"branch_computations=\{([^}]*)\}", inst.attrs)
    if m:
        return m.group(1)
    return " ".join(
        f"%{inst.attr(k)}" for k in ("true_computation", "false_computation") if inst.attr(k)
    )


def summary(
    stats: Stats,
    peaks: Peaks,
    global_batch: int,
    overhead_us: float = 0.0,
    exposed_comm_s: float = 0.0,
) -> dict:
    """The numbers `compare.profile --target` prints and writes, as one dict.
    `exposed_comm_s`: communication not hidden behind compute (jaxface.collectives)."""
    roofline = stats.roofline_s(peaks)
    launch = stats.count() * overhead_us * 1e-6
    step = roofline + launch + exposed_comm_s
    return {
        "kernels": stats.count(),
        "kernels_by_kind": stats.by_kind(),
        "hbm_bytes": stats.traffic(),  # operands + results of every launch
        "hbm_bytes_written": sum(k.written * k.times for k in stats.kernels),
        "matmul_conv_flops": stats.flops(),
        "roofline_ms": 1e3 * roofline,
        "overhead_us_per_kernel": overhead_us,
        "exposed_comm_ms": 1e3 * exposed_comm_s,
        "estimated_ms": 1e3 * step,
        "estimated_samples_per_s": global_batch / step if step else None,
        "unknown_trip_counts": stats.unknown_trip_counts,
        "peak_bandwidth": peaks.bandwidth,
        "peak_matrix_flops": peaks.matrix_flops,
    }


def format_summary(s: dict, goal_samples_per_s: float | None = None) -> list[str]:
    kinds = ", ".join(f"{KIND_TITLES[k]} {v:,}" for k, v in s["kernels_by_kind"].items())
    lines = [
        f"kernels per step: {s['kernels']:,} ({kinds})",
        f"HBM traffic per step: {s['hbm_bytes'] / 1e9:.2f} GB read + written "
        f"({s['hbm_bytes_written'] / 1e9:.2f} GB written); "
        f"conv/matmul {s['matmul_conv_flops'] / 1e12:.2f} TFLOP",
        f"roofline (per kernel max(FLOPs / peak, bytes / {s['peak_bandwidth'] / 1e12:.1f} TB/s),"
        f" summed): {s['roofline_ms']:.2f} ms/step",
    ]
    rate = s["estimated_samples_per_s"]
    goal = f" (goal {goal_samples_per_s:,.0f})" if goal_samples_per_s else ""
    extras = []
    if s["overhead_us_per_kernel"]:
        extras.append(f"{s['overhead_us_per_kernel']:g} us per kernel launch")
    if s.get("exposed_comm_ms"):
        extras.append(f"{s['exposed_comm_ms']:.2f} ms of exposed communication")
    overhead = f" with {' and '.join(extras)}" if extras else ""
    lines.append(
        f"predicted{overhead}: {s['estimated_ms']:.2f} ms/step, {rate:,.0f} samples/s{goal}"
        if rate
        else "predicted: n/a"
    )
    if s["unknown_trip_counts"]:
        lines.append(f"{s['unknown_trip_counts']} while loop(s) of unknown trip count counted once")
    return lines
