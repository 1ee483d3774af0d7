"""python -m compare.denormals: does a repeated batch slow PyTorch down on this machine?

One batch repeated is learnt by heart; the loss falls towards 0 and the activations and
gradients fill with denormal numbers, on which PyTorch's CPU kernels can run several times
slower unless they are flushed to zero, as XLA does (torchref flushes them:
`torch.set_flush_denormal(True)`). This prints torch's samples/s with a pool of 1 batch and
of 8, and their ratio: near 1 when flushing works. A benchmark, not a test: the ratio of two
timings on a shared CPU is no pass/fail criterion.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from compare import cli

TINY = ["--config", "configs/demo.py", "--config.num_classes=20", "--config.embedding_size=16",
        "--frameworks", "torch", "--precision", "fp32", "--batch", "8", "--steps", "60",
        "--warmup", "60"]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    extra = list(sys.argv[1:] if argv is None else argv)
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for pool in (1, 8):
            out = Path(tmp) / f"pool{pool}"
            code = cli.main([*TINY, "--pool", str(pool), "--out", str(out), *extra])
            if code:
                return code
            rows = json.loads((out / "results.json").read_text())["rows"]
            (row,) = [r for r in rows if r["flavour"] == "stock"]
            rates[pool] = (row["samples_per_s"], row["loss"])
    for pool, (rate, loss) in rates.items():
        print(f"pool {pool}: {rate:.1f} samples/s, final loss {loss:.4f}")
    print(f"pool 1 / pool 8 samples/s: {rates[1][0] / rates[8][0]:.2f} (near 1: flushing works)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
