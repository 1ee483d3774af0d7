"""Embeddings of the IJB faces: aligned by worker processes, embedded on the device mesh,
cached in the output folder.

Each face gives a float32 row [image embedding, flipped image embedding] ([N, 2E], the
layout of eval_ijbc.py's img_feats), so every combination of the protocol's switches can be
scored from one pass. jaxface.ijb.aligner prepares the batches in worker processes while the
devices embed the previous one; the batch is a multiple of the mesh size and the last one
is padded to the compiled shape.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxface.align import IMAGE_SIZE
from jaxface.fileio import ConvertError
from jaxface.ijb.aligner import Aligner
from jaxface.ijb.meta import IJBInputError, IJBMeta
from jaxface.ijb.report import save_json, save_npy
from jaxface.mesh import batch_sharding, replicated
from jaxface.models import NETWORKS, get_model
from jaxface.precision import Policy
from jaxface.progress import Meter, format_duration
from jaxface.step import make_embed_fn
from jaxface.weights import load_backbone

FEATURES, FACENESS, CACHE_KEY = "features.npy", "faceness.npy", "features.json"


# --- Weights -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Backbone:
    params: dict
    batch_stats: dict
    network: str
    embedding_size: int
    fingerprint: str  # sha256 of the arrays: the same for a model.pt and its .npz


def _leaves(tree: dict, prefix: str = "") -> list[tuple[str, np.ndarray]]:
    out = []
    for key in sorted(tree):
        value = tree[key]
        path = f"{prefix}/{key}"
        if isinstance(value, dict):
            out.extend(_leaves(value, path))
        else:
            out.append((path, np.asarray(value)))
    return out


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): tuple(np.shape(leaf)) for path, leaf in flat}


def fingerprint(params: dict, batch_stats: dict) -> str:
    digest = hashlib.sha256()
    for path, array in _leaves({"params": params, "batch_stats": batch_stats}):
        digest.update(f"{path}:{array.dtype}:{array.shape};".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def load_weights(weights: str | Path, network: str | None) -> Backbone:
    """Weights in any form jaxface.eval accepts, checked against `network`'s shapes;
    IJBInputError (exit 2) for unusable weights or a network that does not match."""
    try:
        params, batch_stats, info = load_backbone(weights, network)
    except ConvertError as exc:
        raise IJBInputError(str(exc)) from None
    found = info.get("network")
    if network and found and found != network:
        raise IJBInputError(f"--weights {weights} holds a {found}, not a {network}")
    network = network or found
    if network not in NETWORKS:
        raise IJBInputError(
            f"--network {network!r}: unknown or not given; choose one of {', '.join(NETWORKS)}"
        )
    embedding_size = info["embedding_size"]
    model = get_model(network, embedding_size=embedding_size)
    dummy = jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
    expected = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), dummy)
    want = _shapes(expected)
    have = _shapes({"params": params, "batch_stats": batch_stats})
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))[:3]
        raise IJBInputError(
            f"--weights {weights} do not fit a {network} (embedding {embedding_size}): "
            f"first differences {diff}"
        )
    return Backbone(params, batch_stats, network, embedding_size, fingerprint(params, batch_stats))


# --- Embedding on the mesh ---------------------------------------------------------------


class Embedder:
    """uint8 RGB [n <= batch, 112, 112, 3] -> float32 [n, 2E] (image, flip), on the mesh."""

    def __init__(self, backbone: Backbone, mesh: Mesh, per_device_batch: int, tf32: bool = False):
        # The precision goes into the model: its layers pass it explicitly, so a
        # jax.default_matmul_precision context would not reach them.
        policy = Policy("fp32", jnp.float32, tf32=tf32)
        model = get_model(backbone.network, embedding_size=backbone.embedding_size, policy=policy)
        embed = make_embed_fn(model)

        def both(params, batch_stats, images):
            # Image and flip interleaved along the batch (each device flips its own rows),
            # then read back as [B, 2E], as eval_ijbc.py's forward_db reshapes.
            pair = jnp.stack([images, images[:, :, ::-1]], axis=1)
            out = embed(params, batch_stats, pair.reshape(-1, *images.shape[1:]))
            return out.astype(jnp.float32).reshape(images.shape[0], -1)

        self.sharding = batch_sharding(mesh)
        self.batch = per_device_batch * mesh.size
        self.fn = jax.jit(both, out_shardings=self.sharding)
        self.params = jax.device_put(backbone.params, replicated(mesh))
        self.batch_stats = jax.device_put(backbone.batch_stats, replicated(mesh))

    def __call__(self, images: np.ndarray) -> jax.Array:
        """Dispatched asynchronously; the caller slices the first len(images) rows."""
        n = len(images)
        if n < self.batch:  # the last batch padded to the compiled shape
            pad = np.zeros((self.batch - n, *images.shape[1:]), images.dtype)
            images = np.concatenate([images, pad])
        return self.fn(self.params, self.batch_stats, jax.device_put(images, self.sharding))


class ProgressLine:
    """'embedded i/N faces  X faces/s  ETA' on one live line (terminal) or every ~10 s."""

    def __init__(self, total: int, batch: int, mode: str = "auto", stream=None):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "plain"
        self.mode, self.total, self.batch = mode, total, batch
        self.meter = Meter(math.ceil(total / batch), batch)
        self._last_print = 0.0

    def update(self, step: int, done: int) -> None:
        if self.mode == "none":
            return
        now = time.monotonic()
        if step == 1:
            self.meter.start(1)  # the first batch compiles: the clock starts after it
        elif self.mode == "plain" and now - self._last_print < 10 and done < self.total:
            return
        line = f"embedded {done:,}/{self.total:,} faces"
        if step > 1:  # the rate since the last line shown, the ETA from the average
            w = self.meter.window(step)
            line += f"  {w['samples_per_sec']:,.0f} faces/s  ETA {format_duration(w['eta_s'])}"
        self._last_print = now
        self.stream.write(("\r" + line + "\x1b[K") if self.mode == "bar" else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.mode == "bar":
            self.stream.write("\n")
            self.stream.flush()


def embed_faces(
    meta: IJBMeta,
    embedder: Embedder,
    workers: int = 0,
    prefetch: int = 2,
    progress: str = "auto",
) -> tuple[np.ndarray, list]:
    """(float32 [N, 2E] embeddings, (line, path) of faces with landmarks outside)."""
    n = len(meta.images)
    aligner = Aligner(meta, embedder.batch, workers, prefetch)
    shown = ProgressLine(n, embedder.batch, progress)
    out = None
    try:
        previous = None
        for b in range(aligner.num_batches + 1):
            current = None
            if b < aligner.num_batches:
                images = aligner.get(b)
                current = (b, len(images), embedder(images))
            if previous is not None:  # fetched after the next batch is dispatched
                pb, rows, emb = previous
                emb = np.asarray(jax.device_get(emb))[:rows]
                if out is None:
                    out = np.empty((n, emb.shape[1]), np.float32)
                start = pb * embedder.batch
                out[start : start + rows] = emb
                shown.update(pb + 1, start + rows)
            previous = current
    finally:
        shown.close()
        aligner.close()
    return out, aligner.outside


# --- Cache -------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_key(meta: IJBMeta) -> dict:
    """What the features depend on besides the weights (the images themselves are not
    hashed: they are assumed unchanged under the same root)."""
    return {
        "root": str(meta.root.resolve()),
        "target": meta.target,
        "landmarks_sha256": file_sha256(meta.files["landmarks"]),
        "faces": len(meta.images),
    }


def cache_key(meta: IJBMeta, backbone: Backbone, tf32: bool) -> dict:
    return {
        **data_key(meta),
        "weights_sha256": backbone.fingerprint,
        "network": backbone.network,
        "embedding_size": backbone.embedding_size,
        "tf32": tf32,
    }


def read_cache(out: Path) -> tuple[dict, Path] | None:
    """(key, features path) of a complete cache in `out`, or None."""
    key_file, features = out / CACHE_KEY, out / FEATURES
    if not (key_file.is_file() and features.is_file()):
        return None
    try:
        return json.loads(key_file.read_text()), features
    except ValueError:
        return None


def write_cache(out: Path, key: dict, features: np.ndarray, faceness: np.ndarray) -> None:
    """The key is removed first and written last, so it only ever describes whole files."""
    (out / CACHE_KEY).unlink(missing_ok=True)
    save_npy(out / FEATURES, features)
    save_npy(out / FACENESS, faceness)
    save_json(out / CACHE_KEY, key)


def differences(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
