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
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxface.data.decode import DecodeError, decode_image, encode_jpeg
from jaxface.data.recordio import RecordIOWriter, pack_payload

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


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


def list_image_folder(root: str | Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """(path, label) of every image under root/IDENTITY/, identities sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder of identity sub-folders")
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not names:
        raise ValueError(f"{root} has no sub-folders (one per identity expected)")
    items = []
    for label, name in enumerate(names):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        items.extend((p, label) for p in files)
    if not items:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return items, names


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
    from jaxface.data.synthetic import SyntheticFaces

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
) -> PackSummary:
    """Pack SyntheticFaces: image (c, s) for c < num_classes, s < images_per_class, class
    major. Held-out synthetic samples (s >= images_per_class) stay out of the file.
    Drawing an image costs more than encoding it, so identities are drawn by `workers`
    processes (default: one per core; 0 = in this process). The bytes do not depend on it."""
    faces_args = (num_classes, seed, noise, jitter)
    jobs = [(faces_args, c, images_per_class, quality) for c in range(num_classes)]
    workers = (os.cpu_count() or 1) if workers is None else workers

    def items(encoded_identities):
        for c, jpegs in enumerate(encoded_identities):
            for jpeg in jpegs:
                yield jpeg, c

    if workers <= 1 or num_classes < 2 * workers:
        return pack_records(out_prefix, items(map(_synthetic_identity, jobs)), image_size=None)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn")) as pool:
        encoded = pool.map(_synthetic_identity, jobs, chunksize=4)
        return pack_records(out_prefix, items(encoded), image_size=None)


def ensure_synthetic(
    out_prefix: str | Path,
    num_classes: int,
    images_per_class: int,
    seed: int = 0,
    noise: float = 0.35,
    jitter: int = 4,
    quality: int = 95,
    workers: int | None = None,
) -> Path:
    """Path of `OUT_PREFIX.rec`, packed by pack_synthetic unless a pack with the same
    parameters is already there (recorded in `OUT_PREFIX.json`). Writes go to temporary
    names renamed at the end, so an interrupted pack is never mistaken for a finished one.
    Call it from one process (e.g. process 0) and let the others wait for it."""
    prefix = Path(out_prefix)
    rec, idx = prefix.with_name(prefix.name + ".rec"), prefix.with_name(prefix.name + ".idx")
    stamp = prefix.with_name(prefix.name + ".json")
    params = dict(
        num_classes=num_classes,
        images_per_class=images_per_class,
        seed=seed,
        noise=noise,
        jitter=jitter,
        quality=quality,
    )
    if rec.is_file() and idx.is_file() and stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == params:
                return rec
        except ValueError:
            pass  # a damaged stamp: pack again
    tmp = prefix.with_name(f"{prefix.name}.tmp{os.getpid()}")
    summary = pack_synthetic(
        tmp, num_classes, images_per_class, seed, noise, jitter, quality, workers
    )
    stamp.unlink(missing_ok=True)
    os.replace(summary.idx, idx)
    os.replace(summary.rec, rec)
    stamp.write_text(json.dumps(params))
    return rec


def main(argv: list[str] | None = None) -> int:
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
    try:
        if args.synthetic:
            try:
                classes, per_class = (int(v) for v in args.synthetic.lower().split("x"))
            except ValueError:
                parser.error(f"--synthetic {args.synthetic!r}: expected CxN, e.g. 1000x20")
            summary = pack_synthetic(
                args.out_prefix, classes, per_class, args.seed, args.noise, quality=args.quality
            )
        else:
            summary = pack_folder(args.src, args.out_prefix, args.quality, args.image_size or None)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {summary.rec} and {summary.idx}: {summary.num_images:,} images, "
        f"{summary.num_classes:,} identities"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
