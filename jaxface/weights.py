"""Backbone weight files: jaxface's `.npz`, PyTorch's `model.pt`, and loading any of them.

jaxface's own format is one `.npz` (numpy only, no pickle): `params/<module path>`,
`batch_stats/<module path>` and `meta/*` entries (network, BatchNorm step count). PyTorch
files hold arcface_torch's state dict, key for key (`jaxface.convert` maps the keys).

`load_backbone` is the one loader every command uses (eval, infer, ijb, init_from, the
convert CLI): a run folder, its `backbone.npz`, a checkpoint folder or a `model.pt`.
Every file is written under a temporary name and renamed when complete.

numpy only at import: torchref reads `.pt`/`.npz` through here without jax.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jaxface.convert import (
    as_numpy,
    detect_network,
    embedding_size_of,
    embedding_size_of_params,
    flax_to_torch,
    leaf_paths,
    to_numpy_tree,
    torch_to_flax,
)
from jaxface.fileio import ConvertError, atomic_write, import_torch, torch_load, torch_save
from jaxface.models.names import NETWORKS

NPZ_NAME = "backbone.npz"  # in a run folder, written by jaxface.export
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def load_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A backbone state dict from `model.pt` (or an arcface_torch training checkpoint's
    `state_dict_backbone`; a DDP `module.` prefix is dropped), as numpy arrays."""
    obj = torch_load(path)
    if isinstance(obj, Mapping) and "state_dict_backbone" in obj:
        obj = obj["state_dict_backbone"]
    if not isinstance(obj, Mapping) or not all(hasattr(v, "shape") for v in obj.values()):
        raise ConvertError(
            f"{str(path)!r} holds a {type(obj).__name__}, not a state dict of tensors"
        )
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return {k: as_numpy(v) for k, v in obj.items()}


def save_torch_state_dict(state_dict: Mapping[str, np.ndarray], path: str | Path) -> Path:
    torch = import_torch()
    return torch_save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, path)


def save_weights(
    path: str | Path,
    params: Mapping,
    batch_stats: Mapping,
    network: str,
    num_batches_tracked: int = 0,
) -> Path:
    """jaxface backbone weights -> one `.npz` (no pickle)."""
    arrays = {}
    for collection, tree in (("params", params), ("batch_stats", batch_stats)):
        for leaf in leaf_paths(to_numpy_tree(tree), collection):
            node = tree
            for p in leaf.split("/")[1:]:
                node = node[p]
            arrays[leaf] = np.asarray(node)
    arrays["meta/network"] = np.array(network)
    arrays["meta/num_batches_tracked"] = np.array(num_batches_tracked, np.int64)
    # A file object: np.savez would append .npz to a name without it.
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def load_weights(path: str | Path) -> tuple[dict, dict, dict]:
    """`.npz` from save_weights -> (params, batch_stats, meta)."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ConvertError(f"{str(path)!r} is not a jaxface weights file (.npz): {exc}") from None
    if "meta/network" not in arrays:
        raise ConvertError(f"{str(path)!r} is an .npz but not jaxface weights (no meta/network)")
    trees: dict[str, dict] = {"params": {}, "batch_stats": {}, "meta": {}}
    for key, value in arrays.items():
        collection, *path_parts = key.split("/")
        if collection not in trees:
            raise ConvertError(f"{str(path)!r}: unexpected entry {key!r}")
        node = trees[collection]
        for p in path_parts[:-1]:
            node = node.setdefault(p, {})
        node[path_parts[-1]] = value
    meta = {k: v.item() for k, v in trees["meta"].items()}
    return trees["params"], trees["batch_stats"], meta


def is_torch_file(path: str | Path) -> bool:
    """True for a PyTorch file; a jaxface .npz otherwise (decided by the name)."""
    return Path(path).suffix in TORCH_SUFFIXES


def load_backbone(
    weights: str | Path, network: str | None = None, embedding_size: int | None = None
) -> tuple[dict, dict, dict]:
    """(params, batch_stats, info) as numpy trees from a run folder, its backbone.npz, a
    checkpoint folder (RUN/checkpoints/STEP) or a torch model.pt; checked against `network`
    and `embedding_size` where given. info: network, embedding_size, step (if known)."""
    path = Path(weights)
    if path.is_dir() and (path / NPZ_NAME).is_file():
        path = path / NPZ_NAME
    if path.is_dir() and (path / "state").is_dir():
        # Checkpoints need orbax and jax, which torchref's use of this module does without.
        from jaxface.checkpoint import CheckpointError, read_backbone

        try:
            params, stats, info = read_backbone(path)
        except CheckpointError as exc:
            raise ConvertError(str(exc)) from None
    elif path.is_file() and is_torch_file(path):
        params, stats, info = _from_torch(path, network)
    elif path.is_file():
        params, stats, meta = load_weights(path)
        info = {"network": str(meta["network"])}
        if "num_batches_tracked" in meta:
            info["step"] = int(meta["num_batches_tracked"])
    else:
        raise ConvertError(
            f"{path}: expected a jaxface run folder, a backbone.npz, a checkpoint folder "
            "(RUN/checkpoints/STEP) or a torch model.pt"
        )
    stored = info["network"]
    if network is not None and stored != network:
        raise ConvertError(f"{str(path)!r} holds a {stored} backbone, not a {network}")
    flax_to_torch(params, stats, stored)  # validates keys and shapes
    info["embedding_size"] = embedding_size_of_params(params)
    if embedding_size is not None and info["embedding_size"] != embedding_size:
        raise ConvertError(
            f"{str(path)!r} has embedding size {info['embedding_size']}, expected {embedding_size}"
        )
    return params, stats, info


def _from_torch(path: Path, network: str | None) -> tuple[dict, dict, dict]:
    sd = load_torch_state_dict(path)
    found = detect_network(sd)
    if network is None and found is None:
        raise ConvertError(f"{str(path)!r}: cannot tell which backbone this is; pass --network")
    if network is not None and found is not None and found != network:
        theirs, ours = NETWORKS[found], NETWORKS.get(network)
        family = f" of the {theirs} family ({found})" if theirs != ours else ""
        raise ConvertError(
            f"{str(path)!r} holds a {found} backbone{family}, not a {network}"
            + (f" ({ours} family)" if family and ours else "")
        )
    network = network or found
    try:
        params, stats = torch_to_flax(sd, network, embedding_size_of(sd))
    except ConvertError as exc:
        raise ConvertError(f"{str(path)!r}: {exc}") from None
    tracked = [int(v) for k, v in sd.items() if k.endswith("num_batches_tracked")]
    return params, stats, {"network": network, "step": max(tracked, default=0)}
