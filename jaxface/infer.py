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
from pathlib import Path

import numpy as np

from jaxface.models.names import IMAGE_SIZE, NETWORKS


class InferError(ValueError):
    """Bad arguments or inputs; the message names them."""


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Face embeddings of aligned crops.")
    parser.add_argument("--weights", required=True, help="model.pt (torch) or weights .npz")
    parser.add_argument("--network", choices=list(NETWORKS), help="detected when omitted")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", help="image files (112x112 RGB crops)")
    source.add_argument("--npy", help="uint8 array [N, 112, 112, 3], RGB")
    parser.add_argument("--out", required=True, help="output .npy, float32 [N, E]")
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
        return images
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise InferError("--images needs Pillow: pip install pillow") from None
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
    import jax

    from jaxface.convert import embedding_size_of_params, load_backbone
    from jaxface.models import get_model
    from jaxface.step import make_embed_fn

    params, stats, network = load_backbone(weights, network)
    model = get_model(network, embedding_size=embedding_size_of_params(params))
    with jax.default_matmul_precision("highest"):
        fn = jax.jit(make_embed_fn(model))
        chunks = [
            np.asarray(fn(params, stats, images[i : i + batch_size]))
            for i in range(0, len(images), batch_size)
        ]
    return np.concatenate(chunks).astype(np.float32)


def cli_main(prog: str, embed_fn, argv: list[str] | None) -> int:
    """The shared command line of jaxface.infer and torchref.infer."""
    from jaxface.convert import ConvertError

    args = build_parser(f"python -m {prog}").parse_args(argv)
    try:
        images = read_inputs(args)
        emb = embed_fn(args.weights, args.network, images, args.batch_size)
    except (InferError, ConvertError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    np.save(Path(args.out), emb)
    print(f"{len(emb)} embeddings of size {emb.shape[1]} -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_main("jaxface.infer", embed, argv)


if __name__ == "__main__":
    sys.exit(main())
