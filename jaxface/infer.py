"""python -m jaxface.infer --weights W --network r50 (--images a.jpg ... | --npy x.npy) --out e.npy

W is a PyTorch `model.pt` (arcface_torch / torchref) or jaxface weights (`.npz`, see
jaxface.convert). Images are aligned 112x112 face crops; `--npy` takes uint8 NHWC RGB.
Embeddings are float32, computed in eval mode with full float32 matmul precision, not
normalised (as arcface_torch's backbone returns them). `python -m torchref.infer` takes the
same arguments; the argument parser and image reading here import no jax.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from PIL import Image, UnidentifiedImageError

from jaxface import cli
from jaxface.fileio import atomic_write, refuse_existing
from jaxface.models.names import IMAGE_SIZE, NETWORKS
from jaxface.weights import load_backbone


class InferError(ValueError):
    """Bad arguments or inputs; the message names them."""


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Face embeddings of aligned crops.")
    parser.add_argument("--weights", required=True, help="model.pt (torch) or weights .npz")
    parser.add_argument("--network", choices=list(NETWORKS), help="detected when omitted")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", help="image files (112x112 RGB crops)")
    source.add_argument("--npy", help="uint8 array [N, 112, 112, 3], RGB")
    parser.add_argument("--out", required=True, help="output .npy, float32 [N, E] (new file)")
    parser.add_argument("--batch-size", type=int, default=64)
    return parser


def read_inputs(args) -> np.ndarray:
    """uint8 [N, 112, 112, 3] RGB from --images or --npy."""
    if args.npy:
        try:
            images = np.load(args.npy, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InferError(f"--npy {args.npy!r} is not a .npy array: {exc}") from None
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (112, 112, 3):
            raise InferError(
                f"--npy {args.npy!r}: expected uint8 [N, 112, 112, 3] RGB, got "
                f"{images.dtype} {list(images.shape)}"
            )
        if len(images) == 0:
            raise InferError(f"--npy {args.npy!r} holds no images ([0, 112, 112, 3])")
        return images
    out = []
    for name in args.images:
        try:
            with Image.open(name) as img:
                rgb = np.asarray(img.convert("RGB"))
        except (OSError, UnidentifiedImageError) as exc:
            raise InferError(f"cannot read image {name!r}: {exc}") from None
        if rgb.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
            raise InferError(
                f"{name!r} is {rgb.shape[1]}x{rgb.shape[0]}; expected an aligned "
                f"{IMAGE_SIZE}x{IMAGE_SIZE} face crop"
            )
        out.append(rgb)
    return np.stack(out)


def embed(weights: str, network: str | None, images: np.ndarray, batch_size: int = 64):
    """float32 embeddings [N, E] of uint8 images with jaxface, eval mode, float32."""
    # jax only here: torchref.infer shares this module's command line without it.
    import jax
    import jax.numpy as jnp

    from jaxface.models import get_model
    from jaxface.precision import Policy
    from jaxface.step import make_embed_fn

    params, stats, info = load_backbone(weights, network)
    # Full float32 through the policy: the layers pass their precision explicitly, so a
    # jax.default_matmul_precision context would not reach them (TF32 on a GPU otherwise).
    policy = Policy("fp32", jnp.float32, tf32=False)
    model = get_model(info["network"], embedding_size=info["embedding_size"], policy=policy)
    fn = jax.jit(make_embed_fn(model))
    chunks = [
        np.asarray(fn(params, stats, images[i : i + batch_size]))
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(chunks).astype(np.float32)


def cli_main(prog: str, embed_fn, argv: list[str] | None) -> int:
    """The shared command line of jaxface.infer and torchref.infer."""

    def body(args: list[str]) -> int:
        parsed = build_parser(f"python -m {prog}").parse_args(args)
        out = refuse_existing(parsed.out)
        images = read_inputs(parsed)
        emb = embed_fn(parsed.weights, parsed.network, images, parsed.batch_size)
        atomic_write(out, lambda f: np.save(f, emb))
        print(f"{len(emb)} embeddings of size {emb.shape[1]} -> {out}")
        return 0

    return cli.run(prog, body, argv, ((InferError, 2),))


def main(argv: list[str] | None = None) -> int:
    return cli_main("jaxface.infer", embed, argv)


if __name__ == "__main__":
    sys.exit(main())
