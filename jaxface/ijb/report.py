"""Writing results: every file under a temporary name, renamed when complete."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import numpy as np

from jaxface.fileio import atomic_write
from jaxface.ijb.metrics import IdentificationResult, Verification

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen


def save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def save_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def save_json(path: Path, value) -> None:
    save_text(path, json.dumps(value, indent=2, allow_nan=True) + "\n")


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.2f}"


def verification_table(name: str, target: str, result: Verification) -> str:
    """eval_ijbc.py's table as markdown: TAR (%) at each FAR, two decimals. A FAR below
    1 / (negative pairs) cannot be measured (one false accept is already more): n/a, and a
    line under the table says why (eval_ijbc.py prints the nearest ROC point's TAR)."""
    fars = list(result.tar)
    floor = 1.0 / result.negatives if result.negatives else math.inf
    cells = ["n/a" if f < floor else _pct(result.tar[f]) for f in fars]
    head = "| Methods | " + " | ".join(f"{far:g}" for far in fars) + " |"
    rule = "|---|" + "---:|" * len(fars)
    lines = [head, rule, f"| {name}-{target} | " + " | ".join(cells) + " |"]
    if "n/a" in cells:
        lines.append(
            f"\nn/a: a FAR below 1/{result.negatives:,} cannot be measured from "
            f"{result.negatives:,} negative pairs (one false accept is a FAR of "
            f"{floor:.2g})."
        )
    return "\n".join(lines)


def identification_table(name: str, target: str, result: IdentificationResult) -> str:
    cols = [f"rank-{k}" for k in result.rank] + [f"TPIR@FPIR={f:g}" for f in result.tpir]
    vals = [_pct(v) for v in result.rank.values()] + [_pct(v) for v in result.tpir.values()]
    return "\n".join(
        [
            "| Methods | " + " | ".join(cols) + " |",
            "|---|" + "---:|" * len(cols),
            f"| {name}-{target} 1:N | " + " | ".join(vals) + " |",
        ]
    )


def save_roc_png(path: Path, name: str, target: str, result: Verification) -> None:
    """The ROC on a log FPR axis with eval_ijbc.py's limits."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(result.fpr, result.tpr, lw=1, label=f"{name} (AUC = {100 * result.auc:.4f} %)")
    ax.set_xscale("log")
    ax.set_xlim(1e-6, 0.1)
    ax.set_ylim(0.3, 1.0)
    ax.set_xticks(list(result.tar))
    ax.set_yticks(np.linspace(0.3, 1.0, 8))
    ax.grid(linestyle="--", linewidth=1)
    ax.set_xlabel("False Positive Rate")
    ax.set_ylabel("True Positive Rate")
    ax.set_title(f"ROC on {target}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
