"""Key tables of the MobileFaceNet and ViT families: arcface_torch state-dict keys <-> jaxface
variables, and the exact (transpose-only) conversion through them.

Each table lists arcface_torch's keys in state-dict order with their shapes, where the value
lives in jaxface (collection and module path, "." numbering folded as `layers.2` ->
`layers_2`) and how it is laid out: conv [O, I/g, kh, kw] <-> [kh, kw, I/g, O], linear
[O, I] <-> [I, O], anything else unchanged. jaxface.convert calls these for every family
but IResNet, whose table it keeps itself. numpy only: torchref imports it without jax.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxface.models.names import IMAGE_SIZE, MOBILEFACENETS, NETWORKS, VIT_PATCH, VITS

VIT_PATCHES = (IMAGE_SIZE // VIT_PATCH) ** 2


@dataclass(frozen=True)
class Entry:
    key: str  # arcface_torch's state-dict key
    shape: tuple[int, ...]  # its torch shape
    collection: str | None  # "params" / "batch_stats"; None: not kept (num_batches_tracked)
    path: tuple[str, ...]  # module path and leaf name in that collection
    layout: str = "same"  # "conv" | "linear" | "same"


def flax_path(module: str) -> tuple[str, ...]:
    """`layers.2.layers.0` -> ("layers_2", "layers_0"); `blocks.3.attn.qkv` ->
    ("blocks_3", "attn", "qkv"): a numeric part joins the name before it."""
    parts: list[str] = []
    for part in module.split("."):
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    return tuple(parts)


class _Table:
    """Builds a table module by module, in the order the torch module registers them."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []

    def _add(self, key, shape, collection, leaf, layout="same"):
        module, _, _ = key.rpartition(".")
        path = (*flax_path(module), leaf) if module else (leaf,)
        self.entries.append(Entry(key, tuple(shape), collection, path, layout))

    def param(self, key: str, shape) -> None:
        self._add(key, shape, "params", key)

    def conv(self, p: str, out: int, cin: int, k: int, groups: int = 1, bias: bool = False):
        self._add(f"{p}.weight", (out, cin // groups, k, k), "params", "kernel", "conv")
        if bias:
            self._add(f"{p}.bias", (out,), "params", "bias")

    def linear(self, p: str, out: int, cin: int, bias: bool = True) -> None:
        self._add(f"{p}.weight", (out, cin), "params", "kernel", "linear")
        if bias:
            self._add(f"{p}.bias", (out,), "params", "bias")

    def batch_norm(self, p: str, c: int) -> None:
        self._add(f"{p}.weight", (c,), "params", "scale")
        self._add(f"{p}.bias", (c,), "params", "bias")
        self._add(f"{p}.running_mean", (c,), "batch_stats", "mean")
        self._add(f"{p}.running_var", (c,), "batch_stats", "var")
        self._add(f"{p}.num_batches_tracked", (), None, "num_batches_tracked")

    def layer_norm(self, p: str, c: int) -> None:
        self._add(f"{p}.weight", (c,), "params", "scale")
        self._add(f"{p}.bias", (c,), "params", "bias")

    def prelu(self, p: str, c: int) -> None:
        self._add(f"{p}.weight", (c,), "params", "slope")


def _mobilefacenet_table(network: str, embedding_size: int) -> list[Entry]:
    blocks, scale = MOBILEFACENETS[network]
    t = _Table()

    def conv_block(p, cin, cout, k=1, groups=1, prelu=True):  # ConvBlock / LinearBlock
        t.conv(f"{p}.layers.0", cout, cin, k, groups)
        t.batch_norm(f"{p}.layers.1", cout)
        if prelu:
            t.prelu(f"{p}.layers.2", cout)

    def depthwise(p, cin, cout, groups):
        conv_block(f"{p}.layers.0", cin, groups)
        conv_block(f"{p}.layers.1", groups, groups, 3, groups)
        conv_block(f"{p}.layers.2", groups, cout, prelu=False)

    def residual(p, c, n, groups):
        for j in range(n):
            depthwise(f"{p}.layers.{j}", c, c, groups)

    c1, c2 = 64 * scale, 128 * scale
    conv_block("layers.0", 3, c1, 3)
    if blocks[0] == 1:
        conv_block("layers.1", c1, c1, 3, groups=64)
    else:
        residual("layers.1", c1, blocks[0], 128)
    depthwise("layers.2", c1, c1, 128)
    residual("layers.3", c1, blocks[1], 128)
    depthwise("layers.4", c1, c2, 256)
    residual("layers.5", c2, blocks[2], 256)
    depthwise("layers.6", c2, c2, 512)
    residual("layers.7", c2, blocks[3], 256)
    conv_block("conv_sep", c2, 512)
    conv_block("features.layers.0", 512, 512, 7, groups=512, prelu=False)
    t.linear("features.layers.2", embedding_size, 512, bias=False)
    t.batch_norm("features.layers.3", embedding_size)
    return t.entries


def _vit_table(network: str, embedding_size: int) -> list[Entry]:
    dim, depth = VITS[network].embed_dim, VITS[network].depth
    t = _Table()
    t.param("pos_embed", (1, VIT_PATCHES, dim))
    t.param("mask_token", (1, 1, dim))
    t.conv("patch_embed.proj", dim, 3, VIT_PATCH, bias=True)
    for i in range(depth):
        p = f"blocks.{i}"
        t.layer_norm(f"{p}.norm1", dim)
        t.layer_norm(f"{p}.norm2", dim)
        t.linear(f"{p}.attn.qkv", 3 * dim, dim, bias=False)
        t.linear(f"{p}.attn.proj", dim, dim)
        t.linear(f"{p}.mlp.fc1", 4 * dim, dim)
        t.linear(f"{p}.mlp.fc2", dim, 4 * dim)
    t.layer_norm("norm", dim)
    t.linear("feature.0", dim, dim * VIT_PATCHES, bias=False)
    t.batch_norm("feature.1", dim)
    t.linear("feature.2", embedding_size, dim, bias=False)
    t.batch_norm("feature.3", embedding_size)
    return t.entries


_TABLES = {"mobilefacenet": _mobilefacenet_table, "vit": _vit_table}
# Where each family keeps the embedding size: (torch key, axis), (flax path, axis).
_EMBEDDING = {
    "mobilefacenet": ("features.layers.2.weight", ("features", "layers_2", "kernel")),
    "vit": ("feature.2.weight", ("feature_2", "kernel")),
}


def table(network: str, embedding_size: int = 512) -> list[Entry]:
    """arcface_torch's keys of `network` (a MobileFaceNet or ViT) in state-dict order."""
    return _TABLES[NETWORKS[network]](network, embedding_size)


def has_table(network: str) -> bool:
    return NETWORKS.get(network) in _TABLES


def torch_embedding_size(state_dict: Mapping[str, Any]) -> int | None:
    """The embedding size of a MobileFaceNet/ViT state dict, None for other keys."""
    for key, _ in _EMBEDDING.values():
        if key in state_dict:
            return int(state_dict[key].shape[0])
    return None


def flax_embedding_size(params: Mapping) -> int | None:
    """The embedding size of MobileFaceNet/ViT jaxface params, None for other trees."""
    for _, path in _EMBEDDING.values():
        node: Any = params
        try:
            for p in path:
                node = node[p]
        except (KeyError, TypeError):
            continue
        return int(node.shape[-1])
    return None


def detect(state_dict: Mapping[str, Any]) -> str | None:
    """The MobileFaceNet/ViT name whose keys and shapes these are (for ViTs that differ only
    in training settings, the first listed: vit_t for vit_t_dp005_mask0), or None."""
    embedding = torch_embedding_size(state_dict)
    if embedding is None:
        return None
    shapes = {k: tuple(getattr(v, "shape", np.shape(v))) for k, v in state_dict.items()}
    for name, family in NETWORKS.items():
        if family in _TABLES and {e.key: e.shape for e in table(name, embedding)} == shapes:
            return name
    # Not an exact match: the nearest by family and size, for error messages.
    if "patch_embed.proj.weight" in shapes:
        dim = shapes["patch_embed.proj.weight"][0]
        depth = len({m.group(1) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))})
        for name, spec in VITS.items():
            if (spec.embed_dim, spec.depth) == (dim, depth):
                return name
    return None


def family_hint(state_dict: Mapping[str, Any]) -> str | None:
    """Which family the keys look like, from telltale keys alone."""
    if "patch_embed.proj.weight" in state_dict or "pos_embed" in state_dict:
        return "vit"
    if "conv_sep.layers.0.weight" in state_dict:
        return "mobilefacenet"
    if any(k.startswith("layer1.0.") for k in state_dict):
        return "iresnet"
    return None


def to_flax(state_dict: Mapping[str, np.ndarray], entries: list[Entry]) -> tuple[dict, dict]:
    """Checked state dict (numpy) -> (params, batch_stats): transposes only."""
    trees: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for e in entries:
        if e.collection is None:
            continue
        value = np.asarray(state_dict[e.key])
        if e.layout == "conv":
            value = value.transpose(2, 3, 1, 0)
        elif e.layout == "linear":
            value = value.T
        node = trees[e.collection]
        for p in e.path[:-1]:
            node = node.setdefault(p, {})
        node[e.path[-1]] = np.ascontiguousarray(value)
    return trees["params"], trees["batch_stats"]


def flax_leaves(entries: list[Entry]) -> set[str]:
    """ "collection/a/b/leaf" of every jaxface variable the table expects."""
    return {f"{e.collection}/{'/'.join(e.path)}" for e in entries if e.collection}


def to_torch(
    trees: Mapping[str, Mapping], entries: list[Entry], num_batches_tracked: int = 0
) -> tuple[dict[str, np.ndarray], list[str]]:
    """(params, batch_stats) as {"params": ..., "batch_stats": ...} -> (state dict, shape
    problems). Leaves must have been checked to be present."""
    out: dict[str, np.ndarray] = {}
    problems = []
    for e in entries:
        if e.collection is None:
            out[e.key] = np.array(num_batches_tracked, np.int64)
            continue
        value: Any = trees[e.collection]
        for p in e.path:
            value = value[p]
        value = np.asarray(value)
        if e.layout == "conv" and value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)
        elif e.layout == "linear" and value.ndim == 2:
            value = value.T
        if tuple(value.shape) != e.shape:
            problems.append(
                f"{e.collection}/{'/'.join(e.path)} gives {e.key} {list(value.shape)}, "
                f"expected {list(e.shape)}"
            )
        out[e.key] = np.ascontiguousarray(value)
    return out, problems
