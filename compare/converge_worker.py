"""python -m compare.converge_worker --spec JSON: one run of python -m compare.converge in a
process of its own (one framework per process). Progress goes to stdout, one line at a
time; the result to spec["result"] (JSON) and the final embeddings to spec["vectors"]
(.npz), each written whole. A failure: the traceback on stderr, exit status 1."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import numpy as np

from jaxface.config import load_config
from jaxface.fileio import atomic_write


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compare.converge_worker")
    parser.add_argument("--spec", required=True)
    spec = json.loads(parser.parse_args(argv).spec)

    def say(line: str) -> None:
        print(line, flush=True)

    try:
        cfg = load_config(spec["config"], spec["overrides"])
        # Importing the other framework would cost seconds and memory, and may not be there.
        if spec["framework"] == "jax":
            from compare.converge_jax import run
        else:
            from compare.converge_torch import run
        result, vectors = run(spec, cfg, say)
    except Exception:  # noqa: BLE001 - the driver reports the last line, the log keeps all
        traceback.print_exc()
        return 1
    if spec.get("vectors") and vectors:
        atomic_write(Path(spec["vectors"]), lambda f: np.savez(f, **vectors))
    text = json.dumps(result)
    atomic_write(Path(spec["result"]), lambda f: f.write(text.encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
