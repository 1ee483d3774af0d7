"""Describe a dataset and draw a montage of a few identities.

    python -m jaxface.data.inspect PATH [--montage FILE.png] [--check] [--write-idx]

PATH: a `.rec` (or its folder / prefix), an image folder, or tfds:NAME. Prints records,
identities, image sizes and the label range; `--check` decodes every image and lists every
bad one (file, record key, byte offset), and exits 1 if there is any (as `gzip -t` or
`git fsck` do), 0 when every record is good; `--montage FILE.png` draws the first identities
(images of another size resized into their tile); `--write-idx` scans a `.rec` and writes
its index (never over an existing one).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import numpy as np
from PIL import Image

from jaxface import cli
from jaxface.data.recordio import RecordIOError, resolve_rec_path, write_index
from jaxface.data.sources import RecordIODataset, open_source
from jaxface.fileio import atomic_write, refuse_existing


def _labels(source) -> np.ndarray:
    if isinstance(source, RecordIODataset):
        return source.labels()
    if hasattr(source, "labels"):
        return np.asarray(source.labels)
    return np.asarray([source[i][1] for i in range(len(source))])


def _readable(source, indices) -> tuple[list[tuple[int, np.ndarray]], list[str]]:
    """(index, image) of those that decode, and a line for each that does not."""
    good, bad = [], []
    for i in indices:
        try:
            good.append((int(i), source[int(i)][0]))
        except RecordIOError as exc:
            bad.append(f"image {int(i)}: {exc}")
    return good, bad


def montage(source, labels: np.ndarray, identities: int, per_identity: int, size: int = 112):
    """(uint8 grid, notes): one row per identity (the first ones), its first images across,
    each tile `size` x `size`; images of another size are resized into their tile, and
    unreadable ones left black, both counted in the notes."""
    rows, resized, unreadable = [], 0, 0
    for c in np.unique(labels)[:identities]:
        picks = np.flatnonzero(labels == c)[:per_identity]
        row = np.zeros((size, size * per_identity, 3), np.uint8)
        images, bad = _readable(source, picks)
        unreadable += len(bad)
        for k, (_, img) in enumerate(images):
            if img.shape[:2] != (size, size):
                img = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
                resized += 1
            row[:, k * size : (k + 1) * size] = img
        rows.append(row)
    notes = []
    if resized:
        notes.append(f"{resized} image(s) of another size resized to {size}x{size}")
    if unreadable:
        notes.append(f"{unreadable} unreadable image(s) left black")
    return np.concatenate(rows), notes


def describe(args) -> int:
    montage_path = refuse_existing(args.montage) if args.montage else None
    source = open_source(args.path, image_size=None)
    n = len(source)
    print(f"source: {args.path} ({type(source).__name__})")
    if isinstance(source, RecordIODataset):
        rec = source.records
        print(f"  file: {rec.path} ({rec.size:,} bytes), index {rec.idx_path}")
        print(f"  records in index: {len(rec.keys):,}")
        if source.header:
            a, b = source.header
            print(
                f"  InsightFace header [a, b] = [{a}, {b}]: images = records 1..{a - 1}, "
                f"identity records {a}..{b - 1}"
            )
        else:
            print("  no header record (im2rec layout): every record is an image")
    labels = _labels(source)
    counts = np.bincount(labels) if n else np.zeros(0, int)
    present = counts[counts > 0]
    print(f"  images: {n:,}")
    print(f"  identities: {source.num_classes:,} ({present.size:,} with images)")
    if n:
        print(f"  label range: [{labels.min()}, {labels.max()}]")
        print(
            f"  images per identity: min {present.min()}, mean {present.mean():.1f}, "
            f"max {present.max()}"
        )
        sample = np.unique(np.linspace(0, n - 1, min(n, 64)).astype(int))
        images, bad = _readable(source, sample)
        sizes = Counter(img.shape for _, img in images)
        shown = ", ".join(f"{w}x{h}x{c}: {k}" for (h, w, c), k in sizes.most_common())
        unread = f"; {len(bad)} unreadable (see --check)" if bad else ""
        print(f"  image sizes (of {sample.size} sampled): {shown}{unread}")
    status = 0
    if args.check:
        _, bad = _readable(source, range(n))
        for line in bad:
            print(f"  BAD {line}")
        print(f"  check: {n - len(bad):,} good, {len(bad):,} bad")
        status = 1 if bad else 0
    if n and montage_path is not None:
        grid, notes = montage(source, labels, args.identities, args.per_identity)
        atomic_write(montage_path, lambda f: Image.fromarray(grid).save(f, format="PNG"))
        extra = f" ({'; '.join(notes)})" if notes else ""
        shown = min(args.identities, present.size)
        print(f"  montage of {shown} identities: {montage_path}{extra}")
    return status


def main(argv: list[str] | None = None) -> int:
    return cli.run("jaxface.data.inspect", _main, argv, ((RecordIOError, 2), (ValueError, 2)))


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxface.data.inspect", description=__doc__)
    parser.add_argument("path")
    parser.add_argument("--montage", help="PNG to write (a new file); no montage without it")
    parser.add_argument("--identities", type=int, default=8, help="rows of the montage")
    parser.add_argument("--per-identity", type=int, default=8, help="images per row")
    parser.add_argument("--check", action="store_true", help="decode every image, list bad ones")
    parser.add_argument("--write-idx", action="store_true", help="scan the .rec, write .idx")
    args = parser.parse_args(argv)
    if args.write_idx:
        idx = write_index(resolve_rec_path(args.path))
        print(f"wrote {idx}")
    return describe(args)


if __name__ == "__main__":
    sys.exit(main())
