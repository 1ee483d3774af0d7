"""python -m torchref.export_onnx --weights model.pt [--network r50] --out model.onnx

Exports the backbone (eval mode, float32) with a dynamic batch dimension. Input `input`:
float32 [N, 3, 112, 112], normalised (x / 255 - 0.5) / 0.5, RGB, as arcface_torch's
export; output `embedding` [N, E], not normalised. `--check` compares onnxruntime's output
with torch's on random images.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

from jaxface import cli
from jaxface.fileio import ConvertError, refuse_existing
from jaxface.models.names import NETWORKS
from torchref.infer import load_model


def export(model: torch.nn.Module, path: str | Path) -> None:
    """Write `model` (eval mode) as ONNX with a dynamic batch axis, under a temporary name
    renamed when complete."""
    if find_spec("onnxscript") is None:
        raise ConvertError(
            "ONNX export needs onnxscript (torch's exporter uses it): pip install -e '.[onnx]'"
        )
    model = model.eval()
    dummy = torch.zeros(2, 3, 112, 112)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    # torch.export-based exporter (needs onnxscript): the TorchScript one is deprecated.
    # One file (no external data): r200 is about 0.5 GB, under protobuf's 2 GB limit.
    # The exporter's chatter says nothing about this model: a line per torchvision operator
    # it skips (torchvision is not needed), its own deprecation warnings, its progress.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    try:
        registration.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(
                model,
                (dummy,),
                str(tmp),
                input_names=["input"],
                output_names=["embedding"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        os.replace(tmp, path)
    finally:
        registration.setLevel(level)
        tmp.unlink(missing_ok=True)


def check(model: torch.nn.Module, path: str | Path, batch: int = 3) -> float:
    """Max abs difference between onnxruntime and torch on `batch` random inputs."""
    # onnxruntime is the optional `onnx` extra, needed by --check only.
    import onnxruntime as ort

    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (batch, 3, 112, 112)))
    x = x.float()
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": x.numpy()})
    return float(np.abs(got - expected).max())


def main(argv: list[str] | None = None) -> int:
    return cli.run("torchref.export_onnx", _main, argv)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchref.export_onnx")
    parser.add_argument("--weights", required=True, help="model.pt (torch) or weights .npz")
    parser.add_argument("--network", choices=list(NETWORKS))
    parser.add_argument("--out", required=True, help="the .onnx file to write (must not exist)")
    parser.add_argument("--check", action="store_true", help="compare with onnxruntime")
    args = parser.parse_args(argv)
    refuse_existing(args.out)
    model = load_model(args.weights, args.network)
    export(model, args.out)
    print(f"wrote {args.out}")
    if args.check:
        print(f"onnxruntime vs torch, max abs difference: {check(model, args.out):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
