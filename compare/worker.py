"""python -m compare.worker --spec JSON --out FILE: one row, in a process of its own (under
torchrun for PyTorch on several devices). Writes the row's JSON to FILE (rank 0); a failure
is written there too, as {"error": ...}, so the driver can report it in the row."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from jaxface.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compare.worker")
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    spec = json.loads(args.spec)
    try:
        cfg = load_config(spec["config"], spec["overrides"])
        # One framework per worker process: importing the other would cost seconds and
        # memory, and may not be installed.
        if spec["framework"] == "jax":
            from compare.run_jax import run
        else:
            from compare.run_torch import run
        result = run(spec, cfg)
        status = 0
    except Exception as exc:  # noqa: BLE001 - every failure becomes the row's message
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}".strip()}
        status = 1
    if int(os.environ.get("RANK", 0)) == 0 and result.get("rank", 0) == 0:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
