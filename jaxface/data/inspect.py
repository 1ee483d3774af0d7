"""Describe a dataset and draw a montage of a few identities.

    python -m jaxface.data.inspect PATH [--montage FILE.png] [--check] [--write-idx]

PATH: a `.rec` (or its folder / prefix), an image folder, or tfds:NAME. Prints records,
identities, image sizes and the label range; `--check` decodes every image and lists the
bad ones (file, record key, byte offset); `--write-idx` scans a `.rec` and writes its index.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from jaxface.data.recordio import (
    RecordIODataset,
    RecordIOError,
    resolve_rec_path,
    write_index,
)
from jaxface.data.sources import open_source


def _labels(source) -> np.ndarray:
    if isinstance(source, RecordIODataset):
        return source.labels()
    if hasattr(source, "labels"):
        return np.asarray(source.labels)
    return np.asarray([source[i][1] for i in range(len(source))])


def montage(source, labels: np.ndarray, identities: int, per_identity: int) -> np.ndarray:
    """uint8 grid: one row per identity (the first ones), its first images across."""
    rows = []
    for c in np.unique(labels)[:identities]:
        picks = np.flatnonzero(labels == c)[:per_identity]
        images = [source[int(i)][0] for i in picks]
        h, w = images[0].shape[:2]
        row = np.zeros((h, w * per_identity, 3), np.uint8)
        for k, img in enumerate(images):
            row[:, k * w : (k + 1) * w] = img
        rows.append(row)
    width = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows])


def describe(args) -> int:
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
        sizes = Counter(source[int(i)][0].shape for i in sample)
        shown = ", ".join(f"{w}x{h}x{c}: {k}" for (h, w, c), k in sizes.most_common())
        print(f"  image sizes (of {sample.size} sampled): {shown}")
    if args.check:
        bad = 0
        for i in range(n):
            try:
                source[i]
            except RecordIOError as exc:
                bad += 1
                print(f"  BAD image {i}: {exc}")
        print(f"  check: {n - bad:,} good, {bad:,} bad")
    if n and args.identities > 0:
        out = Path(args.montage or f"{Path(str(args.path)).stem}_montage.png")
        from PIL import Image

        Image.fromarray(montage(source, labels, args.identities, args.per_identity)).save(out)
        print(f"  montage of {min(args.identities, present.size)} identities: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxface.data.inspect", description=__doc__)
    parser.add_argument("path")
    parser.add_argument("--montage", help="PNG to write (default: ./<name>_montage.png)")
    parser.add_argument("--identities", type=int, default=8, help="rows of the montage")
    parser.add_argument("--per-identity", type=int, default=8, help="images per row")
    parser.add_argument("--check", action="store_true", help="decode every image")
    parser.add_argument("--write-idx", action="store_true", help="scan the .rec, write .idx")
    args = parser.parse_args(argv)
    try:
        if args.write_idx:
            idx = write_index(resolve_rec_path(args.path))
            print(f"wrote {idx}")
        return describe(args)
    except (ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
