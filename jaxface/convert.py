"""Weights between arcface_torch / torchref (PyTorch) and jaxface, both ways.

Backbone: a PyTorch state dict (`model.pt`, arcface_torch's key names) <-> jaxface
`(params, batch_stats)`. jaxface weights are stored as one `.npz` file (numpy only, no
pickle): `params/<module path>`, `batch_stats/<module path>` and a few `meta/*` entries
(network, embedding size, BatchNorm step count). Conversion is exact: torch -> jax -> torch
returns the same bytes.

Head: arcface_torch keeps one file per rank (`checkpoint_gpu_{rank}.pt`, the rank's block
of class centres under `state_dict_softmax_fc` / `weight`), split unevenly (the first
C mod W ranks own one class more). jaxface keeps ONE global matrix [C_padded, E],
C_padded = ceil(C / D) * D, padding rows zero. Both sides may use any number of devices.

This module imports numpy only; torch is imported where a `.pt` file is read or written,
so torchref uses it without jax.

CLI: python -m jaxface.convert {torch2jax,jax2torch,head2jax,head2torch} ... (see --help).
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxface import families
from jaxface.models.names import BACKBONES, NETWORKS

BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
FC_H = FC_W = 7


class ConvertError(ValueError):
    """A file or state dict that cannot be converted; the message says what is wrong."""


# --------------------------------------------------------------------------- key tables


def _bn_keys(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.weight": (channels,),
        f"{prefix}.bias": (channels,),
        f"{prefix}.running_mean": (channels,),
        f"{prefix}.running_var": (channels,),
        f"{prefix}.num_batches_tracked": (),
    }


def torch_keys(network: str, embedding_size: int = 512) -> dict[str, tuple[int, ...]]:
    """arcface_torch's state-dict keys of `network`, in module order, with their shapes."""
    if families.has_table(network):
        return {e.key: e.shape for e in families.table(network, embedding_size)}
    if network not in BACKBONES:
        raise ConvertError(f"unknown backbone {network!r}; choose one of {', '.join(NETWORKS)}")
    blocks, widths = BACKBONES[network]
    keys: dict[str, tuple[int, ...]] = {"conv1.weight": (widths[0], 3, 3, 3)}
    keys |= _bn_keys("bn1", widths[0])
    keys["prelu.weight"] = (widths[0],)
    inplanes = widths[0]
    for stage, (n, planes) in enumerate(zip(blocks, widths, strict=True), start=1):
        for i in range(n):
            p = f"layer{stage}.{i}"
            keys |= _bn_keys(f"{p}.bn1", inplanes)
            keys[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
            keys |= _bn_keys(f"{p}.bn2", planes)
            keys[f"{p}.prelu.weight"] = (planes,)
            keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            keys |= _bn_keys(f"{p}.bn3", planes)
            if i == 0:
                keys[f"{p}.downsample.0.weight"] = (planes, inplanes, 1, 1)
                keys |= _bn_keys(f"{p}.downsample.1", planes)
            inplanes = planes
    keys |= _bn_keys("bn2", widths[-1])
    keys["fc.weight"] = (embedding_size, widths[-1] * FC_H * FC_W)
    keys["fc.bias"] = (embedding_size,)
    keys |= _bn_keys("features", embedding_size)
    return keys


def _flax_path(torch_module: str) -> tuple[str, ...]:
    """`layer1.0.downsample.1` -> ("layer1_0", "downsample_1"); `bn1` -> ("bn1",)."""
    m = re.fullmatch(r"layer(\d+)\.(\d+)\.(.+)", torch_module)
    if m:
        inner = m.group(3).replace("downsample.", "downsample_")
        return (f"layer{m.group(1)}_{m.group(2)}", *inner.split("."))
    return (torch_module,)


def detect_network(state_dict: Mapping[str, Any]) -> str | None:
    """The backbone whose blocks per stage and widths match the keys, or None."""
    if found := families.detect(state_dict):
        return found
    blocks = []
    for stage in range(1, 5):
        ids = {int(m.group(1)) for k in state_dict if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        blocks.append(len(ids))
    stem = state_dict.get("conv1.weight")
    width = stem.shape[0] if stem is not None else None
    for name, (b, w) in BACKBONES.items():
        if tuple(blocks) == b and width == w[0]:
            return name
    return None


def embedding_size_of_params(params: Mapping) -> int:
    """The embedding size of jaxface backbone params, any family."""
    size = families.flax_embedding_size(params)
    try:
        return size if size is not None else int(params["fc"]["bias"].shape[0])
    except (KeyError, TypeError):
        raise ConvertError(
            "jaxface params hold no known backbone head (fc, features, feature_2)"
        ) from None


def embedding_size_of(state_dict: Mapping[str, Any]) -> int:
    if (size := families.torch_embedding_size(state_dict)) is not None:
        return size
    fc = state_dict.get("fc.weight")
    if fc is None:
        raise ConvertError("state dict has no 'fc.weight': not an IResNet backbone")
    return int(fc.shape[0])


# --------------------------------------------------------------------------- backbone


def _as_numpy(value: Any) -> np.ndarray:
    # A copy: torch's .numpy() shares memory, and a later in-place update of the module
    # (BatchNorm statistics in train mode) must not change converted weights.
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        return value.detach().cpu().numpy().copy()
    return np.array(value)


def check_state_dict(
    state_dict: Mapping[str, Any], network: str, embedding_size: int | None = None
) -> None:
    """Raise ConvertError naming missing/extra keys, a different backbone, or bad shapes."""
    if embedding_size is None:
        try:
            embedding_size = embedding_size_of(state_dict)
        except ConvertError:
            embedding_size = 512
    expected = torch_keys(network, embedding_size)
    missing = [k for k in expected if k not in state_dict]
    extra = [k for k in state_dict if k not in expected]
    if missing or extra:
        found = detect_network(state_dict)
        family = NETWORKS[found] if found else families.family_hint(state_dict)
        hint = (
            f"; its keys belong to the {family} family ({found or 'size unknown'}), "
            f"not to {NETWORKS.get(network)}"
            if family and family != NETWORKS.get(network)
            else f"; it looks like a {found} state dict, not {network}"
            if found and found != network
            else ""
        )
        parts = []
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if extra:
            parts.append(f"unexpected keys: {_listing(extra)}")
        raise ConvertError(f"not an arcface_torch {network} state dict{hint}: " + "; ".join(parts))
    shapes = {k: tuple(getattr(v, "shape", np.shape(v))) for k, v in state_dict.items()}
    bad = [
        f"{k}: expected {list(shape)}, got {list(shapes[k])}"
        for k, shape in expected.items()
        if shapes[k] != shape
    ]
    if bad:
        raise ConvertError(f"shape mismatch for {network}: " + "; ".join(bad[:8]))


def _leaf(key: str, shape: tuple[int, ...]) -> tuple[str, tuple[str, ...]] | None:
    """Where torch entry `key` lives in jaxface: (collection, path), or None if nowhere
    (`num_batches_tracked`, and `features.weight`, frozen at 1)."""
    module, _, leaf = key.rpartition(".")
    path = _flax_path(module)
    if module == "fc":
        return "params", ("fc", "kernel" if leaf == "weight" else "bias")
    if leaf == "weight" and len(shape) == 4:
        return "params", (*path, "kernel")
    if module.endswith("prelu"):
        return "params", (*path, "slope")
    if leaf == "weight":
        return None if module == "features" else ("params", (*path, "scale"))
    if leaf == "bias":
        return "params", (*path, "bias")
    if leaf == "running_mean":
        return "batch_stats", (*path, "mean")
    if leaf == "running_var":
        return "batch_stats", (*path, "var")
    return None


def torch_to_flax(
    state_dict: Mapping[str, Any], network: str, embedding_size: int | None = None
) -> tuple[dict, dict]:
    """arcface_torch state dict (tensors or arrays) -> (params, batch_stats) as numpy trees.

    Exact: transposes and reshapes only.
    """
    check_state_dict(state_dict, network, embedding_size)
    sd = {k: _as_numpy(v) for k, v in state_dict.items()}
    if families.has_table(network):
        return families.to_flax(sd, families.table(network, embedding_size_of(sd)))
    if not np.all(sd["features.weight"] == 1):
        raise ConvertError(
            "features.weight is not all ones: arcface_torch freezes it at 1 and jaxface has "
            "no such parameter, so this model cannot be represented exactly"
        )
    width = BACKBONES[network][1][-1]
    trees: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for key, shape in torch_keys(network, embedding_size_of(sd)).items():
        where = _leaf(key, shape)
        if where is None:
            continue
        collection, path = where
        value = sd[key]
        if key == "fc.weight":
            value = _fc_from_torch(value, width)
        elif len(shape) == 4:
            value = value.transpose(2, 3, 1, 0)  # [O, I, kh, kw] -> [kh, kw, I, O]
        node = trees[collection]
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = np.ascontiguousarray(value)
    return trees["params"], trees["batch_stats"]


def _fc_from_torch(weight: np.ndarray, channels: int) -> np.ndarray:
    """[out, C*H*W] (NCHW flatten) -> [H*W*C, out] (NHWC flatten)."""
    out = weight.shape[0]
    return weight.reshape(out, channels, FC_H, FC_W).transpose(2, 3, 1, 0).reshape(-1, out)


def _fc_to_torch(kernel: np.ndarray, channels: int) -> np.ndarray:
    out = kernel.shape[-1]
    return kernel.reshape(FC_H, FC_W, channels, out).transpose(3, 2, 0, 1).reshape(out, -1)


def flax_to_torch(
    params: Mapping, batch_stats: Mapping, network: str, num_batches_tracked: int = 0
) -> dict[str, np.ndarray]:
    """(params, batch_stats) -> arcface_torch state dict as numpy arrays, keys in module order.

    `features.weight` is written as ones (frozen in arcface_torch); every BatchNorm gets
    `num_batches_tracked` (int64), which jaxface does not track.
    """
    trees = {"params": _to_numpy_tree(params), "batch_stats": _to_numpy_tree(batch_stats)}
    if families.has_table(network):
        return _table_to_torch(trees, network, num_batches_tracked)
    width = BACKBONES[network][1][-1]
    try:
        embedding_size = int(trees["params"]["fc"]["bias"].shape[0])
    except (KeyError, TypeError):
        raise ConvertError("jaxface params have no fc/bias: not an IResNet backbone") from None
    expected = torch_keys(network, embedding_size)
    wanted = {k: _leaf(k, s) for k, s in expected.items()}
    used = {f"{w[0]}/{'/'.join(w[1])}" for w in wanted.values() if w is not None}
    present = set(_leaf_paths(trees["params"], "params"))
    present |= set(_leaf_paths(trees["batch_stats"], "batch_stats"))
    missing, extra = sorted(used - present), sorted(present - used)
    if missing or extra:
        found = _detect_flax(trees["params"])
        hint = f"; they look like {found}" if found and found != network else ""
        parts = [f"missing {_listing(missing)}"] if missing else []
        parts += [f"unexpected {_listing(extra)}"] if extra else []
        raise ConvertError(f"jaxface weights are not a {network}{hint}: " + "; ".join(parts))
    out: dict[str, np.ndarray] = {}
    for key, shape in expected.items():
        where = wanted[key]
        if where is None:
            if key.endswith("num_batches_tracked"):
                out[key] = np.array(num_batches_tracked, np.int64)
            else:  # features.weight
                out[key] = np.ones(shape, np.float32)
            continue
        collection, path = where
        value = trees[collection]
        for p in path:
            value = value[p]
        if key == "fc.weight":
            value = _fc_to_torch(value, width) if value.ndim == 2 else value
        elif len(shape) == 4 and value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)  # [kh, kw, I, O] -> [O, I, kh, kw]
        if tuple(value.shape) != shape:
            raise ConvertError(
                f"shape mismatch for {network}: {collection}/{'/'.join(path)} gives {key} "
                f"{list(value.shape)}, expected {list(shape)}"
            )
        out[key] = np.ascontiguousarray(value)
    return out


def _table_to_torch(trees: dict, network: str, num_batches_tracked: int) -> dict:
    """flax_to_torch for the MobileFaceNet and ViT families (jaxface.families' tables)."""
    embedding_size = families.flax_embedding_size(trees["params"])
    if embedding_size is None:
        raise ConvertError(f"jaxface params have no embedding layer of a {network}")
    entries = families.table(network, embedding_size)
    used = families.flax_leaves(entries)
    present = set(_leaf_paths(trees["params"], "params"))
    present |= set(_leaf_paths(trees["batch_stats"], "batch_stats"))
    missing, extra = sorted(used - present), sorted(present - used)
    if missing or extra:
        parts = [f"missing {_listing(missing)}"] if missing else []
        parts += [f"unexpected {_listing(extra)}"] if extra else []
        raise ConvertError(f"jaxface weights are not a {network}: " + "; ".join(parts))
    out, problems = families.to_torch(trees, entries, num_batches_tracked)
    if problems:
        raise ConvertError(f"shape mismatch for {network}: " + "; ".join(problems[:8]))
    return out


def _listing(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _detect_flax(params: Mapping) -> str | None:
    blocks = tuple(sum(1 for k in params if re.fullmatch(rf"layer{s}_\d+", k)) for s in range(1, 5))
    for name, (b, _) in BACKBONES.items():
        if blocks == b:
            return name
    return None


def _leaf_paths(tree: Mapping, prefix: str) -> list[str]:
    paths = []
    for k, v in tree.items():
        if isinstance(v, Mapping):
            paths += _leaf_paths(v, f"{prefix}/{k}")
        else:
            paths.append(f"{prefix}/{k}")
    return paths


def _to_numpy_tree(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _to_numpy_tree(v) for k, v in tree.items()}
    return np.asarray(tree)


# --------------------------------------------------------------------------- files


def _torch():
    try:
        import torch
    except ImportError:
        raise ConvertError(
            "reading or writing PyTorch files needs torch: pip install -e '.[torch]'"
        ) from None
    return torch


def _torch_load(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{str(path)!r} does not exist")
    torch = _torch()
    try:
        # weights_only: a checkpoint is data; never run pickled code from a downloaded file.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a non-checkpoint
        # torch's own text is a page long, and suggests weights_only=False, which would run
        # pickled code: name the failure only.
        raise ConvertError(
            f"{str(path)!r} is not a PyTorch checkpoint (torch.load failed: {type(exc).__name__})"
        ) from None


def load_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A backbone state dict from `model.pt` (or an arcface_torch training checkpoint's
    `state_dict_backbone`; a DDP `module.` prefix is dropped), as numpy arrays."""
    obj = _torch_load(path)
    if isinstance(obj, Mapping) and "state_dict_backbone" in obj:
        obj = obj["state_dict_backbone"]
    if not isinstance(obj, Mapping) or not all(hasattr(v, "shape") for v in obj.values()):
        raise ConvertError(
            f"{str(path)!r} holds a {type(obj).__name__}, not a state dict of tensors"
        )
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return {k: _as_numpy(v) for k, v in obj.items()}


def save_torch_state_dict(state_dict: Mapping[str, np.ndarray], path: str | Path) -> None:
    torch = _torch()
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, path)


def save_weights(
    path: str | Path,
    params: Mapping,
    batch_stats: Mapping,
    network: str,
    num_batches_tracked: int = 0,
) -> None:
    """jaxface backbone weights -> one `.npz` (no pickle)."""
    arrays = {}
    for collection, tree in (("params", params), ("batch_stats", batch_stats)):
        for leaf in _leaf_paths(_to_numpy_tree(tree), collection):
            node = tree
            for p in leaf.split("/")[1:]:
                node = node[p]
            arrays[leaf] = np.asarray(node)
    arrays["meta/network"] = np.array(network)
    arrays["meta/num_batches_tracked"] = np.array(num_batches_tracked, np.int64)
    with open(path, "wb") as f:  # np.savez would append .npz to a name without it
        np.savez(f, **arrays)


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
    """True for a .pt/.pth file; a jaxface .npz otherwise (decided by the name)."""
    return Path(path).suffix in (".pt", ".pth", ".bin", ".ckpt")


def load_backbone(
    path: str | Path, network: str | None = None, embedding_size: int | None = None
) -> tuple[dict, dict, str]:
    """Weights from a torch `model.pt` or a jaxface `.npz` -> (params, batch_stats, network)
    as numpy trees, checked against `network` (detected from the file when None)."""
    if is_torch_file(path):
        sd = load_torch_state_dict(path)
        found = detect_network(sd)
        network = network or found
        if network is None:
            raise ConvertError(f"{str(path)!r}: cannot tell which backbone this is; pass --network")
        if (
            embedding_size is not None
            and ("fc.weight" in sd or families.torch_embedding_size(sd) is not None)
            and embedding_size_of(sd) != embedding_size
        ):
            raise ConvertError(
                f"{str(path)!r} has embedding size {embedding_size_of(sd)}, "
                f"expected {embedding_size}"
            )
        try:
            params, stats = torch_to_flax(sd, network, embedding_size)
        except ConvertError as exc:
            raise ConvertError(f"{str(path)!r}: {exc}") from None
        return params, stats, network
    params, stats, meta = load_weights(path)
    stored = str(meta["network"])
    if network is not None and stored != network:
        raise ConvertError(f"{str(path)!r} holds {stored} weights, not {network}")
    network = stored
    flax_to_torch(params, stats, network)  # validates keys and shapes
    if embedding_size is not None and embedding_size_of_params(params) != embedding_size:
        raise ConvertError(
            f"{str(path)!r} has embedding size {embedding_size_of_params(params)}, "
            f"expected {embedding_size}"
        )
    return params, stats, network


def init_backbone_from_torch(
    path: str | Path, network: str, embedding_size: int
) -> tuple[dict, dict]:
    """Fine-tuning init: a released arcface_torch backbone (`model.pt`) -> jaxface
    (params, batch_stats) numpy trees for `network`, ready to replace the freshly
    initialised backbone of a TrainState. Raises ConvertError on any mismatch."""
    params, stats, _ = load_backbone(path, network, embedding_size)
    return params, stats


# --------------------------------------------------------------------------- head


def load_head_shards(paths: Sequence[str | Path]) -> list[np.ndarray]:
    """Per-rank class-centre blocks, in rank order, from arcface_torch files.

    `paths` may be one directory (every `checkpoint_gpu_{rank}.pt` in it) or the files. A
    file holds a training checkpoint (`state_dict_softmax_fc` -> `weight`), a head state
    dict (`weight`) or a bare tensor.
    """
    files = [Path(p) for p in paths]
    if len(files) == 1 and files[0].is_dir():
        folder = files[0]
        found = {}
        for f in folder.glob("checkpoint_gpu_*.pt"):
            m = re.fullmatch(r"checkpoint_gpu_(\d+)\.pt", f.name)
            if m:
                found[int(m.group(1))] = f
        if not found:
            raise ConvertError(f"{str(folder)!r} holds no checkpoint_gpu_{{rank}}.pt files")
        gaps = sorted(set(range(max(found) + 1)) - set(found))
        if gaps:
            raise ConvertError(
                f"{str(folder)!r}: head shards of ranks {gaps} are missing (found {sorted(found)})"
            )
        files = [found[r] for r in range(len(found))]
    shards = []
    for f in files:
        obj = _torch_load(f)
        for key in ("state_dict_softmax_fc", "softmax_fc", "partial_fc"):
            if isinstance(obj, Mapping) and key in obj:
                obj = obj[key]
                break
        if isinstance(obj, Mapping):
            if "weight" not in obj:
                raise ConvertError(f"{str(f)!r} has no head weight (keys: {_listing(sorted(obj))})")
            obj = obj["weight"]
        if not hasattr(obj, "shape") or len(obj.shape) != 2:
            raise ConvertError(f"{str(f)!r}: the head weight is not a [classes, E] matrix")
        shards.append(_as_numpy(obj))
    return shards


def split_sizes(num_classes: int, world_size: int) -> list[int]:
    """arcface_torch's uneven split: the first C mod W ranks own one class more."""
    base, extra = divmod(num_classes, world_size)
    return [base + int(r < extra) for r in range(world_size)]


def shards_to_centres(
    shards: Sequence[np.ndarray], num_classes: int, num_devices: int
) -> np.ndarray:
    """arcface_torch per-rank blocks -> jaxface's global centres [C_padded, E] for
    `num_devices` devices (padding rows zero)."""
    sizes = [s.shape[0] for s in shards]
    total = sum(sizes)
    if total != num_classes:
        raise ConvertError(
            f"the head has {total} classes ({len(shards)} shards of {sizes}), "
            f"but the config says num_classes={num_classes}"
        )
    expected = split_sizes(num_classes, len(shards))
    if sizes != expected:
        raise ConvertError(
            f"head shard sizes {sizes} are not arcface_torch's split of {num_classes} classes "
            f"over {len(shards)} ranks ({expected}); are the files in rank order?"
        )
    dims = {s.shape[1] for s in shards}
    if len(dims) != 1:
        raise ConvertError(f"head shards disagree on the embedding size: {sorted(dims)}")
    return pad_centres(np.concatenate(shards), num_classes, num_devices)


def pad_centres(centres: np.ndarray, num_classes: int, num_devices: int) -> np.ndarray:
    """[C or more, E] -> [ceil(C / D) * D, E], rows from C on zero."""
    padded = -(-num_classes // num_devices) * num_devices
    out = np.zeros((padded, centres.shape[1]), centres.dtype)
    out[:num_classes] = centres[:num_classes]
    return out


def centres_to_shards(centres: np.ndarray, num_classes: int, world_size: int) -> list[np.ndarray]:
    """jaxface's global centres [C_padded, E] (any padding) -> arcface_torch's per-rank
    blocks for `world_size` ranks."""
    if centres.ndim != 2 or centres.shape[0] < num_classes:
        raise ConvertError(
            f"centres of shape {list(centres.shape)} cannot hold num_classes={num_classes}"
        )
    if np.any(centres[num_classes:]):
        raise ConvertError(
            f"centres have non-zero rows beyond num_classes={num_classes}: "
            "the class count does not match this head"
        )
    bounds = np.cumsum([0, *split_sizes(num_classes, world_size)])
    return [
        np.ascontiguousarray(centres[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def save_head_shards(
    shards: Sequence[np.ndarray],
    folder: str | Path,
    backbone_state_dict: Mapping[str, np.ndarray] | None = None,
    global_step: int = 0,
) -> list[Path]:
    """Write `checkpoint_gpu_{rank}.pt` files in arcface_torch's layout (no optimizer state:
    resuming there starts its momentum from zero)."""
    torch = _torch()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for rank, shard in enumerate(shards):
        ckpt: dict[str, Any] = {
            "epoch": 0,
            "global_step": global_step,
            "state_dict_softmax_fc": {"weight": torch.from_numpy(np.array(shard))},
        }
        if backbone_state_dict is not None:
            ckpt["state_dict_backbone"] = {
                k: torch.from_numpy(np.array(v)) for k, v in backbone_state_dict.items()
            }
        path = folder / f"checkpoint_gpu_{rank}.pt"
        torch.save(ckpt, path)
        paths.append(path)
    return paths


def save_head(path: str | Path, centres: np.ndarray, num_classes: int) -> None:
    """jaxface head -> `.npz` with the real classes only ([C, E]) and num_classes, so it can
    be padded for any device count on load."""
    with open(path, "wb") as f:
        np.savez(f, centres=np.asarray(centres)[:num_classes], num_classes=np.array(num_classes))


def load_head(path: str | Path, num_classes: int, num_devices: int) -> np.ndarray:
    """`.npz` from save_head -> centres [C_padded, E] for `num_devices` devices."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            centres, stored = data["centres"], int(data["num_classes"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise ConvertError(f"{str(path)!r} is not a jaxface head file: {exc}") from None
    if stored != num_classes:
        raise ConvertError(
            f"{str(path)!r} holds {stored} classes, but the config says num_classes={num_classes}"
        )
    return pad_centres(centres, num_classes, num_devices)


# --------------------------------------------------------------------------- CLI


def _num_classes(args) -> int:
    if args.num_classes is not None:
        return args.num_classes
    if args.config is None:
        raise ConvertError("give --num-classes or --config")
    from jaxface.config import load_config

    return load_config(args.config).num_classes


def main(argv: list[str] | None = None) -> int:
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
    try:
        if args.command == "torch2jax":
            sd = load_torch_state_dict(args.src)
            network = args.network or detect_network(sd)
            if network is None:
                raise ConvertError(f"{args.src!r}: cannot tell which backbone this is; --network")
            params, stats = torch_to_flax(sd, network)
            tracked = {int(v) for k, v in sd.items() if k.endswith("num_batches_tracked")}
            save_weights(args.dst, params, stats, network, max(tracked, default=0))
            print(f"{args.src} ({network}, {len(sd)} tensors) -> {args.dst}")
        elif args.command == "jax2torch":
            params, stats, meta = load_weights(args.src)
            network = str(meta["network"])
            if args.network and args.network != network:
                raise ConvertError(f"{args.src!r} holds {network} weights, not {args.network}")
            sd = flax_to_torch(params, stats, network, int(meta.get("num_batches_tracked", 0)))
            save_torch_state_dict(sd, args.dst)
            print(f"{args.src} ({network}) -> {args.dst} ({len(sd)} tensors)")
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
                params, stats, network = load_backbone(args.backbone)
                backbone = flax_to_torch(params, stats, network)
            paths = save_head_shards(
                centres_to_shards(centres, num_classes, args.world_size), args.dst, backbone
            )
            print(f"{args.src} -> {len(paths)} files in {args.dst}")
    except ConvertError as exc:
        print(f"jaxface.convert: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
