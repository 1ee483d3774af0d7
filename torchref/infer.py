"""python -m torchref.infer: the same arguments and output as `python -m jaxface.infer`,
computed by the PyTorch reference (eval mode, float32, TF32 off)."""

from __future__ import annotations

import sys

import numpy as np
import torch

from jaxface.convert import flax_to_torch
from jaxface.infer import cli_main
from jaxface.weights import load_backbone
from torchref.engine import set_matmul_precision
from torchref.iresnet import normalize_images
from torchref.models import get_model


def load_model(weights: str, network: str | None) -> torch.nn.Module:
    """A torchref backbone in eval mode from a torch model.pt or jaxface .npz."""
    params, stats, info = load_backbone(weights, network)  # checks keys and shapes
    state_dict = flax_to_torch(params, stats, info["network"], info.get("step", 0))
    model = get_model(info["network"], num_features=info["embedding_size"])
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()})
    return model.eval()


@torch.no_grad()
def embed(weights: str, network: str | None, images: np.ndarray, batch_size: int = 64):
    set_matmul_precision(tf32=False)
    model = load_model(weights, network)
    chunks = [
        model(normalize_images(torch.from_numpy(images[i : i + batch_size]))).numpy()
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(chunks).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    return cli_main("torchref.infer", embed, argv)


if __name__ == "__main__":
    sys.exit(main())
