"""python -m jaxface.eval --weights W [--network r50] --bin lfw.bin [more.bin ...]

W is a run folder of jaxface.train, its `backbone.npz`, a checkpoint folder
(`RUN/checkpoints/STEP`), or an arcface_torch / torchref `model.pt`. Prints the 10-fold
verification accuracy of each set, at the training step the weights come from.
Exit status: 0 done, 1 unusable set, 2 bad arguments or weights.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import jax

from jaxface import cli
from jaxface.data.verification import VerificationSetError
from jaxface.mesh import make_mesh
from jaxface.models import get_model
from jaxface.step import make_embed_fn
from jaxface.verify import Verifier, format_result
from jaxface.weights import load_backbone


def main(argv: list[str] | None = None) -> int:
    return cli.run("jaxface.eval", _main, argv, ((VerificationSetError, 1),))


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxface.eval", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--weights",
        required=True,
        help="a run folder, its backbone.npz, a checkpoint folder (RUN/checkpoints/STEP) "
        "or a torch model.pt",
    )
    parser.add_argument("--network", help="backbone name; read from the weights if omitted")
    parser.add_argument(
        "--embedding-size", type=int, default=None, help="checked against the weights"
    )
    parser.add_argument("--bin", nargs="+", required=True, help="verification .bin files")
    parser.add_argument("--batch", type=int, default=64, help="images per device per call")
    args = parser.parse_args(argv)
    say = partial(print, file=sys.stderr, flush=True)  # progress; results go to stdout
    say(f"loading {args.weights}")
    params, batch_stats, info = load_backbone(args.weights, args.network, args.embedding_size)
    model = get_model(info["network"], embedding_size=info["embedding_size"])
    mesh = make_mesh()
    embed = jax.jit(make_embed_fn(model))
    batch = args.batch * mesh.size
    verifier = Verifier([Path(p) for p in args.bin], mesh, embed, batch, say)
    results = verifier.run(params, batch_stats)
    for name, (result, best) in results.items():
        print(format_result(name, info.get("step") or 0, result, best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
