"""torchref (a faithful arcface_torch) against jaxface: same weights, same numbers.

Relative error is norm-wise, ||jax - torch|| / ||torch||, in float32 at highest precision.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jax_train_step, rel_err
from conftest import random_images as images

torch = pytest.importorskip("torch")

from flax.traverse_util import flatten_dict  # noqa: E402

from jaxface.config import derive, load_config  # noqa: E402
from jaxface.convert import flax_to_torch, torch_to_flax  # noqa: E402
from jaxface.head_shards import pad_centres  # noqa: E402
from jaxface.mesh import make_mesh  # noqa: E402
from jaxface.models import get_model as jax_model  # noqa: E402
from jaxface.models import normalize_images as jax_normalize  # noqa: E402
from torchref import get_model as torch_model  # noqa: E402
from torchref.iresnet import normalize_images as torch_normalize  # noqa: E402
from torchref.parity import reference_step  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.torch]


@pytest.fixture(autouse=True)
def _highest_precision():
    torch.set_float32_matmul_precision("highest")
    with jax.default_matmul_precision("highest"):
        yield


def randomised(network: str, seed: int = 0, embedding_size: int = 512):
    """A torch backbone whose BN statistics, biases and PReLU slopes are not at their init
    values, so that a wrong mapping of any of them shows."""
    torch.manual_seed(seed)
    model = torch_model(network, num_features=embedding_size)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key.endswith("running_mean") or (key.endswith("bias") and "fc" not in key):
                value.normal_(0, 0.1)
            elif key.endswith("running_var"):
                value.uniform_(0.5, 2.0)
            elif key.endswith("prelu.weight") or (key.endswith(".weight") and value.ndim == 1):
                value.uniform_(0.2, 1.2) if "prelu" not in key else value.uniform_(0.0, 0.5)
        model.features.weight.fill_(1.0)  # frozen at 1 in arcface_torch
    return model


@pytest.mark.parametrize("network", ["r18", "r50"])
def test_same_embeddings_eval_and_train(network):
    model = randomised(network)
    params, stats = torch_to_flax(model.state_dict(), network)
    flax_model = jax_model(network)
    batch = images(8)
    x_jax = jax_normalize(jnp.asarray(batch))
    x_torch = torch_normalize(torch.from_numpy(batch))

    apply = jax.jit(
        lambda p, s, x: flax_model.apply(
            {"params": p, "batch_stats": s}, x, train=True, mutable=["batch_stats"]
        )
    )
    eval_apply = jax.jit(lambda p, s, x: flax_model.apply({"params": p, "batch_stats": s}, x))

    model.eval()
    with torch.no_grad():
        expected = model(x_torch).numpy()
    assert rel_err(eval_apply(params, stats, x_jax), expected) <= 1e-5

    model.train()  # batch statistics, and the running ones updated (momentum 0.1, unbiased)
    with torch.no_grad():
        expected = model(x_torch).numpy()
    got, updates = apply(params, stats, x_jax)
    assert rel_err(got, expected) <= 1e-5
    _, torch_stats = torch_to_flax(model.state_dict(), network)
    new, ref = flatten_dict(jax.device_get(updates["batch_stats"])), flatten_dict(torch_stats)
    assert new.keys() == ref.keys()
    worst = max(rel_err(new[k], ref[k]) for k in ref)
    assert worst <= 1e-5, worst
    # The statistics really moved, so the comparison above checks the update itself.
    assert rel_err(flatten_dict(stats)[("bn2", "var")], ref[("bn2", "var")]) > 1e-3


@pytest.mark.parametrize("num_devices", [1, 2])
def test_one_training_step_matches(repo, num_devices):
    """Backbone, head, margin, SGD with weight decay and momentum, backbone clipping."""
    num_classes = 13  # 13 over 2: arcface_torch splits 7 + 6, jaxface pads to 14
    cfg = load_config(
        repo / "configs/demo.py",
        {"network": "iresnet_tiny", "embedding_size": "32", "num_classes": str(num_classes),
         "batch_size": "8", "num_image": "800", "lr": "0.1", "warmup_epoch": "0",
         "scale": "64.0"},
    )  # fmt: skip
    derived = derive(cfg, num_devices)
    model = randomised(cfg.network, seed=1, embedding_size=cfg.embedding_size)
    state_dict = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(3)
    centres = (0.01 * rng.standard_normal((num_classes, cfg.embedding_size))).astype(np.float32)
    batch = images(derived.global_batch, seed=4)
    labels = rng.integers(0, num_classes, derived.global_batch).astype(np.int32)

    ref = reference_step(cfg, derived, state_dict, centres, batch, labels, num_devices)
    params, stats = torch_to_flax(state_dict, cfg.network)
    model = jax_model(cfg.network, embedding_size=cfg.embedding_size, bn_groups=num_devices)
    new, loss = jax_train_step(
        cfg, derived, model, params, stats, pad_centres(centres, num_classes, num_devices),
        batch, labels, make_mesh(num_devices),
    )  # fmt: skip

    assert abs(loss - ref["loss"]) / abs(ref["loss"]) <= 1e-5
    got = flax_to_torch(new.params["backbone"], new.batch_stats, cfg.network)
    for key, expected in ref["state_dict"].items():
        if key.endswith("num_batches_tracked"):
            continue
        assert rel_err(got[key], expected) <= 1e-4, key
        # The step itself (new - old) agrees too, not only the weights it is added to.
        moved = expected - state_dict[key]
        if np.any(moved):
            assert rel_err(got[key] - state_dict[key], moved) <= 2e-3, key
    got_centres = np.asarray(new.params["head"]["centres"])
    assert not np.any(got_centres[num_classes:])
    assert rel_err(got_centres[:num_classes], ref["centres"]) <= 1e-4
    assert rel_err(got_centres[:num_classes] - centres, ref["centres"] - centres) <= 1e-3
