"""python -m compare.converge's table (markdown), results (JSON) and chart (PNG)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, and before pyplot picks a GUI backend
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from compare.converge_stats import EARLY_STEPS, NAMES, TOLERANCE  # noqa: E402
from jaxface.fileio import atomic_write  # noqa: E402

TITLES = {"fp32": "fp32 against fp32", "bf16": "jaxface bf16 against torchref fp16 + GradScaler"}


def _pct(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.2f} %"


def _pp(x: float | None) -> str:
    """A difference of accuracies, in percentage points."""
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:+.2f} pp"


def _num(x: float | None, digits: int = 4) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _sci(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.1e}"


def draws_note(meta: dict) -> list[str]:
    """Where the two frameworks draw random numbers differently, and what the tool does."""
    notes = [
        "Data: one host loader for both (jaxface.data.training.make_loader): the same "
        "batches in the same order, the same flips"
        + (
            " and augmentations"
            if meta["augment"]["augment"] or meta["augment"]["adaface_augment"]
            else ""
        )
        + "; the second seed changes the initial weights and each framework's own draws, "
        "not the data.",
        "Initial weights: jaxface's initialisation of each seed, converted to arcface_torch's "
        "state dict (jaxface.convert), backbone and class centres.",
    ]
    if meta["sample_rate"] < 1:
        if meta["draws"] == "shared":
            notes.append(
                f"Partial FC sampling (sample_rate {meta['sample_rate']:g}): torchref scores "
                "the classes jaxface sampled at each step (--draws shared)."
            )
        else:
            notes.append(
                f"Partial FC sampling (sample_rate {meta['sample_rate']:g}): each framework "
                "draws its own classes (--draws own), so the curves part from step 1; "
                "compare them against the two-seed spread."
            )
    if meta["dropout"] > 0:
        notes.append(
            f"Dropout ({meta['dropout']:g}): each framework draws its own masks, so the "
            "curves part from step 1; compare them against the two-seed spread."
        )
    if meta["loss"].startswith("elasticface"):
        notes.append("ElasticFace's random margins: each framework draws its own.")
    return notes


def markdown(report: dict) -> str:
    meta, runs = report["meta"], report["runs"]
    targets = meta["val_targets"]
    lines = [
        f"{meta['network']}, {meta['num_classes']:,} classes, {meta['num_image']:,} images, "
        f"global batch {meta['global_batch']}, {meta['steps']} steps; "
        f"{meta['device']}; wall time {meta['wall_s'] / 60:.1f} min for {len(runs)} runs.",
        "",
        "| run | final loss | "
        + "".join(f"{t} accuracy | " for t in targets)
        + "skipped steps | samples/s | time |",
        "|---|---|" + "---|" * len(targets) + "---|---|---|",
    ]
    for run in runs.values():
        acc = "".join(f"{_pct(run['final_accuracy'].get(t))} | " for t in targets)
        rate = run["median_samples_per_s"]
        lines.append(
            f"| {run['name']} | {_num(run['final_loss'])} | {acc}{sum(run['skipped'])} | "
            f"{'-' if rate is None else f'{rate:,.0f}'} | {run['wall_s']:.0f} s |"
        )
    if report["pairs"]:
        lines += [
            "",
            f"jaxface against torchref (same seed). First step: the first where the two "
            f"differ by more than {TOLERANCE:g} relative; early: the largest relative "
            f"difference over steps 1-{EARLY_STEPS}.",
            "",
            "| column | first step: loss / grad norm / lr | early: loss / grad norm | "
            "final loss diff | "
            + "".join(f"{t} accuracy diff | " for t in targets)
            + "embedding cosine mean / min | same/different agreement |",
            "|---|---|---|---|" + "---|" * len(targets) + "---|---|",
        ]
        for pair in report["pairs"]:
            first = pair["first_divergence"]
            early = pair["max_rel_diff_early"]
            steps = " / ".join(
                "none" if first[k] is None else str(first[k]) for k in ("loss", "grad_norm", "lr")
            )
            acc = "".join(f"{_pp(pair['accuracy_diff'].get(t))} | " for t in targets)
            cos = (
                "; ".join(
                    f"{a['cosine_mean']:.5f} / {a['cosine_min']:.5f}"
                    for a in pair["agreement"].values()
                )
                or "-"
            )
            agree = "; ".join(_pct(a["decision_agreement"]) for a in pair["agreement"].values())
            lines.append(
                f"| {pair['column']} seed {pair['seed']} | {steps} | {_sci(early['loss'])} / "
                f"{_sci(early['grad_norm'])} | {pair['final_loss_diff']:+.4f} | {acc}{cos} | "
                f"{agree or '-'} |"
            )
    lines += _spread_table(report, targets)
    lines += ["", *(f"- {note}" for note in draws_note(meta))]
    return "\n".join(lines) + "\n"


def _spread_table(report: dict, targets: list[str]) -> list[str]:
    """The bf16/fp16 difference beside the two-seed spread of each framework that has one."""
    pairs = [p for p in report["pairs"] if p["column"] == "bf16"]
    spreads = [s for s in report["spreads"] if s["column"] == "bf16"]
    if not pairs or not spreads:
        return []
    header = ["quantity", *(f"jaxface − torchref, seed {p['seed']}" for p in pairs)]
    runs = report["runs"]
    header += [
        f"{NAMES[s['framework']]} seed {runs[s['a']]['seed']} − {runs[s['b']]['seed']}"
        for s in spreads
    ]
    header.append("difference within the spread?")
    # (label, value of a comparison, format, judged against the spread)
    rows = [("final loss", lambda x: x["final_loss_diff"], lambda v: f"{v:+.4f}", True)]
    rows += [
        (f"{t} accuracy", lambda x, t=t: x["accuracy_diff"].get(t), _pp, True) for t in targets
    ]
    for t in targets:
        rows += [
            (f"{t}: embedding cosine, mean",
             lambda x, t=t: x["agreement"].get(t, {}).get("cosine_mean"), _num, False),
            (f"{t}: same/different agreement",
             lambda x, t=t: x["agreement"].get(t, {}).get("decision_agreement"), _pct, False),
        ]  # fmt: skip
    lines = [
        "",
        "bf16 column: the difference between frameworks beside the run-to-run spread "
        "(two seeds of one framework, same precision).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for label, get, fmt, judged in rows:
        diffs = [get(p) for p in pairs]
        spread = [get(s) for s in spreads]
        cells = [fmt(v) if v is not None else "-" for v in diffs + spread]
        widest = max((abs(v) for v in spread if v is not None), default=None)
        if not judged or widest is None:
            within = "-"
        elif all(abs(v) <= widest for v in diffs if v is not None):
            within = "yes"
        else:
            within = f"no (largest spread {fmt(widest).lstrip('+')})"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {within} |")
    return lines


def chart(report: dict, path: Path) -> None:
    """Per column: both loss curves (and the other seed) with accuracy markers on top, the
    relative difference of the losses below."""
    runs = report["runs"]
    columns = list(dict.fromkeys(r["column"] for r in runs.values()))
    fig, axes = plt.subplots(
        2,
        len(columns),
        figsize=(6.5 * len(columns), 7),
        squeeze=False,
        sharex="col",
        gridspec_kw={"height_ratios": [3, 2]},
    )
    styles = {"jax": "-", "torch": "--"}
    for col, column in enumerate(columns):
        top, bottom = axes[0][col], axes[1][col]
        acc_ax = top.twinx()
        members = [r for r in runs.values() if r["column"] == column]
        for i, run in enumerate(members):
            steps = np.arange(1, len(run["loss"]) + 1)
            colour = f"C{i}"
            top.plot(
                steps,
                run["loss"],
                styles[run["framework"]],
                color=colour,
                lw=1.2,
                label=run["name"],
            )
            for name, records in run["val"].items():
                marker = "o" if run["framework"] == "jax" else "s"
                acc_ax.plot(
                    [r["step"] for r in records],
                    [100 * r["accuracy"] for r in records],
                    marker,
                    color=colour,
                    ms=6,
                    mfc="none" if marker == "s" else colour,
                    label=f"{name} accuracy, {run['name']}",
                )
        top.set_ylabel("loss (every step)")
        acc_ax.set_ylabel("verification accuracy, % (markers)")
        top.set_title(TITLES[column])
        handles = top.get_legend_handles_labels()[0] + acc_ax.get_legend_handles_labels()[0]
        top.legend(handles=handles, fontsize=7, loc="best", framealpha=0.6)
        for pair in [p for p in report["pairs"] if p["column"] == column]:
            rel = np.array([np.nan if v is None else v for v in pair["loss_rel_diff"]])
            bottom.semilogy(
                np.arange(1, len(rel) + 1),
                np.maximum(rel, 1e-9),
                lw=1,
                label=f"jaxface vs torchref, seed {pair['seed']}",
            )
        for spread in [s for s in report["spreads"] if s["column"] == column]:
            rel = np.array([np.nan if v is None else v for v in spread["loss_rel_diff"]])
            bottom.semilogy(
                np.arange(1, len(rel) + 1),
                np.maximum(rel, 1e-9),
                ":",
                lw=1,
                label=f"{spread['a']} vs seed {runs[spread['b']]['seed']}",
            )
        bottom.axhline(TOLERANCE, color="grey", lw=0.8, ls="--")
        bottom.set_ylabel("|loss difference| / loss")
        bottom.set_xlabel("step")
        bottom.legend(fontsize=7)
    meta = report["meta"]
    fig.suptitle(
        f"{meta['network']}, {meta['num_classes']:,} classes, batch "
        f"{meta['global_batch']}, {meta['steps']} steps: {meta['device']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write(out: Path, report: dict) -> dict[str, Path]:
    """table.md, results.json and chart.png in `out`, each written whole."""
    paths = {"table": out / "table.md", "json": out / "results.json", "chart": out / "chart.png"}
    text = markdown(report)
    atomic_write(paths["table"], lambda f: f.write(text.encode()))
    data = json.dumps(report, indent=1)
    atomic_write(paths["json"], lambda f: f.write(data.encode()))
    atomic_write(paths["chart"], lambda f: chart(report, f))
    return paths
