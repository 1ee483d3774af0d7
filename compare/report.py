"""The comparison as a markdown table laid out like the published ones, JSON, and a chart."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, and before pyplot picks a GUI backend
import matplotlib.pyplot as plt  # noqa: E402

from compare.variants import COLUMNS  # noqa: E402

FLAVOURS = ("jax", "stock", "tuned")
HEADERS = {"jax": "jaxface", "stock": "torch stock", "tuned": "torch tuned"}


def _cell(row: dict | None, brief: bool = False) -> str:
    if row is None:
        return "-"
    if "error" in row:
        return "failed" if brief else f"failed: {row['error'][:160]}"
    if "skipped" in row:
        return "skipped" if brief else f"skipped: {row['skipped']}"
    return f"{row['samples_per_s']:,.0f}"


def _groups(rows: list[dict]) -> dict:
    """(network, batch, precision) -> {flavour: row}, in the order the rows ran."""
    groups: dict = {}
    for row in rows:
        key = (row["network"], row["batch"], row["precision"])
        groups.setdefault(key, {})[row["flavour"]] = row
    return groups


def _ratio(group: dict) -> str:
    ok = {f: r for f, r in group.items() if "samples_per_s" in r}
    torch = [ok[f]["samples_per_s"] for f in ("stock", "tuned") if f in ok]
    if "jax" not in ok or not torch:
        return "-"
    return f"{ok['jax']['samples_per_s'] / max(torch):.2f}x"


def markdown(meta: dict, rows: list[dict]) -> str:
    """Samples/s per framework in the published layout, then the details of every row."""
    flavours = [f for f in FLAVOURS if any(r["flavour"] == f for r in rows)]
    lines = [
        "| Dataset | Classes | Backbone | Batch-size | FP16 | TF32 | "
        + " | ".join(f"{HEADERS[f]} samples/s" for f in flavours)
        + " | jax / best torch |",
        "|" + "---|" * (7 + len(flavours)),
    ]
    for (network, batch, precision), group in _groups(rows).items():
        _, _, fp16, tf32 = COLUMNS[precision]
        first = next(iter(group.values()))
        cells = [
            first["dataset"],
            f"{first['num_classes']:,}",
            network,
            str(batch * first["devices"]),
            fp16,
            tf32,
        ]
        cells += [_cell(group.get(f), brief=True) for f in flavours] + [_ratio(group)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Data: {meta['data_note']}." if meta.get("data_note") else "",
        "",
        "| row | device | samples/s | ms/step (median) | peak memory | MFU |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        name = (
            f"{row['network']} {HEADERS[row['flavour']]}, {row['precision']}, batch {row['batch']}"
        )
        if "samples_per_s" not in row:
            lines.append(f"| {name} | {row.get('device', '-')} | {_cell(row)} | - | - | - |")
            continue
        memory = row.get("peak_memory_bytes")
        memory = f"{memory / 1e9:.1f} GB" if memory else "n/a (CPU)"
        mfu = f"{100 * row['mfu']:.1f} %" if row.get("mfu") is not None else "n/a"
        lines.append(
            f"| {name} | {row['device']} | {row['samples_per_s']:,.0f} | "
            f"{row['ms_per_step']:.1f} | {memory} | {mfu} |"
        )
    return "\n".join(lines) + "\n"


def chart(meta: dict, rows: list[dict], path: Path) -> None:
    """Grouped bars: samples/s per (precision, batch) for each framework."""
    groups = _groups(rows)
    flavours = [f for f in FLAVOURS if any(r["flavour"] == f for r in rows)]
    width = 0.8 / max(1, len(flavours))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    for i, flavour in enumerate(flavours):
        values = [g.get(flavour, {}).get("samples_per_s", 0.0) for g in groups.values()]
        xs = [k + (i - (len(flavours) - 1) / 2) * width for k in range(len(groups))]
        bars = ax.bar(xs, values, width, label=HEADERS[flavour])
        for bar, value in zip(bars, values, strict=True):
            label = f"{value:,.0f}" if value else "n/a"
            ax.annotate(
                label,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    labels = [f"{n} {p}\nbatch {b * meta['devices']}" for n, b, p in groups]
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("samples/s")
    networks = sorted({n for n, _, _ in groups})
    ax.set_title(f"{', '.join(networks)}: {meta['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(out: Path, meta: dict, rows: list[dict]) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"table": out / "table.md", "json": out / "results.json", "chart": out / "chart.png"}
    paths["table"].write_text(markdown(meta, rows))
    paths["json"].write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    chart(meta, rows, paths["chart"])
    return paths
