"""Rerun the demo exactly as `make train` does and put what it prints into README.md.

    make demo-output          # about five minutes on 2 cores; rewrites README's demo block

The block sits between the two `demo-output` markers in README.md. Run it whenever the
trainer's output or the demo's numbers change; tests/test_readme.py checks that the
README's losses are what the demo computes today.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- demo-output: begin -->", "<!-- demo-output: end -->"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        # A fresh output folder, so the run starts at step 1 and packs nothing it need not.
        out = Path(tmp) / "demo"
        cmd = [sys.executable, "-m", "jaxface.train", "--config", "configs/demo.py",
               "--config.progress=plain", f"--config.output={out}"]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode:
            print(done.stdout + done.stderr, file=sys.stderr)
            return done.returncode
        text = done.stdout.replace(str(out), "work_dirs/demo")
    readme = ROOT / "README.md"
    block = f"{BEGIN}\n```\n{text.rstrip()}\n```\n{END}"
    new, count = re.subn(
        re.escape(BEGIN) + r".*?" + re.escape(END), block, readme.read_text(), flags=re.S
    )
    if count != 1:
        print(f"README.md must hold one {BEGIN} ... {END} block", file=sys.stderr)
        return 1
    readme.write_text(new)
    print(f"README.md: demo output replaced ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
