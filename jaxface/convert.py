"""Backbone weights between arcface_torch / torchref (PyTorch) and jaxface, both ways.

A PyTorch state dict (`model.pt`, arcface_torch's key names) <-> jaxface `(params,
batch_stats)`, as a table from torch keys to Flax paths. Conversion is exact: torch -> jax
-> torch returns the same bytes. The files themselves are `jaxface.weights`' business, the
head's per-rank blocks `jaxface.head_shards`', the command line `jaxface.convert_cli`'s
(`python -m jaxface.convert {torch2jax,jax2torch,head2jax,head2torch} ...`).

numpy only: torchref uses it without jax.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxface import families
from jaxface.fileio import ConvertError
from jaxface.models.names import BACKBONES, NETWORKS

BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
FC_H = FC_W = 7


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
        # The IResNet kernel, not its bias: a damaged bias is then reported as the bias.
        return size if size is not None else int(params["fc"]["kernel"].shape[-1])
    except (KeyError, TypeError, IndexError):
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


def as_numpy(value: Any) -> np.ndarray:
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
            parts.append(f"missing keys: {listing(missing)}")
        if extra:
            parts.append(f"unexpected keys: {listing(extra)}")
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
    sd = {k: as_numpy(v) for k, v in state_dict.items()}
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
            value = fc_from_torch(value, width)
        elif len(shape) == 4:
            value = value.transpose(2, 3, 1, 0)  # [O, I, kh, kw] -> [kh, kw, I, O]
        node = trees[collection]
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = np.ascontiguousarray(value)
    return trees["params"], trees["batch_stats"]


def fc_from_torch(weight: np.ndarray, channels: int, height: int = FC_H, width: int = FC_W):
    """PyTorch `fc.weight` [out, C*H*W] (NCHW flatten) -> a Flax kernel [H*W*C, out]."""
    out = weight.shape[0]
    return weight.reshape(out, channels, height, width).transpose(2, 3, 1, 0).reshape(-1, out)


def fc_to_torch(kernel: np.ndarray, channels: int, height: int = FC_H, width: int = FC_W):
    """Inverse of `fc_from_torch`."""
    out = kernel.shape[-1]
    return kernel.reshape(height, width, channels, out).transpose(3, 2, 0, 1).reshape(out, -1)


def flax_to_torch(
    params: Mapping, batch_stats: Mapping, network: str, num_batches_tracked: int = 0
) -> dict[str, np.ndarray]:
    """(params, batch_stats) -> arcface_torch state dict as numpy arrays, keys in module order.

    `features.weight` is written as ones (frozen in arcface_torch); every BatchNorm gets
    `num_batches_tracked` (int64), which jaxface does not track.
    """
    trees = {"params": to_numpy_tree(params), "batch_stats": to_numpy_tree(batch_stats)}
    if families.has_table(network):
        return _table_to_torch(trees, network, num_batches_tracked)
    width = BACKBONES[network][1][-1]
    try:
        # From the kernel: a damaged bias must be reported as the bias, not the kernel.
        embedding_size = int(trees["params"]["fc"]["kernel"].shape[-1])
    except (KeyError, TypeError, IndexError):
        raise ConvertError("jaxface params have no fc/kernel: not an IResNet backbone") from None
    expected = torch_keys(network, embedding_size)
    wanted = {k: _leaf(k, s) for k, s in expected.items()}
    used = {f"{w[0]}/{'/'.join(w[1])}" for w in wanted.values() if w is not None}
    present = set(leaf_paths(trees["params"], "params"))
    present |= set(leaf_paths(trees["batch_stats"], "batch_stats"))
    missing, extra = sorted(used - present), sorted(present - used)
    if missing or extra:
        found = _detect_flax(trees["params"])
        hint = f"; they look like {found}" if found and found != network else ""
        parts = [f"missing {listing(missing)}"] if missing else []
        parts += [f"unexpected {listing(extra)}"] if extra else []
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
            value = fc_to_torch(value, width) if value.ndim == 2 else value
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
    present = set(leaf_paths(trees["params"], "params"))
    present |= set(leaf_paths(trees["batch_stats"], "batch_stats"))
    missing, extra = sorted(used - present), sorted(present - used)
    if missing or extra:
        parts = [f"missing {listing(missing)}"] if missing else []
        parts += [f"unexpected {listing(extra)}"] if extra else []
        raise ConvertError(f"jaxface weights are not a {network}: " + "; ".join(parts))
    out, problems = families.to_torch(trees, entries, num_batches_tracked)
    if problems:
        raise ConvertError(f"shape mismatch for {network}: " + "; ".join(problems[:8]))
    return out


def listing(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _detect_flax(params: Mapping) -> str | None:
    blocks = tuple(sum(1 for k in params if re.fullmatch(rf"layer{s}_\d+", k)) for s in range(1, 5))
    for name, (b, _) in BACKBONES.items():
        if blocks == b:
            return name
    return None


def leaf_paths(tree: Mapping, prefix: str) -> list[str]:
    paths = []
    for k, v in tree.items():
        if isinstance(v, Mapping):
            paths += leaf_paths(v, f"{prefix}/{k}")
        else:
            paths.append(f"{prefix}/{k}")
    return paths


def to_numpy_tree(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: to_numpy_tree(v) for k, v in tree.items()}
    return np.asarray(tree)


if __name__ == "__main__":  # python -m jaxface.convert: the CLI lives beside, in convert_cli
    from jaxface.convert_cli import main

    sys.exit(main())
