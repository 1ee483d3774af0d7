"""python -m compare.merge DIR [DIR ...] --out DIR: one table, JSON and chart from several
`python -m compare` runs (one per backbone, as compare/gpu_benchmark.sh makes them)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from compare import report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compare.merge")
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    metas, rows = [], []
    for run in args.runs:
        path = run / "results.json"
        if not path.exists():
            print(f"compare.merge: {path} is missing; left out", file=sys.stderr)
            continue
        data = json.loads(path.read_text())
        metas.append(data["meta"])
        rows += data["rows"]
    if not rows:
        print("compare.merge: error: no results to merge", file=sys.stderr)
        return 2
    meta = {**metas[0], "network": ", ".join(m["network"] for m in metas), "runs": metas}
    known = [m["device"] for m in metas if m["device"] != "?"]
    meta["device"] = known[0] if known else "?"
    paths = report.write(args.out, meta, rows)
    print(paths["table"].read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
