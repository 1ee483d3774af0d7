"""The train state, its shardings, and pure init / train / embed step functions."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxface.heads import Margin, init_class_centres, partial_fc_loss
from jaxface.mesh import DATA_AXIS
from jaxface.models import IMAGE_SIZE, IResNet, normalize_images


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # {"backbone": Flax params, "head": {"centres": [num_padded, E]}}
    batch_stats: Any  # BatchNorm running statistics
    opt_state: Any
    rng: jax.Array  # uint32 key data, for dropout


def _is_head(path) -> bool:
    return any(getattr(k, "key", None) == "head" for k in path)


def state_shardings(abstract_state: TrainState, mesh: Mesh) -> TrainState:
    """Class centres (and their optimizer slots) split by class; everything else replicated."""

    def spec(path, leaf):
        if _is_head(path) and leaf.ndim == 2:
            return NamedSharding(mesh, P(DATA_AXIS, None))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(spec, abstract_state)


def make_init_fn(
    model: IResNet, tx: optax.GradientTransformation, num_classes: int, num_padded: int
):
    """seed (int32 scalar) -> TrainState. Jit it with out_shardings to build it sharded."""

    def init(seed):
        key = jax.random.key(seed)
        k_backbone, k_head, k_rng = jax.random.split(key, 3)
        images = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
        variables = model.init({"params": k_backbone}, images, train=False)
        params = {
            "backbone": variables["params"],
            "head": {
                "centres": init_class_centres(k_head, num_classes, num_padded, model.embedding_size)
            },
        }
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables["batch_stats"],
            opt_state=tx.init(params),
            rng=jax.random.key_data(k_rng),
        )

    return init


def make_train_step(
    model: IResNet,
    tx: optax.GradientTransformation,
    schedule,
    margin: Margin,
    num_classes: int,
    mesh: Mesh,
):
    """(state, uint8 images [B,112,112,3], int32 labels [B]) -> (state, metrics).

    The batch is the global batch, sharded over the mesh; metrics stay on the device.
    """
    compute_dtype = model.policy.compute_dtype

    def loss_fn(params, batch_stats, images, labels, dropout_key):
        x = normalize_images(images, compute_dtype)
        embeddings, updates = model.apply(
            {"params": params["backbone"], "batch_stats": batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": dropout_key},
        )
        loss = partial_fc_loss(
            embeddings,
            labels,
            params["head"]["centres"],
            margin=margin,
            num_classes=num_classes,
            mesh=mesh,
        )
        return loss, updates["batch_stats"]

    def train_step(state: TrainState, images, labels):
        dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, images, labels, dropout_key
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "lr": schedule(state.step),
            "backbone_grad_norm": optax.tree.norm(grads["backbone"]),
        }
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        )
        return new_state, metrics

    return train_step


def make_embed_fn(model: IResNet):
    """(backbone params, batch_stats, uint8 images) -> float32 embeddings, eval mode."""

    def embed(params, batch_stats, images):
        x = normalize_images(images, model.policy.compute_dtype)
        return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)

    return embed
