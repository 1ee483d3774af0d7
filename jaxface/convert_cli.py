"""python -m jaxface.convert {torch2jax,jax2torch,head2jax,head2torch} ... (see --help)

Backbones between a PyTorch `model.pt` and jaxface's `.npz`; heads between arcface_torch's
per-rank `checkpoint_gpu_{rank}.pt` files and jaxface's head `.npz`.
Exit status: 0 done, 2 a file or argument that cannot be used.
"""

from __future__ import annotations

import argparse
import sys

from jaxface import cli
from jaxface.config import load_config
from jaxface.convert import flax_to_torch
from jaxface.fileio import ConvertError, refuse_existing
from jaxface.head_shards import (
    centres_to_shards,
    load_head,
    load_head_shards,
    save_head,
    save_head_shards,
    shards_to_centres,
)
from jaxface.weights import load_backbone, save_torch_state_dict, save_weights


def _num_classes(args) -> int:
    if args.num_classes is not None:
        return args.num_classes
    if args.config is None:
        raise ConvertError("give --num-classes or --config")
    return load_config(args.config).num_classes


def main(argv: list[str] | None = None) -> int:
    return cli.run("jaxface.convert", _main, argv)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxface.convert",
        description="Convert weights between arcface_torch/torchref and jaxface.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("torch2jax", help="model.pt -> jaxface weights .npz")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--network", help="checked against the file; detected when omitted")
    p = sub.add_parser("jax2torch", help="jaxface weights .npz -> model.pt")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--network", help="checked against the file")
    for name, text in (
        ("head2jax", "checkpoint_gpu_{rank}.pt files (or their folder) -> jaxface head .npz"),
        ("head2torch", "jaxface head .npz -> checkpoint_gpu_{rank}.pt files in a folder"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("src", nargs="+" if name == "head2jax" else None)
        p.add_argument("dst")
        p.add_argument("--num-classes", type=int)
        p.add_argument("--config", help="read num_classes from this config file")
        if name == "head2torch":
            p.add_argument("--world-size", type=int, required=True, help="arcface_torch ranks")
            p.add_argument("--backbone", help="also store this model.pt / .npz in every file")
    args = parser.parse_args(argv)
    if args.command != "head2torch":  # head2torch writes a folder of rank files
        refuse_existing(args.dst)
    if args.command in ("torch2jax", "jax2torch"):
        params, stats, info = load_backbone(args.src, args.network)
        network, step = info["network"], info.get("step", 0)
        if args.command == "torch2jax":
            save_weights(args.dst, params, stats, network, step)
        else:
            save_torch_state_dict(flax_to_torch(params, stats, network, step), args.dst)
        print(f"{args.src} ({network}) -> {args.dst}")
    elif args.command == "head2jax":
        num_classes = _num_classes(args)
        shards = load_head_shards(args.src)
        centres = shards_to_centres(shards, num_classes, 1)
        save_head(args.dst, centres, num_classes)
        print(f"{len(shards)} head shards, {num_classes} classes -> {args.dst}")
    else:
        num_classes = _num_classes(args)
        centres = load_head(args.src, num_classes, 1)
        backbone = None
        if args.backbone:
            params, stats, info = load_backbone(args.backbone)
            backbone = flax_to_torch(params, stats, info["network"])
        paths = save_head_shards(
            centres_to_shards(centres, num_classes, args.world_size), args.dst, backbone
        )
        print(f"{args.src} -> {len(paths)} files in {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
