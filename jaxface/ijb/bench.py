"""python -m jaxface.ijb.bench [--network r50] [--faces 1024] [--batch 64] [--workers N]

Throughput of jaxface.ijb's embedding pass on this machine, in faces/s (each face is two
forward passes: the image and its flip), on a synthetic IJB layout written to a temporary
folder (loose crops of --size pixels, JPEG) with random weights:
  align   reading + aligning in --workers processes, no device (after the first batch)
  embed   the device mesh alone, on one aligned batch (compile excluded)
  total   both overlapped, as `python -m jaxface.ijb` runs them (compile excluded, the
          workers' start-up included: use enough --faces to amortise it)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxface.ijb.aligner import Aligner
from jaxface.ijb.features import Backbone, Embedder, embed_faces
from jaxface.ijb.meta import read_meta
from jaxface.ijb.synthetic import write_layout
from jaxface.mesh import make_mesh
from jaxface.models import BACKBONES, get_model


def random_backbone(network: str, embedding_size: int) -> Backbone:
    model = get_model(network, embedding_size=embedding_size)
    variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 112, 112, 3))))()
    variables = jax.device_get(variables)
    return Backbone(variables["params"], variables["batch_stats"], network, embedding_size, "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxface.ijb.bench", description=__doc__)
    p.add_argument("--network", default="r50", choices=list(BACKBONES))
    p.add_argument("--faces", type=int, default=1024, help="faces in the synthetic layout")
    p.add_argument("--batch", type=int, default=64, help="faces per device per call")
    p.add_argument("--devices", type=int, default=None)
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--size", type=int, default=250, help="loose-crop side in pixels")
    p.add_argument("--tf32", action="store_true", help="TF32 convolutions (GPUs)")
    p.add_argument("--embed-calls", type=int, default=3, help="timed calls for 'embed'")
    args = p.parse_args(argv)

    mesh = make_mesh(args.devices)
    with tempfile.TemporaryDirectory(prefix="jaxface-ijb-bench-") as tmp:
        root = Path(tmp) / "IJBC"
        start = time.perf_counter()
        # About four faces a template (1-3 media of 1-3 images), four templates a subject.
        layout = write_layout(
            root, subjects=max(2, args.faces // 16), size=(args.size, args.size),
            identification=False,
        )  # fmt: skip
        meta = read_meta(root, "IJBC", "off")
        print(
            f"layout: {layout.faces} faces ({args.size}x{args.size} JPEG), written in "
            f"{time.perf_counter() - start:.1f} s; {args.network}, {mesh.size} "
            f"{mesh.devices.flat[0].platform} device(s), batch {args.batch} per device, "
            f"{args.workers} workers, tf32 {args.tf32}"
        )
        embedder = Embedder(random_backbone(args.network, 512), mesh, args.batch, args.tf32)
        results = {}

        aligner = Aligner(meta, embedder.batch, args.workers, prefetch=2)
        try:
            batches = [aligner.get(0)]  # the clock starts once the workers are up
            start = time.perf_counter()
            batches += [aligner.get(b) for b in range(1, aligner.num_batches)]
        finally:
            aligner.close()
        aligned = sum(len(b) for b in batches[1:])
        results["align"] = aligned / (time.perf_counter() - start) if aligned else float("nan")

        batch = batches[0]
        embedder(batch).block_until_ready()  # compile
        start = time.perf_counter()
        for _ in range(args.embed_calls):
            out = embedder(batch)
        out.block_until_ready()
        results["embed"] = args.embed_calls * len(batch) / (time.perf_counter() - start)

        start = time.perf_counter()
        embed_faces(meta, embedder, args.workers, 2, progress="none")
        results["total"] = layout.faces / (time.perf_counter() - start)
    for name, rate in results.items():
        print(f"{name:6s} {rate:10,.1f} faces/s")
    ijbc = 469_375
    print(f"IJB-C ({ijbc:,} faces) at the total rate: {ijbc / results['total'] / 60:,.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
