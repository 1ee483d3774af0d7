"""Backbone export at epoch ends and at the end of a run.

Written as `backbone.npz`: flat keys `params/<module path>` and `batch_stats/<module path>`,
numpy float32, loadable without jax (`load_backbone_npz`). Files are written to a temporary
name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

NPZ_NAME = "backbone.npz"


def _flatten(tree, prefix: str) -> dict[str, np.ndarray]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name))
        else:
            flat[name] = np.asarray(value)
    return flat


def _unflatten(flat: dict[str, np.ndarray], prefix: str) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        parts = name.split("/")
        if parts[0] != prefix:
            continue
        node = tree
        for part in parts[1:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def export_backbone(out: str | Path, params, batch_stats, cfg=None) -> Path:
    """Write the backbone's parameters and BatchNorm statistics to `out/backbone.npz`."""
    import jax

    params, batch_stats = jax.device_get((params, batch_stats))
    flat = {**_flatten(params, "params"), **_flatten(batch_stats, "batch_stats")}
    if cfg is not None:
        flat["network"] = np.asarray(cfg.network)
        flat["embedding_size"] = np.asarray(cfg.embedding_size)
    path = Path(out) / NPZ_NAME
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **flat)
    os.replace(tmp, path)
    return path


def load_backbone_npz(path: str | Path) -> tuple[dict, dict, dict]:
    """(params, batch_stats, info) from a `backbone.npz`; info has network, embedding_size."""
    with np.load(path) as data:
        flat = {k: data[k] for k in data.files}
    info = {k: flat.pop(k).item() for k in ("network", "embedding_size") if k in flat}
    return _unflatten(flat, "params"), _unflatten(flat, "batch_stats"), info
