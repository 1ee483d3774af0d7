"""Pack images into an InsightFace-style RecordIO file (`PREFIX.rec` + `PREFIX.idx`).

    python -m jaxface.data.pack SRC OUT_PREFIX      # SRC: one sub-folder per identity
    python -m jaxface.data.pack --synthetic 1000x20 OUT_PREFIX   # SyntheticFaces

Layout written: record 0 is the header (labels [a, b]), records 1 .. a-1 the images with
their class as a scalar label, records a .. b-1 one per identity holding its image range
[start, stop). `header=False` writes a plain im2rec-style file (every record an image).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxface import cli
from jaxface.data.decode import DecodeError, decode_image, encode_jpeg
from jaxface.data.recordio import RecordIOWriter, pack_payload
from jaxface.data.sources import list_image_folder
from jaxface.data.synthetic import SyntheticFaces
from jaxface.fileio import atomic_write
from jaxface.progress import format_duration


@dataclass(frozen=True)
class PackSummary:
    rec: Path
    idx: Path
    num_images: int
    num_classes: int


def _encoded(image, quality: int, check: bool) -> tuple[bytes, tuple[int, ...] | None]:
    """(JPEG or PNG bytes, image shape if known without another decode)."""
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
        if data[:2] == b"\xff\xd8" or data[:8] == b"\x89PNG\r\n\x1a\n":
            # Stored as-is: no second lossy encode.
            return data, decode_image(data).shape if check else None
        array = decode_image(data)
        return encode_jpeg(array, quality), array.shape
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] RGB image, got {array.dtype} {array.shape}")
    return encode_jpeg(array, quality), array.shape


def pack_records(
    out_prefix: str | Path,
    items: Iterable[tuple[object, int]],
    *,
    header: bool = True,
    quality: int = 95,
    image_size: int | None = 112,
) -> PackSummary:
    """Write (image, label) pairs: a uint8 RGB array (JPEG-encoded at `quality`) or encoded
    JPEG/PNG bytes (stored unchanged). With `header`, each label's images must be
    contiguous, as InsightFace's identity records describe one range per class, and labels
    must be 0 .. C-1."""
    prefix = Path(out_prefix)
    if prefix.suffix == ".rec":
        prefix = prefix.with_suffix("")
    rec, idx = prefix.with_name(prefix.name + ".rec"), prefix.with_name(prefix.name + ".idx")
    ranges: dict[int, list[int]] = {}
    last = None
    with RecordIOWriter(rec, idx) as writer:
        key = 0
        if header:
            # Placeholder of the final size; rewritten once the counts are known.
            header_offset = writer.write(0, pack_payload([0.0, 0.0], b""))
            key = 1
        for image, label in items:
            label = int(label)
            try:
                data, shape = _encoded(image, quality, image_size is not None)
            except DecodeError as exc:
                raise ValueError(f"image {key} (label {label}): {exc}") from None
            if image_size is not None and shape[:2] != (image_size, image_size):
                raise ValueError(
                    f"image {key} (label {label}) is {shape[1]}x{shape[0]}, expected "
                    f"{image_size}x{image_size}"
                )
            if header:
                if label != last and label in ranges:
                    raise ValueError(
                        f"label {label} appears again at image {key} after other labels: an "
                        "InsightFace header needs each identity's images contiguous (sort "
                        "the items by label, or pack with header=False)"
                    )
                ranges.setdefault(label, [key, key])[1] = key + 1
                last = label
            writer.write(key, pack_payload(float(label), data, id=key))
            key += 1
        num_images = key - 1 if header else key
        num_classes = len(ranges)
        if header:
            if ranges and sorted(ranges) != list(range(num_classes)):
                raise ValueError(
                    f"labels must be 0 .. {num_classes - 1} for a header; got "
                    f"{min(ranges)} .. {max(ranges)} with gaps"
                )
            first_identity = key
            for label in range(num_classes):
                writer.write(key, pack_payload(ranges[label], b"", id=key))
                key += 1
            writer.overwrite(header_offset, pack_payload([float(first_identity), float(key)], b""))
    return PackSummary(rec, idx, num_images, num_classes)


def pack_folder(
    src: str | Path, out_prefix: str | Path, quality: int = 95, image_size: int | None = 112
) -> PackSummary:
    """An image folder (one sub-folder per identity) -> InsightFace-style rec + idx."""
    items, _ = list_image_folder(src)

    def read():
        # Checked here, where the file's path is known, so errors can name it.
        for path, label in items:
            data = path.read_bytes()
            try:
                shape = decode_image(data).shape
            except DecodeError as exc:
                raise ValueError(f"{path}: {exc}") from None
            if image_size is not None and shape[:2] != (image_size, image_size):
                raise ValueError(
                    f"{path}: image is {shape[1]}x{shape[0]}, expected {image_size}x{image_size}"
                )
            yield data, label

    return pack_records(out_prefix, read(), quality=quality, image_size=None)


_FACES: dict = {}


def _synthetic_identity(args: tuple) -> list[bytes]:
    """JPEGs of one synthetic identity (runs in a worker; SyntheticFaces kept per process)."""
    faces_args, identity, count, quality = args
    faces = _FACES.get(faces_args)
    if faces is None:
        faces = _FACES[faces_args] = SyntheticFaces(*faces_args)
    return [encode_jpeg(faces.image(identity, s), quality) for s in range(count)]


def pack_synthetic(
    out_prefix: str | Path,
    num_classes: int,
    images_per_class: int,
    seed: int = 0,
    noise: float = 0.35,
    jitter: int = 4,
    quality: int = 95,
    workers: int | None = None,
    say=None,
) -> PackSummary:
    """Pack SyntheticFaces: image (c, s) for c < num_classes, s < images_per_class, class
    major. Held-out synthetic samples (s >= images_per_class) stay out of the file.
    Drawing an image costs more than encoding it, so identities are drawn by `workers`
    processes (default: one per core; 0 = in this process). The bytes do not depend on it.
    `say` (e.g. print) receives progress lines: rate and ETA about every 10 %."""
    faces_args = (num_classes, seed, noise, jitter)
    jobs = [(faces_args, c, images_per_class, quality) for c in range(num_classes)]
    workers = (os.cpu_count() or 1) if workers is None else workers
    t0 = time.perf_counter()
    every = max(1, num_classes // 10)

    def items(encoded_identities):
        for c, jpegs in enumerate(encoded_identities):
            for jpeg in jpegs:
                yield jpeg, c
            done = c + 1
            if say is not None and (done % every == 0 or done == num_classes):
                elapsed = time.perf_counter() - t0
                rate = done * images_per_class / max(elapsed, 1e-9)  # images/s
                eta = format_duration(elapsed / done * (num_classes - done))
                say(
                    f"  packed {done:,}/{num_classes:,} identities, {rate:,.0f} images/s, ETA {eta}"
                )

    if workers <= 1 or num_classes < 2 * workers:
        return pack_records(out_prefix, items(map(_synthetic_identity, jobs)), image_size=None)
    with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn")) as pool:
        encoded = pool.map(_synthetic_identity, jobs, chunksize=4)
        return pack_records(out_prefix, items(encoded), image_size=None)


SYNTHETIC_GENERATOR = "jaxface.data.pack.pack_synthetic"


class NotOurFileError(ValueError):
    """A path that synthetic packing would write holds data it did not create."""


def synthetic_prefix(rec: str | Path) -> Path:
    """Where pack_synthetic writes for a `rec` config value: a `.rec` path or a prefix
    writes PREFIX.rec/.idx, a folder FOLDER/train.rec/.idx (where open_source looks)."""
    path = Path(rec)
    if path.suffix == ".rec":
        return path.with_suffix("")
    if path.is_dir():
        return path / "train"
    return path


def ensure_synthetic(
    rec: str | Path,
    num_classes: int,
    images_per_class: int,
    seed: int = 0,
    noise: float = 0.35,
    jitter: int = 4,
    quality: int = 95,
    workers: int | None = None,
    say=print,
) -> Path:
    """Path of the synthetic `.rec` for `rec` (see synthetic_prefix), packed unless a pack
    with the same parameters is already there.

    Only files this function created are ever replaced: each pack is marked by a sidecar
    `PREFIX.synthetic.json` naming the generator and its parameters, and a `.rec`/`.idx`
    without it is the user's data: NotOurFileError, naming the path. Writes go to
    temporary names renamed at the end, so an interrupted pack is never mistaken for a
    finished one. Call it from one process (e.g. process 0) and let the others wait."""
    prefix = synthetic_prefix(rec)
    if Path(rec).is_dir():  # a folder named as the data: it must not be someone's photos
        _check_folder_is_ours(prefix)
    rec_path, idx = prefix.with_name(prefix.name + ".rec"), prefix.with_name(prefix.name + ".idx")
    stamp = prefix.with_name(prefix.name + ".synthetic.json")
    params = dict(
        generator=SYNTHETIC_GENERATOR,
        num_classes=num_classes,
        images_per_class=images_per_class,
        seed=seed,
        noise=noise,
        jitter=jitter,
        quality=quality,
    )
    existing = [p for p in (rec_path, idx) if p.exists()]
    recorded = _read_stamp(prefix)
    if existing and recorded is None:
        raise NotOurFileError(
            f"{existing[0]} exists and was not written by jaxface's synthetic packer (no "
            f"{stamp.name} beside it): refusing to overwrite it. Point config key 'rec' "
            "elsewhere, or set pack_synthetic=false to train on it"
        )
    if recorded == params and len(existing) == 2:
        return rec_path
    if existing:
        changed = ", ".join(
            f"{k} {recorded.get(k)} -> {v}" for k, v in params.items() if recorded.get(k) != v
        )
        say(f"repacking {rec_path}: its synthetic parameters changed ({changed})")
    else:
        say(
            f"packing {num_classes:,} synthetic identities x {images_per_class} images into "
            f"{rec_path} (first use)"
        )
    tmp = prefix.with_name(f".{prefix.name}.packing{os.getpid()}")
    summary = pack_synthetic(
        tmp, num_classes, images_per_class, seed, noise, jitter, quality, workers, say=say
    )
    stamp.unlink(missing_ok=True)  # no stamp while the files change: never a wrong match
    os.replace(summary.idx, idx)
    os.replace(summary.rec, rec_path)
    atomic_write(stamp, lambda f: f.write(json.dumps(params).encode()))
    return rec_path


def _check_folder_is_ours(prefix: Path) -> None:
    """Synthetic data goes only into a new or empty folder, or one holding nothing but an
    earlier pack: a folder with other files (a user's photos) is the user's data."""
    folder = prefix.parent
    ours = (prefix.name + ".", "." + prefix.name + ".")
    others = sorted(p.name for p in folder.iterdir() if not p.name.startswith(ours))
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise NotOurFileError(
            f"{folder} holds {len(others)} file(s) jaxface did not write ({shown}): "
            "synthetic identities are packed only into a new or empty folder. To train on "
            "your own images, set pack_synthetic=false (an image folder needs one "
            "sub-folder per identity: docs/data.md); for the demo, point 'rec' elsewhere"
        )


def _read_stamp(prefix: Path) -> dict | None:
    """The parameters of our own pack at `prefix`, or None when its files are not ours."""
    for stamp, legacy in ((prefix.with_name(prefix.name + ".synthetic.json"), False),
                          (prefix.with_name(prefix.name + ".json"), True)):  # fmt: skip
        try:
            recorded = json.loads(stamp.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(recorded, dict):
            continue
        if not legacy and recorded.get("generator") == SYNTHETIC_GENERATOR:
            return recorded
        # jaxface before this sidecar left `PREFIX.json` with exactly these parameters.
        if legacy and set(recorded) == set(LEGACY_KEYS):
            return {"generator": SYNTHETIC_GENERATOR, **recorded}
    return None


LEGACY_KEYS = ("num_classes", "images_per_class", "seed", "noise", "jitter", "quality")


def main(argv: list[str] | None = None) -> int:
    return cli.run("jaxface.data.pack", _main, argv, ((ValueError, 2),))


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxface.data.pack", description=__doc__)
    parser.add_argument("src", nargs="?", help="folder with one sub-folder of images per identity")
    parser.add_argument("out_prefix", help="writes OUT_PREFIX.rec and OUT_PREFIX.idx")
    parser.add_argument(
        "--synthetic", metavar="CxN", help="pack C synthetic identities of N images instead"
    )
    parser.add_argument("--seed", type=int, default=0, help="synthetic: seed")
    parser.add_argument("--noise", type=float, default=0.35, help="synthetic: pixel noise")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encodes")
    parser.add_argument(
        "--image-size", type=int, default=112, help="required size; 0 accepts any size"
    )
    args = parser.parse_args(argv)
    if (args.src is None) == (args.synthetic is None):
        parser.error("give either SRC or --synthetic CxN")
    if args.synthetic:
        try:
            classes, per_class = (int(v) for v in args.synthetic.lower().split("x"))
        except ValueError:
            parser.error(f"--synthetic {args.synthetic!r}: expected CxN, e.g. 1000x20")
        summary = pack_synthetic(
            args.out_prefix,
            classes,
            per_class,
            args.seed,
            args.noise,
            quality=args.quality,
            say=print,
        )
    else:
        summary = pack_folder(args.src, args.out_prefix, args.quality, args.image_size or None)
    print(
        f"wrote {summary.rec} and {summary.idx}: {summary.num_images:,} images, "
        f"{summary.num_classes:,} identities"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
