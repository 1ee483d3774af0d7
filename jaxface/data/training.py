"""The training input of a config, shared by jaxface.train, torchref.train and compare.

`prepare(cfg)` packs the demo's synthetic RecordIO when the config asks for it (call it from
one process); `make_loader(...)` opens `cfg.rec` and returns the HostLoader that yields each
process's rows of every global batch, a pure function of the step. Both frameworks read
through it, so one config gives jaxface and torchref the same batches. jax-free.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxface.config import Config, ConfigError
from jaxface.data.loader import HostLoader
from jaxface.data.pack import NotOurFileError, ensure_synthetic, synthetic_prefix
from jaxface.data.recordio import RecordIOError
from jaxface.data.sources import SyntheticDataset, open_source
from jaxface.data.synthetic import HELDOUT, SyntheticFaces, write_synthetic_bin
from jaxface.fileio import atomic_write

SYNTHETIC_VAL_PAIRS = 600  # the demo's held-out verification set


def prepare(cfg: Config, say=print) -> None:
    """With pack_synthetic, make sure `cfg.rec` holds the packed synthetic identities
    (packing them on first use, with progress through `say`). Never touches files it did
    not create."""
    if cfg.rec == "synthetic" or not cfg.pack_synthetic:
        return
    try:
        # Held-out samples (numbers >= num_image // C) stay out of the file.
        ensure_synthetic(
            cfg.rec,
            cfg.num_classes,
            cfg.num_image // cfg.num_classes,
            cfg.seed,
            cfg.synthetic_noise,
            cfg.synthetic_jitter,
            workers=cfg.num_workers or None,
            say=say,
        )
    except NotOurFileError as exc:
        raise ConfigError(f"{cfg.source}: config key 'rec'={cfg.rec!r}: {exc}") from None


def open_training_source(cfg: Config):
    """The image source `cfg.rec` names, checked against the config before any step runs:
    its labels must fit num_classes, and (for data the config did not make) its size must
    be num_image, which sets the epoch and so the schedule."""
    if cfg.rec == "synthetic":
        return SyntheticDataset(
            cfg.num_classes, cfg.num_image, cfg.seed, cfg.synthetic_noise, cfg.synthetic_jitter
        )
    rec = str(synthetic_prefix(cfg.rec)) + ".rec" if cfg.pack_synthetic else cfg.rec
    where = f"{cfg.source}: config key 'rec'={cfg.rec!r}"
    try:
        source = open_source(rec)
        # From the header's identity records, or a scan of every record's label.
        found = source.num_classes
    except (RecordIOError, OSError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if found > cfg.num_classes:
        raise ConfigError(
            f"{cfg.source}: config key 'num_classes'={cfg.num_classes}, but {rec} has "
            f"{found} identities (labels up to {found - 1}); set --config.num_classes={found}"
        )
    if not cfg.pack_synthetic and len(source) != cfg.num_image:
        raise ConfigError(
            f"{cfg.source}: config key 'num_image'={cfg.num_image}, but {rec} holds "
            f"{len(source)} images; set --config.num_image={len(source)} (it sets the "
            "epoch length, and with it the learning-rate schedule)"
        )
    return source


def make_loader(
    cfg: Config, global_batch: int, process_index: int = 0, process_count: int = 1
) -> HostLoader:
    """This process's HostLoader over `cfg.rec` (call `prepare` first)."""
    source = open_training_source(cfg)
    try:
        return HostLoader(
            source,
            global_batch,
            seed=cfg.seed,
            process_index=process_index,
            process_count=process_count,
            workers=cfg.num_workers,
            flip=cfg.flip,
            augment=cfg.augment,
            adaface=(
                (
                    cfg.crop_augmentation_prob,
                    cfg.low_res_augmentation_prob,
                    cfg.photometric_augmentation_prob,
                )
                if cfg.adaface_augment
                else None
            ),
            skip_corrupt=cfg.skip_corrupt,
        )
    except ValueError as exc:
        raise ConfigError(f"{cfg.source}: config key 'rec'={cfg.rec!r}: {exc}") from None


def _synthetic_val_set(cfg: Config, out: Path, say) -> Path:
    """The held-out synthetic pairs for cfg's data, written unless an identical set exists
    (its parameters are recorded in a sidecar, so a changed generator writes a new one)."""
    if cfg.rec == "synthetic":
        path = out / "synthetic.bin"
    else:  # beside our own pack (ensure_synthetic checked the folder is ours); a folder
        # named after the pack, so that the set is still called `synthetic`
        prefix = synthetic_prefix(cfg.rec)
        path = prefix.with_name(prefix.name + ".val") / "synthetic.bin"
        path.parent.mkdir(exist_ok=True)
    params = dict(
        num_classes=cfg.num_classes, num_image=cfg.num_image, seed=cfg.seed,
        noise=cfg.synthetic_noise, jitter=cfg.synthetic_jitter, pairs=SYNTHETIC_VAL_PAIRS,
        heldout=HELDOUT,
    )  # fmt: skip
    stamp = path.with_name(path.name + ".json")
    try:
        recorded = json.loads(stamp.read_text())
    except (OSError, ValueError):
        recorded = None
    if recorded == params and path.is_file():
        return path
    say(f"writing {SYNTHETIC_VAL_PAIRS} held-out synthetic pairs to {path}")
    faces = SyntheticFaces(cfg.num_classes, cfg.seed, cfg.synthetic_noise, cfg.synthetic_jitter)
    stamp.unlink(missing_ok=True)  # no stamp while the set changes: never a wrong match
    write_synthetic_bin(path, faces, cfg.num_image, SYNTHETIC_VAL_PAIRS)
    atomic_write(stamp, lambda f: f.write(json.dumps(params).encode()))
    return path


def step_batch(loader: HostLoader, step: int, grad_accum: int):
    """This process's rows of optimizer step `step`: one batch, or [k, rows, ...] for k > 1."""
    if grad_accum == 1:
        return loader.batch(step)
    micro = [loader.batch(step * grad_accum + i) for i in range(grad_accum)]
    return tuple(np.stack(parts) for parts in zip(*micro, strict=True))


def verification_paths(cfg: Config, out: Path, say=print) -> list[Path]:
    """Resolve val_targets to .bin files; the synthetic set is written on first use, beside
    the packed data (one per data folder, shared by every run on it) or, for rec=synthetic,
    in the run's folder."""
    paths = []
    for target in cfg.val_targets:
        if target == "synthetic":
            if cfg.rec != "synthetic" and not cfg.pack_synthetic:
                raise ConfigError(
                    f"{cfg.source}: val target 'synthetic' needs synthetic training data "
                    "(rec='synthetic' or pack_synthetic=true)"
                )
            path = _synthetic_val_set(cfg, out, say)
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
