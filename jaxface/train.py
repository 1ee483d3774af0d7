"""python -m jaxface.train --config configs/r50.py [--config.KEY=VALUE ...]

Sections of `train()`: processes and mesh, the run (`jaxface.setup.build`), output, input,
state (born sharded or restored), evaluation, loop, summary. Exit status: 0 done, 1 the run
failed (non-finite loss, a checkpoint that cannot be used, an unreachable coordinator), 2
bad config, arguments or data (`EXIT_CODES`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxface import cli, peers
from jaxface.checkpoint import (
    Checkpointer,
    CheckpointError,
    NoUsableCheckpoint,
    array_specs,
    finished_steps,
    is_head_name,
    set_aside,
)
from jaxface.config import ConfigError, load_config, parse_overrides
from jaxface.data.loader import LoaderError
from jaxface.data.recordio import RecordIOError
from jaxface.data.training import make_loader, prepare, step_batch, verification_paths
from jaxface.data.verification import VerificationSetError
from jaxface.diskspace import disk_full, ensure_room, format_bytes, free_bytes, tree_bytes
from jaxface.distributed import DistributedError
from jaxface.distributed import initialize as initialize_distributed
from jaxface.export import export_backbone
from jaxface.feed import DeviceFeed
from jaxface.fileio import ConvertError, atomic_write
from jaxface.mesh import MeshError, make_mesh
from jaxface.precision import LossScale
from jaxface.progress import Meter, Progress, format_duration
from jaxface.resume import data_stream, plan_resume
from jaxface.runlock import FolderLockedError, RunLock
from jaxface.runlog import RunLog
from jaxface.setup import Run, build
from jaxface.stopping import Stopped, StopRequest
from jaxface.verify import Verifier, format_result
from jaxface.wandb_log import ID_FILE as WANDB_ID_FILE
from jaxface.wandb_log import WandbLog
from jaxface.weights import load_backbone

DEFAULT_CONFIG = "configs/demo.py"


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why."""


# The one place where failures become exit statuses: 2 for the user's input, 1 for the run.
# With jaxface.cli's common input errors; a stopped run (Stopped) exits with 128 + the
# signal's number instead.
EXIT_CODES: tuple[tuple[type[Exception], int], ...] = (
    (MeshError, 2),
    (RecordIOError, 2),
    (FolderLockedError, 2),
    (TrainingError, 1),
    (CheckpointError, 1),
    (DistributedError, 1),
    (VerificationSetError, 1),
    (LoaderError, 1),
)


def train(cfg) -> dict:
    """Run the job `cfg` describes. Returns a summary; raises one of EXIT_CODES' types."""
    # --- Processes and mesh: 1-D over every device of every process; backbone
    # data-parallel, class centres split.
    initialize_distributed(cfg)
    cfg, auto = _resolve_auto_resume(cfg)
    run = build(cfg, make_mesh(cfg.num_devices))
    derived, is_main = run.derived, jax.process_index() == 0
    progress = Progress(cfg.progress, derived.run_steps, quiet=not is_main)
    with ExitStack() as cleanup:
        # First in, last out: the others learn this process is done only after its final
        # save; a collective that failed because a process is lost says which one.
        cleanup.enter_context(peers.guard())
        cleanup.callback(progress.close)
        if auto:
            progress.message(auto)
        # --- Input first: bad data stops the run before anything is written. This
        # process's rows of each global batch, a pure function of the step.
        loader = _open_input(cfg, derived.global_batch, is_main, progress.message)
        cleanup.callback(loader.close)
        out = _claim_output(cfg, derived, is_main, cleanup, progress.message)
        # Found now, not at the first save hours later (exit 2: the output's filesystem).
        ensure_room(out / "checkpoints", tree_bytes(run.abstract_state), cfg.output)
        val_paths = verification_paths(cfg, out, progress.message)

        # --- State: born sharded, or restored from the newest usable checkpoint. Only
        # process 0 talks and writes logs; every process takes part in checkpoints.
        stream = _data_stream(cfg, derived, loader)
        state, checkpointer = _restore_or_init(
            run, out / "checkpoints", stream, progress.message, auto=bool(auto)
        )
        cleanup.callback(checkpointer.close)
        start_step = int(jax.device_get(state.step))
        verifier = (
            Verifier(val_paths, run.mesh, run.embed, derived.global_batch) if val_paths else None
        )
        wandb = (
            WandbLog(cfg, out, start_step > 0, progress.message) if cfg.wandb and is_main else None
        )
        log = RunLog(out, cfg.tensorboard, append=cfg.resume, enabled=is_main, wandb=wandb)
        cleanup.callback(log.close)
        progress.message(_header(run, state, start_step, out))

        def evaluate(step: int) -> list[dict]:
            records = []
            for name, (result, best) in verifier.run(*run.backbone(state)).items():
                progress.message(format_result(name, step, result, best))
                record = {"step": step, "event": "val", "target": name, **result.as_dict()}
                log.write({**record, "best": best}, prefix=f"val/{name}")
                records.append(record)
            return records

        def save(step: int) -> None:
            checkpointer.save(step, run.to_saved(state), _checkpoint_meta(run, step, stream))

        # --- Loop. Metrics stay on the device until a log step fetches them all at once.
        feed = DeviceFeed(
            lambda step: step_batch(loader, step, cfg.gradient_acc),
            run.data_sharding,
            start=start_step,
            stop=derived.run_steps,
        )
        cleanup.callback(feed.close)
        meter = Meter(derived.run_steps, derived.global_batch)
        pending, history, val_records = [], [], []
        # The first step compiles the program (from seconds to minutes): say so before it.
        progress.message(
            f"compiling the train step ({cfg.network}, {run.mesh.size} device(s), global batch "
            f"{derived.global_batch}); step {start_step + 1} waits for it"
        )
        t_start = time.perf_counter()
        step = saved = start_step
        stop = cleanup.enter_context(StopRequest(cfg.signal_timeout, progress.message))
        for step, (images, labels) in enumerate(feed, start=start_step + 1):
            if step == start_step + 1:
                run, (state, metrics) = _first_step(run, state, images, labels, progress.message)
            else:
                state, metrics = run.train_step(state, images, labels)
            pending.append(metrics)
            if step == start_step + 1:
                jax.block_until_ready(metrics)
                meter.start(step)
                took = time.perf_counter() - t_start
                progress.message(f"step {step} compiled and ran in {took:.1f} s")
            last = step == derived.run_steps
            epoch_end = step % derived.steps_per_epoch == 0
            if step % cfg.frequent == 0 or last or stop.signum:
                history.append(_log_window(step, pending, run, meter, history))
                pending.clear()
                log.write(history[-1])
                progress.update(history[-1])
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or epoch_end or last:
                save(step)
                saved = step
            if epoch_end or last:
                # Every process takes part in computing the exported weights (the running
                # statistics' mean spans all devices); process 0 writes them.
                backbone = run.backbone(state)
                if is_main:
                    _export(out, backbone, cfg.network, step, checkpointer)
            if verifier is not None and (step % cfg.verbose == 0 or last):
                val_records += evaluate(step)
            if stop.signum:
                break
        if stop.signum:
            if saved != step:
                save(step)
            checkpointer.wait()
            raise Stopped(
                f"stopped by {stop.name} after step {step}; its checkpoint is "
                f"{checkpointer.directory / str(step)}: continue with --config.resume=true "
                "(or auto)",
                stop.signum,
            )
    summary = _summarize(run, start_step, history, val_records, time.perf_counter() - t_start)
    if is_main:
        with (out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"event": "summary", **summary}) + "\n")
    progress.message(_summary_line(summary, start_step, derived.run_steps, out))
    return {**summary, "state": run.to_saved(state), "history": history, "val_records": val_records}


# What XLA or Pallas say when the Triton kernel cannot be built for this GPU (its shared
# memory, an unsupported operation, Triton itself), as opposed to the step's other failures.
_KERNEL_FAILURE = ("triton", "pallas", "shared memory", "centre_sgd_update")


def _first_step(run: Run, state, images, labels, say):
    """(run, (state, metrics)) of the first step, which compiles the program. If the dense
    head's Pallas kernel does not compile on this GPU, the step without it (the centres
    differentiated, as with fused_head_update=false) takes over, said in one line: the
    state is the same, and a failed compile donates nothing."""
    try:
        return run, run.train_step(state, images, labels)
    except Exception as error:  # noqa: BLE001 - only the kernel's failures are caught
        why = str(error).strip()
        if not run.head_kernel or not any(k in why.lower() for k in _KERNEL_FAILURE):
            raise
    kind = run.mesh.devices.flat[0].device_kind
    say(
        f"the fused centre update (a Pallas kernel) does not compile on {kind}: "
        f"{why.splitlines()[0][:200]}; going on with fused_head_update=false (XLA writes "
        "the centres' gradient each step; set it in the config to skip this attempt)"
    )
    run = build(run.cfg.replace(fused_head_update=False), run.mesh)
    return run, run.train_step(state, images, labels)


def _export(out: Path, backbone, network: str, step: int, checkpointer: Checkpointer) -> None:
    """export_backbone; on a full disk, one line (the checkpoint's own failure first: the
    save in flight filled the disk, if it did)."""
    try:
        export_backbone(out, *backbone, network, step)
    except OSError as exc:
        short = disk_full(exc)
        if short is None:
            raise
        checkpointer.wait()
        raise TrainingError(
            f"the backbone of step {step} could not be written to {out}: {short} "
            f"({format_bytes(free_bytes(out))} free); the checkpoints are kept: free space, "
            "then continue with --config.resume=auto"
        ) from None


def _header(run: Run, state, start_step: int, out: Path) -> str:
    cfg, derived = run.cfg, run.derived
    n_params = sum(x.size for x in jax.tree.leaves(state.params["backbone"]))
    processes = f"in {jax.process_count()} processes " if jax.process_count() > 1 else ""
    return (
        f"jaxface: {cfg.network} ({n_params:,} backbone params), {cfg.num_classes:,} classes "
        f"over {run.mesh.size} {run.mesh.devices.flat[0].platform} device(s) {processes}"
        f"({derived.num_local_classes:,} each), global batch {derived.global_batch}, "
        f"{cfg.precision}, {_steps(start_step, derived.run_steps)} -> {out}"
    )


def _steps(start_step: int, run_steps: int) -> str:
    if start_step >= run_steps:
        return f"no steps left (the checkpoint is at step {start_step} of {run_steps})"
    return f"steps {start_step + 1}-{run_steps}"


def _claim_output(cfg, derived, is_main: bool, cleanup: ExitStack, say) -> Path:
    """The output folder: checked, locked for this run (process 0), and the resolved config
    written into it (a resume writes its own copy)."""
    out = Path(cfg.output)
    for path in (out, out / "checkpoints"):
        if path.exists() and not path.is_dir():
            raise ConfigError(
                f"config key 'output'={cfg.output!r}: {path} is a file, not a folder; "
                "choose another output folder"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not is_main:
            return out
        lock = RunLock(out, warn=say)
        cleanup.callback(lock.release)
        peers.on_exit(lock.release)
        resolved = {"config": cfg.to_dict(), "source": cfg.source, "derived": vars(derived)}
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"config.resume-{stamp}.json" if cfg.resume else "config.json"
        text = json.dumps(resolved, indent=2) + "\n"
        atomic_write(out / name, lambda f: f.write(text.encode()))
    except OSError as exc:
        raise ConfigError(f"config key 'output'={cfg.output!r} cannot be written: {exc}") from None
    return out


def _open_input(cfg, global_batch: int, is_main: bool, say):
    """This process's loader; process 0 packs synthetic data first, the others wait."""
    if is_main:
        prepare(cfg, say)
    if cfg.pack_synthetic and jax.process_count() > 1:
        multihost_utils.sync_global_devices("synthetic pack written")
    return make_loader(cfg, global_batch, jax.process_index(), jax.process_count())


def _data_stream(cfg, derived, loader) -> dict:
    return data_stream(cfg, derived.global_batch, loader.num_samples)


def _resolve_auto_resume(cfg):
    """(cfg, what resume=auto decided, or ""): resume=true when the output folder holds a
    complete checkpoint (a requeued job), false when it holds none (the first start)."""
    if cfg.resume != "auto":
        return cfg, ""
    folder = Path(cfg.output).absolute() / "checkpoints"
    steps = finished_steps(folder)
    if steps:
        return cfg.replace(resume=True), f"resume=auto: resuming, {folder} holds step {steps[-1]}"
    return cfg.replace(resume=False), f"resume=auto: starting fresh, no checkpoint in {folder}"


def _restore_or_init(run: Run, checkpoint_dir: Path, stream: dict, say, auto: bool = False):
    """(state, checkpointer): the newest usable checkpoint when resuming, else a fresh
    state (and earlier checkpoints moved aside, never overwritten). `auto`: none usable
    starts fresh instead of failing."""
    cfg, is_main = run.cfg, jax.process_index() == 0
    if cfg.resume:
        checkpointer = Checkpointer(checkpoint_dir, cfg.keep_checkpoints)
        try:
            state = resume_state(run, checkpointer, stream, say)
        except NoUsableCheckpoint:
            checkpointer.close()
            if not auto:
                raise
            say(
                f"warning: resume=auto: no checkpoint in {checkpoint_dir} is usable (each "
                "moved aside as STEP.damaged-DATE); starting fresh"
            )
        except BaseException:
            checkpointer.close()
            raise
        else:
            return run.to_step(state), checkpointer
    if is_main:  # an earlier run's results are moved aside, never overwritten
        out = checkpoint_dir.parent
        earlier_runs = ("metrics.jsonl", "tensorboard", WANDB_ID_FILE)
        for earlier in (checkpoint_dir, *(out / name for name in earlier_runs)):
            moved = set_aside(earlier)
            if moved:
                say(f"{earlier} of an earlier run moved to {moved.name} (resume=false)")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("checkpoints set aside")
    checkpointer = Checkpointer(checkpoint_dir, cfg.keep_checkpoints)
    state = run.init_state()
    if cfg.init_from is not None:
        state = _init_backbone_from(run, state)
        say(f"backbone initialised from {cfg.init_from} (head is fresh)")
    return state, checkpointer


def resume_state(run: Run, checkpointer: Checkpointer, stream: dict, say):
    """The state of the newest usable checkpoint, after `jaxface.resume.plan_resume` has
    checked the config change against it; says what the resume changes."""
    cfg, new_arrays = run.cfg, array_specs(run.abstract_state)

    def decide(meta, saved_arrays, folder):
        return plan_resume(
            meta, cfg, stream, saved_arrays, new_arrays, str(folder), resizable=is_head_name
        )

    state, meta, plan = checkpointer.restore(run.abstract_state, decide, run.init_arrays, warn=say)
    step = int(jax.device_get(state.step))
    if plan.stream_changes:
        say(f"warning: the data stream changed on resume ({', '.join(plan.stream_changes)})")
    if plan.converting:
        fresh = _groups(plan.initialise) if plan.initialise else "none"
        dropped = f"; not carried over: {_groups(plan.dropped)}" if plan.dropped else ""
        why = f" ({', '.join(plan.converted)})" if plan.converted else ""
        say(
            f"allow_state_change{why}: {len(new_arrays) - len(plan.initialise)} of "
            f"{len(new_arrays)} arrays restored; initialised as a fresh run would: {fresh}"
            f"{dropped}"
        )
    if plan.restart_loss_scale:
        scale = LossScale.create(run.policy.loss_scaling)
        state = state.replace(loss_scale=jax.device_put(scale, run.shardings.loss_scale))
        say(f"precision changed: the loss scale restarts at {float(scale.scale):g}")
    if plan.honoured:
        say(f"resuming with changed settings, from step {step + 1} on: {', '.join(plan.honoured)}")
    say(
        f"resumed from {checkpointer.directory / str(step)} (step {step}, saved on "
        f"{meta.get('num_devices', '?')} device(s), now {run.mesh.size})"
    )
    return state


def _groups(names: list[str]) -> str:
    """'opt_state.backbone (59 arrays), loss_state (2 arrays)': where the names lie."""
    counts: dict[str, int] = {}
    for name in names:
        group = ".".join(name.split(".")[:2])
        counts[group] = counts.get(group, 0) + 1
    return ", ".join(f"{g} ({n} array{'s' * (n > 1)})" for g, n in counts.items())


def _init_backbone_from(run: Run, state):
    """Fine-tuning: a released backbone (torch model.pt or jaxface .npz), a fresh head.

    The optimizer state needs no change: momentum and Adam moments start at zero."""
    cfg = run.cfg
    try:
        params, stats, _ = load_backbone(cfg.init_from, cfg.network, cfg.embedding_size)
    except ConvertError as exc:
        raise ConfigError(
            f"{cfg.source}: config key 'init_from'={cfg.init_from!r}: {exc}"
        ) from None
    saved = run.to_saved(state)
    backbone = jax.device_put(params, run.shardings.params["backbone"])
    stats = jax.device_put(stats, run.shardings.batch_stats)
    return run.to_step(
        saved.replace(params={**saved.params, "backbone": backbone}, batch_stats=stats)
    )


def _checkpoint_meta(run: Run, step: int, stream: dict) -> dict:
    return {
        "config": run.cfg.to_dict(),
        "data_stream": stream,
        "step": step,
        "epoch": step / run.derived.steps_per_epoch,
        # The input stream is a pure function of the step: this is the data position.
        "data_position": {"next_step": step},
        "num_devices": run.mesh.size,
        "num_classes_padded": run.derived.num_classes_padded,
    }


def _log_window(step: int, pending: list, run: Run, meter: Meter, history: list) -> dict:
    """Fetch the pending metrics (the only host sync), check them, make one log record.

    Under fp16 loss scaling a non-finite step is skipped and the scale halved (GradScaler);
    the run stops only when the scale has collapsed below 1, i.e. real divergence."""
    fetched = jax.device_get(pending)
    first_step = step - len(fetched) + 1
    for i, m in enumerate(fetched):
        tolerated = run.policy.loss_scaling and float(m["loss_scale"]) >= 1.0
        if not math.isfinite(float(m["loss"])) and not tolerated:
            last = f"; the last finite loss was {history[-1]['loss']:.4f}" if history else ""
            raise TrainingError(
                f"loss is {float(m['loss'])} at step {first_step + i} "
                f"(lr {float(m['lr']):.6g}){last}. Stopping: lower config key 'lr', "
                "or check the data"
            )
    finite = [float(m["loss"]) for m in fetched if math.isfinite(float(m["loss"]))]
    return {
        "step": step,
        "epoch": (step - 1) // run.derived.steps_per_epoch,
        "loss": float(np.mean(finite)) if finite else float("nan"),
        "skipped_steps": sum(not bool(m["grads_finite"]) for m in fetched),
        "loss_scale": float(fetched[-1]["loss_scale"]),
        "lr": float(fetched[-1]["lr"]),
        "backbone_grad_norm": float(fetched[-1]["backbone_grad_norm"]),
        **meter.window(step),
    }


def _summarize(run: Run, start_step: int, history, val_records, wall_s: float) -> dict:
    summary = {"steps": run.derived.run_steps, "first_step": start_step + 1, "wall_s": wall_s}
    if not history:
        return summary
    summary |= {"first_loss": history[0]["loss"], "final_loss": history[-1]["loss"]}
    rates = [r["samples_per_sec"] for r in history if math.isfinite(r["samples_per_sec"])]
    if rates:
        summary["samples_per_sec"] = float(np.median(rates))
    if val_records:
        latest = {r["target"]: r["accuracy"] for r in val_records}  # the last of each set
        summary["val"] = latest
    return summary


def _summary_line(summary: dict, start_step: int, run_steps: int, out: Path) -> str:
    if "final_loss" not in summary:
        return f"nothing to do: the checkpoint is at step {start_step} of {run_steps}"
    val = "".join(f", {k} accuracy {100 * v:.2f}%" for k, v in summary.get("val", {}).items())
    return (
        f"done: steps {start_step + 1}-{run_steps} in {format_duration(summary['wall_s'])}, "
        f"loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}{val}; "
        f"logs, checkpoints and backbone in {out}"
    )


def main(argv: list[str] | None = None) -> int:
    return cli.run("jaxface.train", _main, argv, EXIT_CODES)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxface.train",
        description="Train an ArcFace-family model. Any config key can be overridden with "
        "--config.KEY=VALUE (jaxface/defaults.py lists the keys); --debug shows tracebacks.",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="config file (%(default)s)")
    args, rest = parser.parse_known_args(argv)
    try:
        train(load_config(args.config, parse_overrides(rest)))
    except Stopped as exc:
        print(f"jaxface.train: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
