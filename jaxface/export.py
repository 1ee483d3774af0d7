"""Backbone export at epoch ends and at the end of a run.

`OUTPUT/backbone.npz`: jaxface weights (jaxface.convert's format, no pickle).
`OUTPUT/model.pt`: the same backbone as an arcface_torch state dict, key for key, loadable
with `strict=True` into arcface_torch's or torchref's IResNet (written when torch is
installed). Both are written under a temporary name and renamed, so a reader never sees
half a file.
"""

from __future__ import annotations

import os
from pathlib import Path

NPZ_NAME = "backbone.npz"
TORCH_NAME = "model.pt"


def export_backbone(out: str | Path, params, batch_stats, network: str, step: int) -> list[Path]:
    """Write the backbone; returns the files written. `step` becomes num_batches_tracked."""
    import jax

    from jaxface.convert import flax_to_torch, save_torch_state_dict, save_weights

    params, batch_stats = jax.device_get((params, batch_stats))
    out = Path(out)
    written = []
    npz = out / NPZ_NAME
    save_weights(npz.with_name(npz.name + ".tmp"), params, batch_stats, network, step)
    os.replace(npz.with_name(npz.name + ".tmp"), npz)
    written.append(npz)
    try:
        import torch  # noqa: F401 - only to know whether model.pt can be written
    except ImportError:
        return written
    state_dict = flax_to_torch(params, batch_stats, network, num_batches_tracked=step)
    pt = out / TORCH_NAME
    save_torch_state_dict(state_dict, pt.with_name(pt.name + ".tmp"))
    os.replace(pt.with_name(pt.name + ".tmp"), pt)
    written.append(pt)
    return written
