"""python -m jaxface.plot RUN_DIR [--out FILE.png]: loss, throughput and accuracy curves."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # no display: files only, before pyplot loads a GUI backend
import matplotlib.pyplot as plt  # noqa: E402

from jaxface import cli  # noqa: E402
from jaxface.runlog import read_records  # noqa: E402


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's curves from metrics.jsonl into a PNG (default RUN_DIR/curves.png)."""

    records = read_records(run_dir)
    train = [r for r in records if "loss" in r and "step" in r]
    val = [r for r in records if r.get("event") == "val"]
    if not train:
        raise ValueError(f"{run_dir}/metrics.jsonl has no training records yet")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train])
    axes[0].set(title="loss", xlabel="step")
    timed = [r for r in train if r.get("samples_per_sec") == r.get("samples_per_sec")]
    axes[1].plot([r["step"] for r in timed], [r["samples_per_sec"] for r in timed])
    axes[1].set(title="throughput", xlabel="step", ylabel="samples/s")
    for name in sorted({r["target"] for r in val}):
        rows = [r for r in val if r["target"] == name]
        acc = np.array([100 * r["accuracy"] for r in rows])
        std = np.array([100 * r["std"] for r in rows])
        # Accuracy cannot pass 100 %: the bar's upper arm stops there.
        axes[2].errorbar(
            [r["step"] for r in rows],
            acc,
            yerr=[np.minimum(std, acc), np.minimum(std, 100 - acc)],
            marker="o",
            capsize=3,
            label=name,
        )
    if val:
        axes[2].legend()
    axes[2].set(title="verification accuracy (10-fold)", xlabel="step", ylabel="%")
    fig.suptitle(str(run_dir))
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    return cli.run("jaxface.plot", _main, argv, ((FileNotFoundError, 2), (ValueError, 2)))


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxface.plot", description=__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="PNG to write (default RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    print(plot_run(args.run_dir, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
