"""Backbone export at epoch ends and at the end of a run.

`OUTPUT/backbone.npz`: jaxface weights (`jaxface.weights`' format, no pickle).
`OUTPUT/model.pt`: the same backbone as an arcface_torch state dict, key for key, loadable
with `strict=True` into arcface_torch's or torchref's IResNet (written when torch is
installed). Both are written under a temporary name and renamed, so a reader never sees
half a file.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import jax

from jaxface.convert import flax_to_torch
from jaxface.weights import NPZ_NAME, save_torch_state_dict, save_weights

TORCH_NAME = "model.pt"


def export_backbone(out: str | Path, params, batch_stats, network: str, step: int) -> list[Path]:
    """Write the backbone; returns the files written. `step` becomes num_batches_tracked."""
    params, batch_stats = jax.device_get((params, batch_stats))
    out = Path(out)
    written = [save_weights(out / NPZ_NAME, params, batch_stats, network, step)]
    if find_spec("torch") is not None:  # model.pt needs the optional torch extra
        state_dict = flax_to_torch(params, batch_stats, network, num_batches_tracked=step)
        written.append(save_torch_state_dict(state_dict, out / TORCH_NAME))
    return written
