"""python -m jaxface.train --config configs/r50.py [--config.KEY=VALUE ...]

Sections: config, mesh, output, input, model, state (born sharded or restored), step,
evaluation, loop. Exit status: 0 done, 1 the run failed (non-finite loss, a checkpoint
that cannot be used), 2 bad config or arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

DEFAULT_CONFIG = "configs/demo.py"
SYNTHETIC_VAL_PAIRS = 600


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why."""


def _parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(
        prog="python -m jaxface.train",
        description="Train an ArcFace-family model. Any config key can be overridden with "
        "--config.KEY=VALUE (see configs/base.py for the keys).",
    )
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, help="config file (default: %(default)s)"
    )
    return parser.parse_known_args(argv)


def _prepare_output(cfg, derived, is_main: bool) -> Path:
    out = Path(cfg.output)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not is_main:
            return out
        resolved = {"config": cfg.to_dict(), "source": cfg.source, "derived": vars(derived)}
        name = (
            "config.json"
            if not cfg.resume
            else f"config.resume-{time.strftime('%Y%m%d-%H%M%S')}.json"
        )
        (out / name).write_text(json.dumps(resolved, indent=2) + "\n")
    except OSError as exc:
        raise TrainingError(f"config key 'output'={cfg.output!r} cannot be written: {exc}") from exc
    return out


def _val_paths(cfg, out: Path, stream) -> list[Path]:
    """Resolve val_targets to .bin files; the synthetic set is written on first use."""
    from jaxface.config import ConfigError
    from jaxface.data.synthetic import write_synthetic_bin

    paths = []
    for target in cfg.val_targets:
        if target == "synthetic":
            if cfg.rec != "synthetic" and not cfg.pack_synthetic:
                raise ConfigError(
                    f"{cfg.source}: val target 'synthetic' needs synthetic training data "
                    "(rec='synthetic' or pack_synthetic=true)"
                )
            path = out / "synthetic.bin"
            if not path.exists():
                write_synthetic_bin(path, stream, SYNTHETIC_VAL_PAIRS)
        elif target.endswith(".bin"):
            path = Path(target)
        else:
            path = Path(cfg.rec) / f"{target}.bin"
        if not path.is_file():
            raise ConfigError(
                f"{cfg.source}: config key 'val_targets': {target!r} -> {path} does not exist"
            )
        paths.append(path)
    return paths


def train(cfg) -> dict:
    """Run the job `cfg` describes. Returns a summary; raises TrainingError or ConfigError."""
    import jax
    import numpy as np

    from jaxface.checkpoint import Checkpointer, CheckpointError, set_aside
    from jaxface.config import ConfigError, derive
    from jaxface.data import SyntheticFaces, SyntheticStream
    from jaxface.data.verification import VerificationSetError
    from jaxface.distributed import DistributedError
    from jaxface.distributed import initialize as initialize_distributed
    from jaxface.export import export_backbone
    from jaxface.feed import DeviceFeed
    from jaxface.heads import margin_from_config
    from jaxface.mesh import (
        MeshError,
        batch_sharding,
        make_mesh,
        micro_batch_sharding,
        replicated,
    )
    from jaxface.models import get_model
    from jaxface.optim import make_optimizer
    from jaxface.precision import policy_from_config
    from jaxface.progress import Meter, Progress, format_duration
    from jaxface.runlog import RunLog
    from jaxface.step import make_embed_fn, make_init_fn, make_train_step, state_shardings
    from jaxface.verify import Verifier, format_result

    # --- Processes and mesh: 1-D over every device of every process; backbone
    # data-parallel, class centres split.
    try:
        initialize_distributed(cfg)
    except DistributedError as exc:
        raise TrainingError(str(exc)) from None
    try:
        mesh = make_mesh(cfg.num_devices)
    except MeshError as exc:
        raise ConfigError(f"{cfg.source}: {exc}") from None
    derived = derive(cfg, mesh.size)
    is_main = jax.process_index() == 0
    out = _prepare_output(cfg, derived, is_main)

    # --- Input: this process's rows of each global batch, a pure function of the step.
    stream = SyntheticStream(
        SyntheticFaces(cfg.num_classes, cfg.seed, cfg.synthetic_noise, cfg.synthetic_jitter),
        cfg.num_image,
        derived.global_batch,
        cfg.seed,
    )
    loader = _make_loader(cfg, derived, is_main)
    try:
        val_paths = _val_paths(cfg, out, stream)
    except VerificationSetError as exc:
        loader.close()
        raise TrainingError(str(exc)) from None

    # --- Model, head, optimizer.
    policy = policy_from_config(cfg)
    model = get_model(
        cfg.network,
        embedding_size=cfg.embedding_size,
        dropout=cfg.dropout,
        policy=policy,
        bn_groups=1 if cfg.sync_bn else mesh.size,
        remat=cfg.remat,
    )
    tx, schedule = make_optimizer(cfg, derived)
    margin = margin_from_config(cfg)

    # --- State: born sharded (shapes first, then a jitted init that lands each leaf in
    # place), or restored from the latest checkpoint straight into the same shardings.
    init = make_init_fn(model, tx, cfg.num_classes, derived.num_classes_padded)
    abstract = jax.eval_shape(init, 0)
    shardings = state_shardings(abstract, mesh)
    # Only process 0 talks and writes logs; every process takes part in checkpoints.
    progress = Progress(cfg.progress, derived.run_steps, quiet=not is_main)
    checkpoint_dir = out / "checkpoints"
    if cfg.resume:
        checkpointer = Checkpointer(checkpoint_dir, cfg.keep_checkpoints)
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
        try:
            state, meta = checkpointer.restore(target, cfg.to_dict())
        except CheckpointError as exc:
            checkpointer.close()
            raise TrainingError(str(exc)) from None
        start_step = int(jax.device_get(state.step))
        progress.message(
            f"resumed from {checkpointer.directory / str(start_step)} (step {start_step}, saved "
            f"on {meta.get('num_devices', '?')} device(s), now {mesh.size})"
        )
    else:
        moved = set_aside(checkpoint_dir) if is_main else None
        if moved:
            progress.message(f"earlier checkpoints of {out} moved to {moved} (resume=false)")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("checkpoints set aside")
        checkpointer = Checkpointer(checkpoint_dir, cfg.keep_checkpoints)
        state = jax.jit(init, out_shardings=shardings)(cfg.seed)
        start_step = 0
        if cfg.init_from is not None:
            state = _init_backbone_from(cfg, state, shardings)
            progress.message(f"backbone initialised from {cfg.init_from} (head is fresh)")

    # --- Step: donated state, explicit output shardings.
    step_fn = jax.jit(
        make_train_step(
            model,
            tx,
            schedule,
            margin,
            cfg.num_classes,
            mesh,
            num_sample=derived.num_sample,
            grad_accum=cfg.gradient_acc,
        ),
        donate_argnums=0,
        out_shardings=(shardings, replicated(mesh)),
    )
    embed_fn = jax.jit(make_embed_fn(model))
    verifier = Verifier(val_paths, mesh, embed_fn, derived.global_batch) if val_paths else None
    log = RunLog(out, cfg.tensorboard, append=cfg.resume, enabled=is_main)

    n_params = sum(x.size for x in jax.tree.leaves(state.params["backbone"]))
    progress.message(
        f"jaxface: {cfg.network} ({n_params:,} backbone params), {cfg.num_classes:,} classes "
        f"over {mesh.size} {mesh.devices.flat[0].platform} device(s) "
        f"{f'in {jax.process_count()} processes ' if jax.process_count() > 1 else ''}"
        f"({derived.num_local_classes:,} each), global batch {derived.global_batch}, "
        f"{cfg.precision}, steps {start_step + 1}-{derived.run_steps} -> {out}"
    )

    def checkpoint(step: int) -> None:
        meta = {
            "config": cfg.to_dict(),
            "step": step,
            "epoch": step / derived.steps_per_epoch,
            # The input stream is a pure function of the step: this is the data position.
            "data_position": {"next_step": step},
            "num_devices": mesh.size,
            "num_classes_padded": derived.num_classes_padded,
        }
        checkpointer.save(step, state, meta)

    def evaluate(step: int) -> list[dict]:
        results = verifier.run(state.params["backbone"], state.batch_stats)
        records = []
        for name, (result, best) in results.items():
            progress.message(format_result(name, step, result, best))
            record = {
                "step": step,
                "event": "val",
                "target": name,
                **result.as_dict(),
                "best": best,
            }
            log.write(record, prefix=f"val/{name}")
            records.append(record)
        return records

    # --- Loop. Metrics stay on the device until a log step fetches them all at once.
    feed = DeviceFeed(
        lambda step: _step_batch(loader, step, cfg.gradient_acc),
        batch_sharding(mesh) if cfg.gradient_acc == 1 else micro_batch_sharding(mesh),
        start=start_step,
        stop=derived.run_steps,
    )
    meter = Meter(derived.run_steps, derived.global_batch)
    pending: list = []
    history: list[dict] = []
    val_records: list[dict] = []
    t_start = time.perf_counter()
    step = start_step
    try:
        for step, (images, labels) in enumerate(feed, start=start_step + 1):
            state, metrics = step_fn(state, images, labels)
            pending.append(metrics)
            if step == start_step + 1:
                jax.block_until_ready(metrics)
                meter.start(step)
                progress.message(
                    f"step {step} compiled and ran in {time.perf_counter() - t_start:.1f} s"
                )
            last = step == derived.run_steps
            epoch_end = step % derived.steps_per_epoch == 0
            if step % cfg.frequent == 0 or last:
                history.append(
                    _log_window(step, pending, derived, meter, history, policy.loss_scaling)
                )
                pending.clear()
                log.write(history[-1])
                progress.update(history[-1])
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or epoch_end or last:
                checkpoint(step)
            if (epoch_end or last) and is_main:
                export_backbone(out, state.params["backbone"], state.batch_stats, cfg.network, step)
            if verifier is not None and (step % cfg.verbose == 0 or last):
                val_records += evaluate(step)
    except KeyboardInterrupt:
        progress.message(f"interrupted after step {step}; resume with --config.resume=true")
        raise
    finally:
        feed.close()
        loader.close()
        progress.close()
        checkpointer.close()
        log.close()

    if not history:
        progress.message(
            f"nothing to do: the checkpoint is at step {start_step} of {derived.run_steps}"
        )
        return {"steps": derived.run_steps, "state": state, "history": [], "val": []}
    summary = {
        "steps": derived.run_steps,
        "first_loss": history[0]["loss"],
        "final_loss": history[-1]["loss"],
        "wall_s": time.perf_counter() - t_start,
    }
    rates = [r["samples_per_sec"] for r in history if r["samples_per_sec"] == r["samples_per_sec"]]
    if rates:
        summary["samples_per_sec"] = float(np.median(rates))
    if val_records:
        summary["val"] = {r["target"]: r["accuracy"] for r in val_records[-len(val_paths) :]}
    if is_main:
        with (out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"event": "summary", **summary}) + "\n")
    val_text = "".join(f", {k} accuracy {100 * v:.2f}%" for k, v in summary.get("val", {}).items())
    took = format_duration(summary["wall_s"])
    progress.message(
        f"done: steps {start_step + 1}-{derived.run_steps} in {took}, "
        f"loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}{val_text}; "
        f"logs, checkpoints and backbone in {out}"
    )
    return {**summary, "state": state, "history": history, "val_records": val_records}


def _init_backbone_from(cfg, state, shardings):
    """Fine-tuning: a released backbone (torch model.pt or jaxface .npz), a fresh head.

    The optimizer state needs no change: momentum and Adam moments start at zero."""
    import jax

    from jaxface.config import ConfigError
    from jaxface.convert import ConvertError, init_backbone_from_torch

    try:
        params, stats = init_backbone_from_torch(cfg.init_from, cfg.network, cfg.embedding_size)
    except ConvertError as exc:
        raise ConfigError(
            f"{cfg.source}: config key 'init_from'={cfg.init_from!r}: {exc}"
        ) from None
    return state.replace(
        params={**state.params, "backbone": jax.device_put(params, shardings.params["backbone"])},
        batch_stats=jax.device_put(stats, shardings.batch_stats),
    )


def _make_loader(cfg, derived, is_main: bool):
    """The host loader over cfg.rec: RecordIO, image folder, TFDS or in-memory synthetic."""
    import jax

    from jaxface.config import ConfigError
    from jaxface.data import HostLoader, RecordIOError, SyntheticDataset, open_source
    from jaxface.data.pack import ensure_synthetic

    if cfg.rec == "synthetic":
        source = SyntheticDataset(
            cfg.num_classes, cfg.num_image, cfg.seed, cfg.synthetic_noise, cfg.synthetic_jitter
        )
    else:
        if cfg.pack_synthetic and is_main:
            # Held-out samples (numbers >= num_image // C) stay out of the file.
            ensure_synthetic(
                cfg.rec,
                cfg.num_classes,
                cfg.num_image // cfg.num_classes,
                cfg.seed,
                cfg.synthetic_noise,
                cfg.synthetic_jitter,
                workers=cfg.num_workers or None,
            )
        if cfg.pack_synthetic and jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("synthetic pack written")
        try:
            source = open_source(cfg.rec, num_classes=cfg.num_classes)
        except (RecordIOError, OSError, ValueError) as exc:
            raise ConfigError(f"{cfg.source}: config key 'rec'={cfg.rec!r}: {exc}") from None
        if source.num_classes > cfg.num_classes:
            raise ConfigError(
                f"{cfg.source}: config key 'num_classes'={cfg.num_classes}, but {cfg.rec} has "
                f"{source.num_classes} identities"
            )
    try:
        return HostLoader(
            source,
            derived.global_batch,
            seed=cfg.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            workers=cfg.num_workers,
            flip=cfg.flip,
            augment=cfg.augment,
            skip_corrupt=cfg.skip_corrupt,
        )
    except ValueError as exc:
        raise ConfigError(f"{cfg.source}: config key 'rec'={cfg.rec!r}: {exc}") from None


def _step_batch(loader, step: int, grad_accum: int):
    """This process's rows of optimizer step `step`: one batch, or [k, rows, ...] for k > 1."""
    import numpy as np

    if grad_accum == 1:
        return loader.batch(step)
    micro = [loader.batch(step * grad_accum + i) for i in range(grad_accum)]
    return tuple(np.stack(parts) for parts in zip(*micro, strict=True))


def _log_window(step, pending, derived, meter, history, loss_scaling=False) -> dict:
    """Fetch the pending metrics (the only host sync), check them, make one log record.

    Under fp16 loss scaling a non-finite step is skipped and the scale halved (GradScaler);
    the run stops only when the scale has collapsed below 1, i.e. real divergence."""
    import jax
    import numpy as np

    fetched = jax.device_get(pending)
    first_step = step - len(fetched) + 1
    for i, m in enumerate(fetched):
        tolerated = loss_scaling and float(m["loss_scale"]) >= 1.0
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
        "epoch": (step - 1) // derived.steps_per_epoch,
        "loss": float(np.mean(finite)) if finite else float("nan"),
        "skipped_steps": sum(not bool(m["grads_finite"]) for m in fetched),
        "loss_scale": float(fetched[-1]["loss_scale"]),
        "lr": float(fetched[-1]["lr"]),
        "backbone_grad_norm": float(fetched[-1]["backbone_grad_norm"]),
        **meter.window(step),
    }


def main(argv: list[str] | None = None) -> int:
    from jaxface.config import ConfigError, load_config, parse_overrides

    args, rest = _parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, parse_overrides(rest))
        train(cfg)
    except ConfigError as exc:
        print(f"jaxface.train: error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"jaxface.train: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
