"""python -m torchref.export_onnx --weights model.pt [--network r50] --out model.onnx

Exports the backbone (eval mode, float32) with a dynamic batch dimension. Input `input`:
float32 [N, 3, 112, 112], normalised (x / 255 - 0.5) / 0.5, RGB, as arcface_torch's
export; output `embedding` [N, E], not normalised. `--check` compares onnxruntime's output
with torch's on random images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from jaxface.convert import ConvertError
from jaxface.models.names import NETWORKS
from torchref.infer import load_model


def export(model: torch.nn.Module, path: str | Path) -> None:
    """Write `model` (eval mode) as ONNX with a dynamic batch axis."""
    model = model.eval()
    dummy = torch.zeros(2, 3, 112, 112)
    # torch.export-based exporter (needs onnxscript): the TorchScript one is deprecated.
    # One file (no external data): r200 is about 0.5 GB, under protobuf's 2 GB limit.
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        input_names=["input"],
        output_names=["embedding"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        dynamo=True,
        external_data=False,
    )


def check(model: torch.nn.Module, path: str | Path, batch: int = 3) -> float:
    """Max abs difference between onnxruntime and torch on `batch` random inputs."""
    import onnxruntime as ort

    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (batch, 3, 112, 112)))
    x = x.float()
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": x.numpy()})
    return float(np.abs(got - expected).max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchref.export_onnx")
    parser.add_argument("--weights", required=True, help="model.pt (torch) or weights .npz")
    parser.add_argument("--network", choices=list(NETWORKS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--check", action="store_true", help="compare with onnxruntime")
    args = parser.parse_args(argv)
    try:
        model = load_model(args.weights, args.network)
    except ConvertError as exc:
        print(f"torchref.export_onnx: error: {exc}", file=sys.stderr)
        return 2
    export(model, args.out)
    print(f"wrote {args.out}")
    if args.check:
        print(f"onnxruntime vs torch, max abs difference: {check(model, args.out):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
