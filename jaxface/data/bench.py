"""Loader throughput against the decoder's one-core rate, measured in the same run.

    python -m jaxface.data.bench --rec PATH --workers N [--batch 256] [--seconds 5]

Prints images/s for (1) decode only, one core, bytes already in memory, and (2) the full
HostLoader (read, decode into the shared ring, flip, copy out) with N worker processes, and
the ratio of (2) to cores x (1), in alternating rounds; the median round is the verdict.
The goal is 80 % or more.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

from jaxface.data.decode import decode_image, jpeg_backend
from jaxface.data.loader import HostLoader
from jaxface.data.sources import open_source


def decode_rate(source, seconds: float, sample: int = 512) -> float:
    """Images/s of decode_image alone on this core (encoded bytes read beforehand)."""
    n = min(sample, len(source))
    blobs = [source.raw(i)[1] for i in range(n)]
    for data in blobs[:16]:
        decode_image(data)  # warm caches and lazy imports
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for data in blobs:
            decode_image(data)
        count += n
    return count / (time.perf_counter() - start)


def _cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """(CPU seconds of this process, of the given worker processes) from /proc."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    workers = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            workers += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            return usage.ru_utime + usage.ru_stime, float("nan")
    return usage.ru_utime + usage.ru_stime, workers


def loader_rate(loader: HostLoader, seconds: float) -> dict:
    """Images/s the loader hands out, and the CPU seconds the main process and the workers
    spent meanwhile. The batches already waiting in the prefetch ring are taken first and
    not counted: they were decoded before the clock started."""
    for _ in range(loader.prefetch + 1):
        next(loader)
    pids = list(getattr(loader._pool, "_processes", None) or {})
    main0, workers0 = _cpu_seconds(pids)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        images, _ = next(loader)
        count += len(images)
    wall = time.perf_counter() - start
    main1, workers1 = _cpu_seconds(pids)
    return dict(
        rate=count / max(wall, 1e-9), images=count, main=main1 - main0, workers=workers1 - workers0
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxface.data.bench", description=__doc__)
    parser.add_argument("--rec", required=True, help="a .rec (or its folder)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--prefetch", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurements")
    parser.add_argument("--augment", action="store_true")
    parser.add_argument(
        "--adaface-augment",
        action="store_true",
        help="AdaFace's crop, low-resolution and photometric augmentation, each with p 0.2",
    )
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    source = open_source(args.rec)
    print(f"{args.rec}: {len(source):,} images, {source.num_classes:,} identities")
    batch = min(args.batch, len(source))
    # Rounds alternate the two measurements so that a neighbour's load, or a clock that
    # drifts, weighs on both alike; the verdict is the median round's ratio.
    ratios, rounds = [], []
    with HostLoader(
        source,
        batch,
        workers=args.workers,
        prefetch=args.prefetch,
        augment=args.augment,
        adaface=(0.2, 0.2, 0.2) if args.adaface_augment else None,
    ) as loader:
        loader_rate(loader, 0.0)  # start the workers outside the measurement
        for r in range(args.rounds):
            one_core = decode_rate(source, args.seconds)
            run = loader_rate(loader, args.seconds)
            goal = args.cores * one_core
            ratios.append(run["rate"] / goal)
            rounds.append((one_core, run))
            print(
                f"round {r + 1}: decode only, one core ({jpeg_backend()} for JPEG): "
                f"{one_core:,.0f} images/s; loader, {args.workers} workers, batch {batch}"
                f"{', augment' if args.augment else ''}"
                f"{', adaface augment' if args.adaface_augment else ''}: "
                f"{run['rate']:,.0f} images/s = "
                f"{100 * ratios[-1]:.0f}% of {args.cores} cores x one-core decode ({goal:,.0f})"
            )
    order = sorted(range(len(ratios)), key=ratios.__getitem__)
    one_core, run = rounds[order[len(order) // 2]]
    total, cpu = run["images"], run["main"] + run["workers"]
    verdict = "meets" if ratios[order[len(order) // 2]] >= 0.8 else "misses"
    print(
        f"median round: loader {run['rate']:,.0f} images/s = "
        f"{100 * ratios[order[len(order) // 2]]:.0f}% of {args.cores} x {one_core:,.0f} "
        f"({verdict} the 80 % goal)"
    )
    # On a shared machine the wall-clock ratio also measures the neighbours; images per
    # CPU-second is the loader's own efficiency.
    print(
        f"loader CPU in that round: main {run['main']:.2f} s + workers {run['workers']:.2f} s "
        f"for {total:,} images = {total / cpu:,.0f} images per core-second = "
        f"{100 * total / cpu / one_core:.0f}% of one-core decode; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
