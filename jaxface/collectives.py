"""The collectives of one compiled step, read from optimised GPU HLO: what each carries,
its bytes on the wire, whether it overlaps compute, and what communication it leaves
exposed. A compile-time estimate, like `jaxface.hlo_stats` (which it builds on).

The ENTRY computation of a scheduled module lists its instructions in execution order, so
an asynchronous collective (`all-reduce-start` ... `all-reduce-done`, or an `async-start`
wrapping a reduce-scatter) overlaps exactly the kernels listed between its start and its
done. For each collective:

- bytes: its result's (all-reduce: the reduced buffer; all-gather: the gathered one;
  reduce-scatter: its operand, the unscattered buffer);
- bytes on the wire per device for a ring over its group of n devices: 2 (n-1)/n x bytes
  for an all-reduce, (n-1)/n x bytes for an all-gather, reduce-scatter or all-to-all, the
  bytes for a collective-permute;
- time: wire bytes / the link's bandwidth per device and direction (NVLink within a host;
  with several hosts a flat ring is limited by each GPU's network bandwidth);
- exposed: all of it for a synchronous collective; for an asynchronous one what the
  roofline of the kernels between start and done does not cover.

`gradient_overlap` measures how early the gradient all-reduces start: the share of
all-reduce bytes whose start is scheduled before the last backward convolution (the last
cuDNN convolution of the step). DDP starts its first bucket as soon as the backward pass
has filled it; an all-reduce that starts after the last convolution can overlap only the
optimizer.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from jaxface.hlo_stats import (
    _FREE,
    _SHAPE,
    DTYPE_BYTES,
    Computation,
    Instruction,
    Peaks,
    _kernel,
    _operand_bytes,
    parse,
    shape_bytes,
)

# Per GPU and direction. H200 (SXM): NVLink 4, 18 links, 900 GB/s in both directions
# together (NVIDIA H200 data sheet), so 450 GB/s each way.
NVLINK_BYTES_PER_S = {"h200": 450e9}
KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


@dataclass
class Collective:
    name: str
    kind: str
    shape: str  # the result's type, e.g. bf16[14057088]
    bytes: float
    group: int  # devices in each replica group
    asynchronous: bool
    position: int  # its start's index among the step's kernels
    overlap_kernels: int = 0  # kernels scheduled between start and done
    overlap_s: float = 0.0  # their roofline time

    def wire_bytes(self) -> float:
        n = max(self.group, 1)
        if self.kind == "all-reduce":
            return 2 * (n - 1) / n * self.bytes
        if self.kind == "collective-permute":
            return self.bytes
        return (n - 1) / n * self.bytes


def _arrays(shape: str) -> str:
    """`f32[1024,512] + s32[1024]`: the arrays of a type, without layouts."""
    return " + ".join(f"{d}[{dims}]" for d, dims in _SHAPE.findall(shape) if d in DTYPE_BYTES)


def _group_size(inst: Instruction, default: int) -> int:
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]", inst.attrs)  # iota form [groups, size]
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([0-9,\s]*)\}", inst.attrs)
    if m and m.group(1).strip():
        return len(m.group(1).split(","))
    return default


def _collective_of(inst: Instruction, comps: dict[str, Computation]) -> Instruction | None:
    """The collective an instruction starts: itself, or the one its async wrapper calls."""
    base = inst.opcode.removesuffix("-start")
    if base in KINDS:
        return inst
    if inst.opcode == "async-start":
        called = comps.get(inst.attr("calls") or "")
        for sub in called.instructions if called else ():
            if sub.opcode in KINDS:
                return sub
    return None


def _seconds(inst, comp, comps, peaks: Peaks) -> float:
    kind, flops, dtype = _kernel(inst, comp, comps)
    traffic = _operand_bytes(inst, comp, comps) + shape_bytes(inst.shape)
    compute = flops / peaks.flops_for(dtype) if flops else 0.0
    return max(compute, traffic / peaks.bandwidth)


def analyse(text: str, peaks: Peaks, num_devices: int) -> tuple[list[Collective], int | None]:
    """(the step's collectives in schedule order, the position of its last convolution)."""
    comps = parse(text)
    entry = next(c for c in comps.values() if c.entry)
    # The step's kernels in order, with each one's roofline time.
    order: list[tuple[Instruction, float]] = []
    for inst in entry.instructions:
        if inst.opcode in _FREE or inst.opcode.endswith("-done"):
            continue
        order.append((inst, _seconds(inst, entry, comps, peaks)))
    position = {inst.name: i for i, (inst, _) in enumerate(order)}
    done_of = {}
    for inst in entry.instructions:
        if inst.opcode.endswith("-done") and inst.operands:
            done_of[inst.operands[0]] = inst
    last_conv = None
    found = []
    for i, (inst, _) in enumerate(order):
        if _kernel(inst, entry, comps)[0] == "cudnn_conv":
            last_conv = i
        coll = _collective_of(inst, comps)
        if coll is None:
            continue
        kind = coll.opcode.removesuffix("-start")
        done = done_of.get(inst.name)
        asynchronous = done is not None
        if kind == "reduce-scatter":
            result = (
                " ".join(entry.by_name[o].shape for o in inst.operands if o in entry.by_name)
                or coll.shape
            )
        else:
            result = done.shape if done is not None else coll.shape
        found.append(
            Collective(
                inst.name,
                kind,
                _arrays(result),
                shape_bytes(result),
                _group_size(coll, num_devices),
                asynchronous,
                i,
            )  # fmt: skip
        )
        if asynchronous:
            # The done's position: the first kernel after it in the entry's order.
            names = [x.name for x in entry.instructions]
            after = names.index(done.name)
            end = next((position[n] for n in names[after:] if n in position), len(order))
            between = order[i + 1 : end]
            found[-1].overlap_kernels = len(between)
            found[-1].overlap_s = sum(t for _, t in between)
    return found, last_conv


def link_bytes_per_s(target_name: str, hosts: int, network_gbps: float) -> float:
    """Per GPU and direction: NVLink on one host; the network for a ring across hosts."""
    if hosts > 1:
        return network_gbps * 1e9 / 8
    return NVLINK_BYTES_PER_S.get(target_name, 450e9)


def summary(found: list[Collective], last_conv: int | None, bandwidth: float) -> dict:
    """Totals per kind, the communication time and what stays exposed, and the gradient
    all-reduces' start against the last convolution."""
    rows = []
    comm = exposed = 0.0
    for c in found:
        t = c.wire_bytes() / bandwidth
        hidden = min(t, c.overlap_s) if c.asynchronous else 0.0
        comm, exposed = comm + t, exposed + t - hidden
        rows.append(
            {**asdict(c), "wire_bytes": c.wire_bytes(), "time_s": t, "exposed_s": t - hidden}
        )
    reduces = [c for c in found if c.kind == "all-reduce"]
    total = sum(c.bytes for c in reduces)
    early = sum(c.bytes for c in reduces if last_conv is not None and c.position < last_conv)
    return {
        "collectives": rows,
        "count": len(found),
        "bytes": sum(c.bytes for c in found),
        "wire_bytes": sum(c.wire_bytes() for c in found),
        "link_bytes_per_s": bandwidth,
        "comm_ms": 1e3 * comm,
        "exposed_ms": 1e3 * exposed,
        "all_reduce_bytes": total,
        "all_reduce_bytes_before_last_conv": early,
        "gradient_overlap": early / total if total else None,
    }


def format_table(s: dict) -> list[str]:
    """The table compare.profile prints: one row per collective, then the totals."""
    lines = [
        "collectives per device (ring; COMPILE-TIME ESTIMATE):",
        "| # | kind | carries | MB | MB on the wire | async | kernels overlapped (ms) "
        "| time ms | exposed ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(s["collectives"], 1):
        lines.append(
            f"| {i} | {r['kind']} | {r['shape']} | {r['bytes'] / 1e6:.2f} | "
            f"{r['wire_bytes'] / 1e6:.2f} | {'yes' if r['asynchronous'] else 'no'} | "
            f"{r['overlap_kernels']} ({1e3 * r['overlap_s']:.2f}) | {1e3 * r['time_s']:.3f} | "
            f"{1e3 * r['exposed_s']:.3f} |"
        )
    share = s["gradient_overlap"]
    lines.append(
        f"communication {s['comm_ms']:.2f} ms at {s['link_bytes_per_s'] / 1e9:.0f} GB/s per "
        f"device, {s['exposed_ms']:.2f} ms exposed; all-reduce bytes started before the last "
        f"backward convolution: "
        + (f"{100 * share:.0f} %" if share is not None else "no all-reduce")
    )
    return lines
