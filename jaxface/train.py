"""python -m jaxface.train --config configs/r50.py [--config.KEY=VALUE ...]

Sections: config, mesh, input, model, state (born sharded), step, loop, held-out check.
Exit status: 0 done, 1 non-finite loss, 2 bad config or arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

DEFAULT_CONFIG = "configs/demo.py"


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


def _prepare_output(cfg, derived) -> Path:
    out = Path(cfg.output)
    try:
        out.mkdir(parents=True, exist_ok=True)
        resolved = {"config": cfg.to_dict(), "source": cfg.source, "derived": vars(derived)}
        (out / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
        (out / "metrics.jsonl").write_text("")
    except OSError as exc:
        raise TrainingError(f"config key 'output'={cfg.output!r} cannot be written: {exc}") from exc
    return out


def _heldout_check(cfg, mesh, model, state, stream, progress) -> dict:
    """Score held-out same/different identity pairs by cosine similarity."""
    import jax
    import numpy as np

    from jaxface.mesh import batch_sharding
    from jaxface.step import make_embed_fn

    embed = jax.jit(make_embed_fn(model))
    images_a, images_b, same = stream.heldout_pairs(cfg.eval_pairs)
    images = np.concatenate([images_a, images_b])
    chunk = stream.global_batch
    pad = -len(images) % chunk
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    sharding = batch_sharding(mesh)
    params, stats = state.params["backbone"], state.batch_stats
    embeddings = np.concatenate(
        [
            np.asarray(embed(params, stats, jax.device_put(images[i : i + chunk], sharding)))
            for i in range(0, len(images), chunk)
        ]
    )[: 2 * len(same)]
    emb = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    n = len(same)
    sims = np.sum(emb[:n] * emb[n:], axis=1)
    thresholds = np.unique(sims)
    accuracy = max(np.mean((sims >= t) == same) for t in thresholds)
    result = {
        "event": "heldout",
        "pairs": int(n),
        "same_identity_cos": float(sims[same].mean()),
        "different_identity_cos": float(sims[~same].mean()),
        "best_threshold_accuracy": float(accuracy),
    }
    progress.message(
        f"held-out pairs ({n}, images never trained on): mean cosine same identity "
        f"{result['same_identity_cos']:.3f}, different {result['different_identity_cos']:.3f}; "
        f"accuracy at the best threshold {100 * accuracy:.1f}% (chance 50%)"
    )
    return result


def train(cfg) -> dict:
    """Run the job `cfg` describes. Returns a summary; raises TrainingError or ConfigError."""
    import jax
    import numpy as np

    from jaxface.config import ConfigError, derive
    from jaxface.data import SyntheticFaces, SyntheticStream
    from jaxface.feed import DeviceFeed
    from jaxface.heads import margin_from_config
    from jaxface.mesh import MeshError, batch_sharding, make_mesh, replicated
    from jaxface.models import get_model
    from jaxface.optim import make_optimizer
    from jaxface.precision import policy_from_config
    from jaxface.progress import Meter, Progress, format_duration
    from jaxface.step import make_init_fn, make_train_step, state_shardings

    # --- Mesh: 1-D over every device; backbone data-parallel, class centres split.
    try:
        mesh = make_mesh(cfg.num_devices)
    except MeshError as exc:
        raise ConfigError(f"{cfg.source}: {exc}") from None
    derived = derive(cfg, mesh.size)
    out = _prepare_output(cfg, derived)

    # --- Input.
    if cfg.rec != "synthetic":
        raise ConfigError(
            f"{cfg.source}: config key 'rec'={cfg.rec!r}: reading RecordIO datasets is not built "
            "yet (it is the data-pipeline issue); train on synthetic identities with "
            "--config.rec=synthetic"
        )
    faces = SyntheticFaces(cfg.num_classes, cfg.seed, cfg.synthetic_noise, cfg.synthetic_jitter)
    stream = SyntheticStream(faces, cfg.num_image, derived.global_batch, cfg.seed)
    rows = derived.global_batch // jax.process_count()
    row_start = jax.process_index() * rows

    # --- Model, head, optimizer.
    policy = policy_from_config(cfg)
    model = get_model(
        cfg.network,
        embedding_size=cfg.embedding_size,
        dropout=cfg.dropout,
        policy=policy,
        bn_groups=1 if cfg.sync_bn else mesh.size,
    )
    tx, schedule = make_optimizer(cfg, derived)
    margin = margin_from_config(cfg)

    # --- State, born sharded: shapes first, then a jitted init that lands each leaf in place.
    init = make_init_fn(model, tx, cfg.num_classes, derived.num_classes_padded)
    shardings = state_shardings(jax.eval_shape(init, 0), mesh)
    state = jax.jit(init, out_shardings=shardings)(cfg.seed)

    # --- Step: donated state, explicit output shardings.
    step_fn = jax.jit(
        make_train_step(model, tx, schedule, margin, cfg.num_classes, mesh),
        donate_argnums=0,
        out_shardings=(shardings, replicated(mesh)),
    )

    progress = Progress(cfg.progress, derived.run_steps)
    n_params = sum(x.size for x in jax.tree.leaves(state.params["backbone"]))
    progress.message(
        f"jaxface: {cfg.network} ({n_params:,} backbone params), {cfg.num_classes:,} classes "
        f"over {mesh.size} {mesh.devices.flat[0].platform} device(s) "
        f"({derived.num_local_classes:,} each), global batch {derived.global_batch}, "
        f"{cfg.precision}, {derived.run_steps:,} steps -> {out}"
    )

    # --- Loop. Metrics stay on the device until a log step fetches them all at once.
    feed = DeviceFeed(
        lambda step: stream.batch(step, row_start, row_start + rows),
        batch_sharding(mesh),
        start=0,
        stop=derived.run_steps,
    )
    meter = Meter(derived.run_steps, derived.global_batch)
    pending: list = []
    history: list[dict] = []
    first_loss = None
    t_start = time.perf_counter()
    try:
        with (out / "metrics.jsonl").open("a") as log:
            for step, (images, labels) in enumerate(feed, start=1):
                state, metrics = step_fn(state, images, labels)
                pending.append(metrics)
                if step == 1:
                    jax.block_until_ready(metrics)
                    meter.start(1)
                    progress.message(
                        f"step 1 compiled and ran in {time.perf_counter() - t_start:.1f} s"
                    )
                if step % cfg.frequent and step != derived.run_steps:
                    continue
                fetched = jax.device_get(pending)
                first_step = step - len(pending) + 1
                pending.clear()
                for i, m in enumerate(fetched):
                    if not math.isfinite(float(m["loss"])):
                        last = (
                            f"; the last finite loss was {history[-1]['loss']:.4f}"
                            if history
                            else ""
                        )
                        raise TrainingError(
                            f"loss is {float(m['loss'])} at step {first_step + i} "
                            f"(lr {float(m['lr']):.6g}){last}. Stopping: lower config key 'lr', "
                            "or check the data"
                        )
                if first_loss is None:
                    first_loss = float(fetched[0]["loss"])
                last_metrics = fetched[-1]
                record = {
                    "step": step,
                    "epoch": (step - 1) // derived.steps_per_epoch,
                    "loss": float(np.mean([float(m["loss"]) for m in fetched])),
                    "lr": float(last_metrics["lr"]),
                    "backbone_grad_norm": float(last_metrics["backbone_grad_norm"]),
                    **meter.window(step),
                }
                history.append(record)
                log.write(json.dumps(record) + "\n")
                log.flush()
                progress.update(record)
    except KeyboardInterrupt:
        progress.message(f"interrupted after step {int(jax.device_get(state.step))}")
        raise
    finally:
        feed.close()
        progress.close()

    summary = {
        "steps": derived.run_steps,
        "first_loss": first_loss,
        "final_loss": history[-1]["loss"],
        "wall_s": time.perf_counter() - t_start,
    }
    rates = [r["samples_per_sec"] for r in history if r["samples_per_sec"] == r["samples_per_sec"]]
    if rates:
        summary["samples_per_sec"] = float(np.median(rates))
    if cfg.eval_pairs:
        summary["heldout"] = _heldout_check(cfg, mesh, model, state, stream, progress)
    with (out / "metrics.jsonl").open("a") as log:
        log.write(json.dumps({"event": "summary", **summary}) + "\n")
    progress.message(
        f"done: {summary['steps']} steps in {format_duration(summary['wall_s'])}, loss "
        f"{first_loss:.3f} -> {summary['final_loss']:.3f}; logs in {out}"
    )
    summary["state"] = state
    return summary


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
