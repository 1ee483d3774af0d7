"""Weight conversion torch <-> jaxface: exact both ways, head re-splits, every bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxface import convert, convert_cli, head_shards, weights  # noqa: E402
from jaxface.fileio import ConvertError  # noqa: E402
from jaxface.models import get_model as jax_model  # noqa: E402
from torchref import get_model as torch_model  # noqa: E402


def _state_dict(network: str, seed: int = 0, embedding_size: int = 512, tracked: int = 0):
    torch.manual_seed(seed)
    model = torch_model(network, num_features=embedding_size)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key.endswith("num_batches_tracked"):
                value.fill_(tracked)
            elif key.endswith(("running_mean", "bias")):
                value.normal_()
            elif key.endswith("running_var"):
                value.uniform_(0.5, 2)
    return model.state_dict()


def _assert_identical(a: dict, b: dict):
    assert list(a) == list(b)  # same keys, same order
    for key in a:
        x, y = np.asarray(a[key]), np.asarray(b[key])
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert x.tobytes() == y.tobytes(), key


def test_r50_keys_are_arcface_torch():
    sd = torch_model("r50").state_dict()
    assert len(sd) == 475
    assert {k: tuple(v.shape) for k, v in sd.items()} == convert.torch_keys("r50")
    assert sd["fc.weight"].shape == (512, 25088)
    assert not torch_model("r50").features.weight.requires_grad


@pytest.mark.parametrize(
    "network, millions",
    [("r18", 24.03), ("r34", 34.14), ("r50", 43.59), ("r100", 65.16), ("r200", 118.83)],
)
def test_parameter_counts_match_arcface_torch(network, millions):
    keys = convert.torch_keys(network)
    count = sum(
        int(np.prod(shape)) for key, shape in keys.items() if not key.endswith(convert.BN_STATS)
    )
    assert round(count / 1e6, 2) == millions
    if network == "r18":  # the module itself, allocated: same keys and shapes
        model = torch_model(network)
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys


@pytest.mark.parametrize("network", ["iresnet_tiny", "r50"])
def test_torch_jax_torch_is_bit_identical(network):
    sd = _state_dict(network, tracked=1234)
    params, stats = convert.torch_to_flax(sd, network)
    # The tree is exactly the one jaxface's model builds.
    expected = jax.eval_shape(
        lambda: jax_model(network).init(jax.random.key(0), jnp.zeros((1, 112, 112, 3)))
    )
    got = {"params": params, "batch_stats": stats}
    assert jax.tree.structure(got) == jax.tree.structure(dict(expected))
    assert jax.tree.map(np.shape, got) == jax.tree.map(lambda x: x.shape, dict(expected))
    back = convert.flax_to_torch(params, stats, network, num_batches_tracked=1234)
    _assert_identical(back, {k: v.numpy() for k, v in sd.items()})


def test_files_and_cli_round_trip(tmp_path):
    sd = _state_dict("iresnet_tiny", embedding_size=64, tracked=7)
    torch.save(sd, tmp_path / "model.pt")
    assert convert_cli.main(["torch2jax", str(tmp_path / "model.pt"), str(tmp_path / "w.npz")]) == 0
    params, stats, meta = weights.load_weights(tmp_path / "w.npz")
    assert meta == {"network": "iresnet_tiny", "num_batches_tracked": 7}
    assert convert_cli.main(["jax2torch", str(tmp_path / "w.npz"), str(tmp_path / "back.pt")]) == 0
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    _assert_identical(
        {k: v.numpy() for k, v in back.items()}, {k: v.numpy() for k, v in sd.items()}
    )
    # It loads into the reference with strict=True.
    torch_model("iresnet_tiny", num_features=64).load_state_dict(back, strict=True)
    # A DDP-wrapped state dict or a full training checkpoint is accepted too.
    torch.save({"state_dict_backbone": {f"module.{k}": v for k, v in sd.items()}},
               tmp_path / "ckpt.pt")  # fmt: skip
    params2, _, info = weights.load_backbone(tmp_path / "ckpt.pt")
    assert info["network"] == "iresnet_tiny"
    pairs = zip(jax.tree.leaves(params), jax.tree.leaves(params2), strict=True)
    assert all(np.array_equal(a, b) for a, b in pairs)


def test_fine_tuning_loads_a_torch_backbone(tmp_path):
    sd = _state_dict("iresnet_tiny", embedding_size=64)
    torch.save(sd, tmp_path / "model.pt")
    params, stats, _ = weights.load_backbone(tmp_path / "model.pt", "iresnet_tiny", 64)
    model = jax_model("iresnet_tiny", embedding_size=64)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 112, 112, 3)).astype(np.float32)
    got = model.apply({"params": params, "batch_stats": stats}, x)
    reference = torch_model("iresnet_tiny", num_features=64)
    reference.load_state_dict(sd)
    with torch.no_grad():
        want = reference.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    with pytest.raises(ConvertError, match="embedding size 64, expected 128"):
        weights.load_backbone(tmp_path / "model.pt", "iresnet_tiny", 128)
    with pytest.raises(ConvertError, match="holds a iresnet_tiny backbone, not a r18"):
        weights.load_backbone(tmp_path / "model.pt", "r18", 64)


# --------------------------------------------------------------------------- head


@pytest.mark.parametrize("num_classes", [13, 16, 3])
def test_head_shards_resplit_exactly(num_classes):
    rng = np.random.default_rng(num_classes)
    full = rng.standard_normal((num_classes, 8)).astype(np.float32)
    for world in (1, 2, 3, 4, 5):
        shards = head_shards.centres_to_shards(full, num_classes, world)
        assert [s.shape[0] for s in shards] == head_shards.split_sizes(num_classes, world)
        # arcface_torch: the first C mod W ranks hold one class more, in rank order.
        assert shards[0].shape[0] == num_classes // world + (num_classes % world > 0)
        for devices in (1, 2, 3, 8):
            centres = head_shards.shards_to_centres(shards, num_classes, devices)
            assert centres.shape[0] == -(-num_classes // devices) * devices
            assert not np.any(centres[num_classes:])
            for world2 in (1, 2, 4):
                again = head_shards.centres_to_shards(centres, num_classes, world2)
                back = head_shards.shards_to_centres(again, num_classes, 1)
                assert back.tobytes() == full.tobytes()


def test_head_files_and_cli(tmp_path, repo):
    num_classes = 13
    full = np.random.default_rng(0).standard_normal((num_classes, 8)).astype(np.float32)
    head_shards.save_head_shards(
        head_shards.centres_to_shards(full, num_classes, 3), tmp_path / "a"
    )
    assert convert_cli.main(["head2jax", str(tmp_path / "a"), str(tmp_path / "h.npz"),
                         "--num-classes", "13"]) == 0  # fmt: skip
    assert head_shards.load_head(tmp_path / "h.npz", num_classes, 8).shape == (16, 8)
    assert convert_cli.main(["head2torch", str(tmp_path / "h.npz"), str(tmp_path / "b"),
                         "--num-classes", "13", "--world-size", "2"]) == 0  # fmt: skip
    shards = head_shards.load_head_shards([tmp_path / "b"])
    assert [s.shape[0] for s in shards] == [7, 6]
    assert np.concatenate(shards).tobytes() == full.tobytes()
    ckpt = torch.load(tmp_path / "b" / "checkpoint_gpu_1.pt", weights_only=True)
    assert ckpt["state_dict_softmax_fc"]["weight"].shape == (6, 8)


# --------------------------------------------------------------------------- bad input


def test_state_dict_of_another_backbone():
    sd = _state_dict("r18")
    with pytest.raises(ConvertError) as err:
        convert.torch_to_flax(sd, "r50")
    msg = str(err.value)
    assert "looks like a r18 state dict, not r50" in msg
    assert "missing keys: layer1.2.bn1.weight" in msg


def test_missing_and_extra_keys_are_named():
    sd = dict(_state_dict("iresnet_tiny"))
    del sd["layer2.0.bn2.running_var"]
    sd["head.weight"] = torch.zeros(3)
    with pytest.raises(ConvertError) as err:
        convert.torch_to_flax(sd, "iresnet_tiny")
    assert "missing keys: layer2.0.bn2.running_var" in str(err.value)
    assert "unexpected keys: head.weight" in str(err.value)


def test_shape_mismatch_is_named():
    sd = dict(_state_dict("iresnet_tiny"))
    sd["layer3.0.conv1.weight"] = torch.zeros(32, 16, 1, 1)
    expected = r"layer3.0.conv1.weight: expected \[32, 16, 3, 3\], got \[32, 16, 1, 1\]"
    with pytest.raises(ConvertError, match=expected):
        convert.torch_to_flax(sd, "iresnet_tiny")
    params, stats = convert.torch_to_flax(_state_dict("iresnet_tiny"), "iresnet_tiny")
    params["layer1_0"]["conv2"]["kernel"] = np.zeros((3, 3, 8, 4), np.float32)
    with pytest.raises(ConvertError, match="layer1.0.conv2.weight"):
        convert.flax_to_torch(params, stats, "iresnet_tiny")


def test_features_scale_must_be_one():
    sd = dict(_state_dict("iresnet_tiny"))
    sd["features.weight"] = torch.full((512,), 2.0)
    with pytest.raises(ConvertError, match="features.weight is not all ones"):
        convert.torch_to_flax(sd, "iresnet_tiny")


def test_jax_weights_missing_or_extra_entries(tmp_path):
    params, stats = convert.torch_to_flax(_state_dict("iresnet_tiny"), "iresnet_tiny")
    del stats["layer4_0"]["bn1"]["var"]
    params["extra"] = {"kernel": np.zeros(2)}
    with pytest.raises(ConvertError) as err:
        convert.flax_to_torch(params, stats, "iresnet_tiny")
    assert "missing batch_stats/layer4_0/bn1/var" in str(err.value)
    assert "unexpected params/extra/kernel" in str(err.value)
    params, stats = convert.torch_to_flax(_state_dict("r18"), "r18")
    with pytest.raises(ConvertError, match="look like r18"):
        convert.flax_to_torch(params, stats, "r34")


def test_files_that_are_not_checkpoints(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(ConvertError, match="is not a PyTorch checkpoint"):
        weights.load_torch_state_dict(junk)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ConvertError, match="holds a list, not a state dict"):
        weights.load_torch_state_dict(tmp_path / "list.pt")
    with pytest.raises(ConvertError, match="does not exist"):
        weights.load_torch_state_dict(tmp_path / "nope.pt")
    (tmp_path / "junk.npz").write_text("not an npz")
    with pytest.raises(ConvertError, match="not a jaxface weights file"):
        weights.load_weights(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ConvertError, match="not jaxface weights"):
        weights.load_weights(tmp_path / "other.npz")
    assert convert_cli.main(["torch2jax", str(junk), str(tmp_path / "w.npz")]) == 2
    assert "is not a PyTorch checkpoint" in capsys.readouterr().err


def test_head_class_count_differs_from_config(tmp_path, repo):
    shards = head_shards.centres_to_shards(np.ones((13, 4), np.float32), 13, 2)
    with pytest.raises(ConvertError, match="the head has 13 classes .* num_classes=12"):
        head_shards.shards_to_centres(shards, 12, 8)
    with pytest.raises(ConvertError, match="not arcface_torch's split"):
        head_shards.shards_to_centres(shards[::-1], 13, 8)  # files out of rank order
    with pytest.raises(ConvertError, match="non-zero rows beyond num_classes=12"):
        head_shards.centres_to_shards(np.ones((13, 4), np.float32), 12, 2)
    head_shards.save_head_shards(shards, tmp_path / "h")
    # configs/demo.py has 300 classes.
    assert convert_cli.main(["head2jax", str(tmp_path / "h"), str(tmp_path / "x.npz"),
                         "--config", str(repo / "configs/demo.py")]) == 2  # fmt: skip
    (tmp_path / "h" / "checkpoint_gpu_0.pt").unlink()
    with pytest.raises(ConvertError, match=r"shards of ranks \[0\] are missing"):
        head_shards.load_head_shards([tmp_path / "h"])
    head_shards.save_head(tmp_path / "j.npz", np.ones((13, 4), np.float32), 13)
    with pytest.raises(ConvertError, match="holds 13 classes, but the config says num_classes=14"):
        head_shards.load_head(tmp_path / "j.npz", 14, 2)
