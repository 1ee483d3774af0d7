"""python -m compare.converge --config CONFIG [--precision fp32,bf16] [--spread jax|both]
       [--draws shared|own] [--out DIR] [--plan] [--config.KEY=VALUE ...]

Will jaxface train the same model as arcface_torch? jaxface (`jaxface.setup`'s step) and
torchref (`torchref.engine`'s step) train through the config's whole schedule from the
same initial weights (jaxface's initialisation, converted) on the same batches in the same
order (the shared host loader), one process per run, one run after the other, each on one
device. Every step's loss, learning rate and backbone gradient norm, samples/s per logging
window and verification accuracy every `verbose` steps (same pairs, same protocol) are
recorded; at the end both final backbones embed the verification images, and their
embeddings and same/different decisions are compared.

Columns: fp32 (jaxface fp32 against torchref fp32: the curves should coincide until
rounding drifts; the first step where they differ by more than 1e-3 relative is reported)
and bf16 (jaxface bf16 against torchref fp16 with GradScaler, arcface_torch's default;
each framework's mixed-precision run is repeated with the next seed (--spread): the
two-seed spread is printed beside the difference). Writes DIR/table.md, DIR/results.json
(every curve), DIR/chart.png and DIR/logs/. Exit status: 0 done, 1 a run failed, 2 bad
input (refused before anything trains).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from compare import converge_report
from compare.cli import worker_env
from compare.converge_stats import NAMES, summarise
from compare.variants import COLUMNS, INSTALL
from jaxface import cli
from jaxface.config import derive, load_config, parse_overrides
from jaxface.data.training import open_training_source, prepare, verification_paths
from jaxface.data.verification import load_bin

# Column -> (jaxface precision, torchref precision).
PAIRS = {"fp32": ("fp32", "fp32"), "bf16": ("bf16", "fp16")}


class UsageError(ValueError):
    """Bad arguments or a config torchref cannot run: one line, exit status 2."""


class RunFailed(RuntimeError):
    """A run that did not finish: one line naming its log, exit status 1."""


def _parse(argv):
    parser = argparse.ArgumentParser(
        prog="python -m compare.converge",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--precision", default="fp32,bf16", help="columns: fp32, bf16")
    parser.add_argument(
        "--spread",
        choices=("jax", "both"),
        default="jax",
        help="whose bf16/fp16 run is repeated with the next seed for the run-to-run spread "
        "(jax: the cheaper one on a CPU; both: torchref's fp16 too)",
    )
    parser.add_argument(
        "--draws",
        choices=("shared", "own"),
        default="shared",
        help="Partial FC sampling (sample_rate < 1): torchref scores the classes jaxface "
        "sampled (shared), or draws its own (own: compare the curves statistically)",
    )
    parser.add_argument(
        "--out", default=None, help="a new folder (default: work_dirs/converge/CONFIG-DATE)"
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds per run")
    parser.add_argument("--plan", action="store_true", help="check, list the runs, stop")
    return parser.parse_known_args(argv)


def _columns(text: str) -> list[str]:
    items = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    for item in items:
        if item not in PAIRS:
            raise UsageError(
                f"unknown precision column {item!r} (choose from {', '.join(PAIRS)}: fp32 "
                "against fp32, jaxface bf16 against torchref fp16)"
            )
    if not items:
        raise UsageError("no precision column given (--precision fp32,bf16)")
    return items


def _check_installed() -> None:
    for framework in ("jax", "torch"):
        if importlib.util.find_spec(framework) is None:
            raise UsageError(
                f"{framework} is not installed, and compare.converge trains with both "
                f"frameworks; install it with: {INSTALL[framework]}"
            )


def torch_problem(cfg) -> str | None:
    """Why torchref cannot train `cfg` as jaxface would, or None. Checked without
    allocating a model (the backbone is built on torch's meta device)."""
    # torch is imported here, not at the top: whether it is installed is checked first.
    import torch

    from torchref.losses import make_loss
    from torchref.models import get_model

    if cfg.gradient_acc != 1:
        return (
            f"config key 'gradient_acc'={cfg.gradient_acc}: torchref's step has no gradient "
            "accumulation; set --config.gradient_acc=1 (and a batch size that fits)"
        )
    if cfg.loss == "margin" and cfg.margin_grad != "straight_through":
        return (
            f"config key 'margin_grad'={cfg.margin_grad!r}: torchref's combined margin has "
            "arcface_torch's straight-through gradient only; set "
            "--config.margin_grad=straight_through"
        )
    if cfg.num_devices not in (None, 1):
        return (
            f"config key 'num_devices'={cfg.num_devices}: compare.converge trains each "
            "framework on one device; set --config.num_devices=1 (or none)"
        )
    try:
        make_loss(cfg)
        with torch.device("meta"):
            get_model(cfg.network, dropout=cfg.dropout, num_features=cfg.embedding_size)
    except ValueError as exc:
        return str(exc)
    return None


def plan(columns: list[str], seed: int, spread: str, sampled: bool, draws: str) -> list[dict]:
    """The runs in order: per seed jaxface first (it writes the initial weights and the
    classes it samples, which torchref reads), then torchref."""
    runs = []
    for column in columns:
        jax_precision, torch_precision = PAIRS[column]
        seeds = [seed] if column == "fp32" else [seed, seed + 1]
        for s in seeds:
            frameworks = ("jax", "torch") if s == seed or spread == "both" else ("jax",)
            for framework in frameworks:
                precision = jax_precision if framework == "jax" else torch_precision
                compute, tf32, _, _ = COLUMNS[precision]
                name = f"{NAMES[framework]} {precision} seed {s}"
                run = {
                    "name": name,
                    "framework": framework,
                    "column": column,
                    "seed": s,
                    "precision": precision,
                    "compute": compute,
                    "tf32": tf32,
                }
                if sampled and draws == "shared":
                    # Every jaxface run of a seed draws the same ids (they depend on the
                    # seed, the step and the labels only), so each may write them.
                    run["draws_out" if framework == "jax" else "draws_in"] = f"draws-{s}.npy"
                runs.append(run)
    return runs


def _claim(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(
            f"--out {out} already exists and is not an empty folder; its files are kept: "
            "choose another --out"
        )
    return out


def _default_out(config: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("work_dirs/converge") / f"{Path(config).stem}-{stamp}"


def run_one(index: int, total: int, spec: dict, log: Path, timeout: float | None) -> None:
    """Run one spec in its own process, its progress lines relayed with its name."""
    label = f"[{index}/{total} {spec['name']}]"
    command = [sys.executable, "-m", "compare.converge_worker", "--spec", json.dumps(spec)]
    with log.open("w") as err:
        proc = subprocess.Popen(
            command, env=worker_env(1), stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1
        )
        expired = threading.Event()

        def expire():
            expired.set()
            proc.kill()

        timer = threading.Timer(timeout, expire) if timeout else None
        if timer:
            timer.start()
        try:
            for line in proc.stdout:
                print(f"{label} {line.rstrip()}", flush=True)
                err.write(line)
            status = proc.wait()
        finally:
            if timer:
                timer.cancel()
            if proc.poll() is None:  # interrupted: the run must not outlive the tool
                proc.kill()
                proc.wait()
    if expired.is_set():
        raise RunFailed(f"{spec['name']} ran past --timeout {timeout:g} s; its log: {log}")
    if status:
        lines = [x for x in log.read_text().splitlines() if x.strip()]
        raise RunFailed(
            f"{spec['name']} failed (exit status {status}): "
            f"{lines[-1] if lines else 'no output'}; its log: {log}"
        )


def main(argv: list[str] | None = None) -> int:
    return cli.run("compare.converge", _main, argv, ((UsageError, 2), (RunFailed, 1)))


def _main(argv: list[str]) -> int:
    args, rest = _parse(argv)
    columns = _columns(args.precision)
    _check_installed()
    overrides = parse_overrides(rest)
    cfg = load_config(args.config, overrides)
    problem = torch_problem(cfg)
    if problem:
        raise UsageError(f"torchref cannot run {args.config} as jaxface would: {problem}")
    derived = derive(cfg, 1)
    out = _claim(Path(args.out) if args.out else _default_out(args.config))
    runs = plan(columns, cfg.seed, args.spread, cfg.sample_rate < 1, args.draws)
    steps = derived.run_steps
    print(
        f"compare.converge: {cfg.network}, {cfg.num_classes:,} classes, global batch "
        f"{derived.global_batch}, {steps} steps, {len(runs)} runs -> {out}",
        flush=True,
    )
    for i, run in enumerate(runs, start=1):
        print(f"  {i}. {run['name']}", flush=True)
    if args.plan:
        return 0
    # Bad data stops here, before anything trains: the synthetic set packed if asked for,
    # the source opened and checked against the config, the verification sets found.
    prepare(cfg)
    open_training_source(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir()
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=out))
    try:
        val_paths = [str(p) for p in verification_paths(cfg, work)]
        results, start = {}, time.perf_counter()
        for i, run in enumerate(runs, start=1):
            slug = run["name"].replace(" ", "-")
            spec = {
                **run,
                "config": args.config,
                "overrides": overrides,
                "steps": steps,
                "init": str(work / f"init-{run['seed']}.npz"),
                "val_paths": val_paths,
                "result": str(work / f"{slug}.json"),
                "vectors": str(work / f"{slug}.npz"),
            }
            for key in ("draws_out", "draws_in"):
                if key in run:
                    spec[key] = str(work / run[key])
            run_one(i, len(runs), spec, out / "logs" / f"{slug}.log", args.timeout)
            results[run["name"]] = {**run, **json.loads(Path(spec["result"]).read_text())}
            results[run["name"]]["vectors"] = spec["vectors"]
            elapsed = time.perf_counter() - start
            print(f"[{i}/{len(runs)}] {run['name']} done ({elapsed:.0f} s so far)", flush=True)
        wall_s = time.perf_counter() - start
        meta = {
            "config": args.config,
            "overrides": overrides,
            "command": " ".join(["python -m compare.converge", *argv]),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "network": cfg.network,
            "num_classes": cfg.num_classes,
            "num_image": cfg.num_image,
            "global_batch": derived.global_batch,
            "steps": steps,
            "frequent": cfg.frequent,
            "seed": cfg.seed,
            "sample_rate": cfg.sample_rate,
            "dropout": cfg.dropout,
            "draws": args.draws,
            "augment": {
                "flip": cfg.flip,
                "augment": cfg.augment,
                "adaface_augment": cfg.adaface_augment,
            },
            "loss": cfg.loss,
            "val_targets": [Path(p).stem for p in val_paths],
            "wall_s": wall_s,
        }
        for run in results.values():
            path = Path(run["vectors"])
            run["vectors"] = dict(np.load(path)) if path.exists() else {}
        issame = {Path(p).stem: load_bin(p)[1] for p in val_paths}
        report = summarise(meta, results, issame)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    paths = converge_report.write(out, report)
    print()
    print(paths["table"].read_text(), end="")
    print(f"\nwrote {paths['table']}, {paths['json']}, {paths['chart']} in {wall_s:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
