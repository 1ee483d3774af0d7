"""Resume after a change of every config key: honoured, refused (exit 2) or converted, and
the checkpoints keep their names whatever happens (jaxface/resume.py has the rules)."""

import os
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxface.checkpoint import Checkpointer, array_specs
from jaxface.config import ConfigError, load_config
from jaxface.defaults import get_config
from jaxface.mesh import make_mesh
from jaxface.resume import HONOURED, KEY_RULES, MODEL, RUN, STATE, STREAM, plan_resume
from jaxface.setup import build
from jaxface.train import main, resume_state, train

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]

# The run the checkpoints come from: Partial FC sampling on (its optimizer state differs
# most from the dense head's), one device, global batch 4.
BASE = dict(
    num_classes=64, num_image=4000, batch_size=4, embedding_size=32, frequent=1,
    val_targets="[]", progress="plain", warmup_epoch=0, lr=0.1, checkpoint_every=1,
    tensorboard=False, rec="synthetic", pack_synthetic=False, num_workers=0, num_devices=1,
    sample_rate=0.5, max_steps=2,
)  # fmt: skip

# One change of every key (with what it needs besides, where a key alone is not valid).
# STATE keys appear in both tables: a change that keeps the train state's structure is
# honoured, one that does not is refused (and converted with allow_state_change).
CHANGE = {
    "network": {"network": "r18"},
    "embedding_size": {"embedding_size": 16},
    "num_classes": {"num_classes": 65},
    "dropout": {"dropout": 0.2},
    "remat": None,  # iresnet has no remat blocks: checked on its own below
    "precision": {"precision": "bf16"},
    "tf32": {"tf32": False},
    "sync_bn": {"sync_bn": True},
    "grad_reduce": {"grad_reduce": "bf16"},
    "fused_head_update": {"fused_head_update": False},
    "margin_list": {"margin_list": "1.0,0.0,0.4"},
    "scale": {"scale": 16.0},
    "interclass_filtering_threshold": {"interclass_filtering_threshold": 0.2},
    "margin_grad": {"margin_grad": "exact"},
    "sample_rate": {"sample_rate": 0.75},
    "loss": {"loss": "elasticface_arc"},  # no running state, as the combined margin
    "adaface_m": {"adaface_m": 0.3},
    "adaface_h": {"adaface_h": 0.5},
    "adaface_t_alpha": {"adaface_t_alpha": 0.1},
    "curricular_m": {"curricular_m": 0.3},
    "magface_l_a": {"magface_l_a": 5.0},
    "magface_u_a": {"magface_u_a": 120.0},
    "magface_l_m": {"magface_l_m": 0.4},
    "magface_u_m": {"magface_u_m": 0.7},
    "magface_lambda_g": {"magface_lambda_g": 20.0},
    "elastic_m": {"elastic_m": 0.35},
    "elastic_std": {"elastic_std": 0.02},
    "elastic_plus": {"elastic_plus": True},
    "optimizer": {"optimizer": "adamw"},
    "lr": {"lr": 0.05},
    "momentum": {"momentum": 0.8},
    "weight_decay": {"weight_decay": 1e-4},
    "adamw_betas": {"adamw_betas": "0.8,0.99"},
    "adamw_eps": {"adamw_eps": 1e-6},
    "grad_clip_norm": {"grad_clip_norm": 0.0},
    "warmup_epoch": {"warmup_epoch": 0.5},
    "lr_power": {"lr_power": 2.0},
    "rec": {"rec": "/data/another"},
    "pack_synthetic": {"pack_synthetic": True},
    "num_workers": {"num_workers": 3},
    "flip": {"flip": False},
    # Logging only (RUN rule, read by nothing a resume restores); a resume continuing the
    # W&B run: tests/test_wandb_log.py. Not resumed here: each change costs a resume.
    "wandb": None,
    "wandb_project": None,
    "wandb_entity": None,
    "wandb_name": None,
    "wandb_mode": None,
    "augment": {"augment": True},
    "adaface_augment": {"adaface_augment": True},
    "crop_augmentation_prob": {"crop_augmentation_prob": 0.5},
    "low_res_augmentation_prob": {"low_res_augmentation_prob": 0.5},
    "photometric_augmentation_prob": {"photometric_augmentation_prob": 0.5},
    "skip_corrupt": {"skip_corrupt": True},
    "num_image": {"num_image": 4004},
    "batch_size": {"batch_size": 8},
    "global_batch_size": {"global_batch_size": 8},
    "gradient_acc": {"gradient_acc": 2},
    "synthetic_noise": {"synthetic_noise": 0.2},
    "synthetic_jitter": {"synthetic_jitter": 2},
    "num_epoch": {"num_epoch": 3.0},
    "max_steps": {"max_steps": 9},
    # 2 devices x 2 images: the global batch, and so the data stream, stays the same.
    "num_devices": {"num_devices": 2, "batch_size": 2},
    "seed": {"seed": 7},
    "frequent": {"frequent": 5},
    "progress": {"progress": "bar"},
    "output": {"output": "/elsewhere"},
    "resume": {"resume": True},
    "allow_data_change": {"allow_data_change": True},
    "allow_state_change": {"allow_state_change": True},
    "init_from": {"init_from": "/models/model.pt"},
    "checkpoint_every": {"checkpoint_every": 7},
    "keep_checkpoints": {"keep_checkpoints": 9},
    "val_targets": {"val_targets": "synthetic"},
    "verbose": {"verbose": 7},
    "tensorboard": {"tensorboard": True},
    "distributed": {"distributed": True},
    "coordinator_address": {
        "coordinator_address": "localhost:1", "num_processes": 1, "process_id": 0,
    },
    "num_processes": {"num_processes": 1},
    "process_id": {"process_id": 0},
    "distributed_timeout": {"distributed_timeout": 60},
    "signal_timeout": {"signal_timeout": 60.0},
    "peer_timeout": {"peer_timeout": 60.0},
}  # fmt: skip

# STATE keys changed so that the state's structure changes: refused, then converted.
RESTRUCTURE = {
    "optimizer": {"optimizer": "adamw"},
    "momentum": {"momentum": 0.0},
    "sample_rate": {"sample_rate": 1.0},
    "gradient_acc": {"gradient_acc": 2, "allow_data_change": True},
    "loss": {"loss": "adaface"},
}
# Under the sampled head both clipping and no clipping keep an empty state: honoured.
STRUCTURE_KEPT = {"sample_rate", "momentum", "grad_clip_norm"}


def _cfg(repo, out, **changes):
    values = {**BASE, "output": str(out), **changes}
    return load_config(repo / "configs/demo.py", {k: str(v) for k, v in values.items()})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A run's checkpoints of steps 1 and 2; the tests only read them."""
    out = tmp_path_factory.mktemp("resume") / "run"
    train(_cfg(REPO, out))
    return out


def _folders(out):
    return sorted(os.listdir(out / "checkpoints"))


def _resume(repo, out, messages, **changes):
    cfg = _cfg(repo, out, **{"resume": True, **changes})
    run = build(cfg, make_mesh(cfg.num_devices))
    stream = {
        "global_batch": run.derived.global_batch,
        "gradient_acc": cfg.gradient_acc,
        "seed": cfg.seed,
        "rec": cfg.rec,
        "num_images": cfg.num_image,  # what the loader reports for synthetic data
        "synthetic_noise": cfg.synthetic_noise,
        "synthetic_jitter": cfg.synthetic_jitter,
    }
    checkpointer = Checkpointer(out / "checkpoints", keep=3)
    try:
        return resume_state(run, checkpointer, stream, messages.append)
    finally:
        checkpointer.close()


def test_every_config_key_has_a_rule_and_a_change_here():
    assert set(KEY_RULES) == set(get_config())
    assert set(CHANGE) == set(KEY_RULES)
    assert set(RESTRUCTURE) <= {k for k, rule in KEY_RULES.items() if rule == STATE}


def test_resume_after_a_change_of_every_key(repo, checkpoints):
    out = checkpoints
    reference = _resume(repo, out, [])
    ref_backbone = jax.device_get(reference.params["backbone"])
    outcomes = {}
    for key, changes in CHANGE.items():
        if changes is None:
            continue
        messages = []
        rule = KEY_RULES[key]
        try:
            state = _resume(repo, out, messages, **changes)
        except ConfigError as exc:
            outcomes[key] = "refused"
            text = str(exc)
            if rule == MODEL:
                assert f"was written for {key}=" in text, text
            elif rule == STATE and key != "gradient_acc":  # another optimizer: no other way
                assert f"would change the train state's structure ({key} " in text, text
            else:
                assert rule == STREAM or key == "gradient_acc", (key, text)
                assert "would change the data stream" in text, text
        else:
            outcomes[key] = "restored"
            assert int(state.step) == 2
            for a, b in zip(
                jax.tree.leaves(jax.device_get(state.params["backbone"])),
                jax.tree.leaves(ref_backbone),
                strict=True,
            ):
                np.testing.assert_array_equal(a, b)
            said = "\n".join(messages)
            if rule in (HONOURED, STATE):
                assert "resuming with changed settings" in said and f"{key} " in said, (key, said)
            if rule == RUN:
                assert "changed settings" not in said, (key, said)
        assert _folders(out) == ["1", "2"], key
    expected_refusals = {k for k, r in KEY_RULES.items() if r in (MODEL, STREAM)}
    expected_refusals |= {"gradient_acc", "optimizer"}
    # global_batch_size 8 with 1 device: the global batch 4 -> 8; num_devices keeps it.
    assert {k for k, o in outcomes.items() if o == "refused"} == expected_refusals
    assert {k for k in STRUCTURE_KEPT if outcomes[k] == "restored"} == STRUCTURE_KEPT


@pytest.mark.parametrize("key", sorted(RESTRUCTURE))
def test_a_changed_state_structure_is_refused_then_converted_on_request(repo, checkpoints, key):
    out = checkpoints
    with pytest.raises(ConfigError, match=rf"would change the train state's structure \({key} "):
        _resume(repo, out, [], **RESTRUCTURE[key])
    assert _folders(out) == ["1", "2"]
    messages = []
    state = _resume(repo, out, messages, **RESTRUCTURE[key], allow_state_change=True)
    said = "\n".join(messages)
    assert f"allow_state_change ({key} " in said and "arrays restored" in said, said
    reference = _resume(repo, out, [])
    for a, b in zip(
        jax.tree.leaves(jax.device_get(state.params)),
        jax.tree.leaves(jax.device_get(reference.params)),
        strict=True,
    ):
        # What matched is the checkpoint's; the dense head's padding rows are zero.
        rows = min(len(a), len(b)) if a.ndim else None
        np.testing.assert_array_equal(a[:rows], b[:rows])
        assert not np.any(a[rows:]) and not np.any(b[rows:])
    assert _folders(out) == ["1", "2"]


def test_precision_in_and_out_of_fp16_restarts_the_loss_scale(repo, checkpoints):
    messages = []
    state = _resume(repo, checkpoints, messages, precision="fp16")
    assert float(state.loss_scale.scale) == 65536.0
    assert "the loss scale restarts at 65536" in "\n".join(messages)


def test_remat_and_unknown_layouts_by_the_rules_alone():
    cfg = load_config("configs/mbf.py", {"remat": "true"})
    saved = {"config": {**cfg.to_dict(), "remat": False}}
    arrays = {
        "params.backbone.w": ((3, 3), "float32"),
        "params.head.centres": ((512, 8), "float32"),
    }
    plan = plan_resume(saved, cfg, {}, arrays, arrays, "CK")
    assert plan.honoured == ["remat False -> True"] and not plan.converting
    # The head's rows follow the device count's padding; any other shape change is not
    # explained by a key: refused as another version's layout.
    bigger = {**arrays, "params.head.centres": ((1024, 8), "float32")}
    plan = plan_resume(saved, cfg, {}, arrays, bigger, "CK", resizable=lambda n: "head" in n)
    assert not plan.converting
    other = {**arrays, "params.backbone.w": ((3, 4), "float32")}
    with pytest.raises(ConfigError, match="no config key changed: the checkpoint comes from"):
        plan_resume(saved, cfg, {}, arrays, other, "CK")


def test_the_reported_case_is_refused_in_one_line_and_the_original_config_resumes(
    repo, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = ["--config", "configs/demo.py"] + [
        f"--config.{k}={v}" for k, v in {**BASE, "output": out}.items()
    ]
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv, "--config.resume=true", "--config.gradient_acc=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gradient_acc 1 -> 2" in err[0], err
    assert _folders(out) == ["1", "2"]
    assert main([*argv, "--config.resume=true", "--config.max_steps=3"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert _folders(out) == ["1", "2", "3"]
    assert not [p for p in (out / "checkpoints").iterdir() if "damaged" in p.name]


def test_state_names_are_the_ones_orbax_records(checkpoints):
    """The rules compare the new state's names with the checkpoint's metadata: an
    unchanged config must give the same names, shapes and dtypes."""
    cfg = _cfg(REPO, checkpoints)
    run = build(cfg, make_mesh(1))
    saved = Checkpointer(checkpoints / "checkpoints", keep=3).saved_arrays(2)
    assert saved == array_specs(run.abstract_state)


def test_a_failure_that_is_not_a_read_keeps_the_checkpoint(repo, checkpoints, monkeypatch):
    """Memory exhausted while restoring says nothing about the files: the run stops
    (exit 1) naming the checkpoint, which keeps its name; a read failure would move it."""
    from jaxface.checkpoint import CheckpointError

    def exhausted(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")

    monkeypatch.setattr(Checkpointer, "_restore_state", exhausted)
    with pytest.raises(CheckpointError, match=r"could not be restored \(its files are kept\)"):
        _resume(repo, checkpoints, [])
    assert _folders(checkpoints) == ["1", "2"]
