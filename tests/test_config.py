import subprocess
import sys

import pytest

from jaxface.config import (
    CHECKS,
    FIELDS,
    ConfigError,
    derive,
    load_config,
    parse_overrides,
    validate,
)
from jaxface.train import main

JOBS = ["r18", "r34", "r50", "r100", "r180", "r200"]


def test_base_defines_every_key(repo):
    sys.path.insert(0, str(repo))
    try:
        from configs.base import get_config
    finally:
        sys.path.remove(str(repo))
    assert set(get_config()) == set(FIELDS)
    assert set(CHECKS) <= set(FIELDS)  # no rule for a key that does not exist
    # Types come from the defaults: a float key given a whole number in a file stays float.
    assert FIELDS["warmup_epoch"].kind is float and FIELDS["max_steps"].optional


@pytest.mark.parametrize("job", JOBS)
def test_job_configs(repo, job):
    cfg = load_config(repo / f"configs/{job}.py")
    assert cfg.network == job
    assert cfg.num_classes == 617_970
    assert cfg.batch_size == 128
    assert cfg.margin_list == (1.0, 0.5, 0.0)
    assert cfg.optimizer == "sgd" and cfg.lr == 0.1


def test_demo_config(repo):
    cfg = load_config(repo / "configs/demo.py")
    assert cfg.pack_synthetic and cfg.network == "iresnet_tiny"


def test_config_files_import_neither_jax_nor_torch(repo):
    code = (
        "import sys; from jaxface.config import load_config\n"
        f"for j in {JOBS + ['demo', 'base']!r}: load_config('configs/' + j + '.py')\n"
        "bad = [m for m in ('jax', 'torch', 'flax') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=repo, check=True)


def test_overrides_are_typed(repo):
    overrides = parse_overrides(
        [
            "--config.batch_size=64",
            "--config.lr",
            "0.05",
            "--config.sync_bn=true",
            "--config.margin_list=1.0,0.0,0.4",
            "--config.max_steps=none",
            "--config.num_devices=2",
        ]
    )
    cfg = load_config(repo / "configs/r50.py", overrides)
    assert cfg.batch_size == 64 and isinstance(cfg.batch_size, int)
    assert cfg.lr == 0.05 and cfg.sync_bn is True
    assert cfg.margin_list == (1.0, 0.0, 0.4)
    assert cfg.max_steps is None and cfg.num_devices == 2
    # A list key: `none` (or nothing) empties it; r50.py names three verification sets.
    assert cfg.val_targets == ("lfw", "cfp_fp", "agedb_30")
    for empty in ("none", "None", ""):
        got = load_config(
            repo / "configs/r50.py", parse_overrides([f"--config.val_targets={empty}"])
        )
        assert got.val_targets == ()


def test_config_is_immutable_and_derived_values_are_not_written_back(repo):
    cfg = load_config(repo / "configs/r50.py")
    before = dict(cfg)
    with pytest.raises(AttributeError):
        cfg.lr = 1.0
    with pytest.raises(TypeError):
        cfg._values["lr"] = 1.0
    d = derive(cfg, 8)
    assert dict(cfg) == before
    # ceil(617,970 / 8) = 77,247 rows, rounded up to a multiple of 512 (dense head).
    assert d.global_batch == 1024 and d.num_local_classes == 77_312
    assert d.num_classes_padded == 8 * 77_312 and d.steps_per_epoch == 12_720_066 // 1024
    sampled = derive(cfg.replace(sample_rate=0.3), 8)
    # int(0.3 * 77,247) = 23,174 sampled rows, rounded up to a multiple of 32 (no padding
    # in the head's matmuls); at most the whole block.
    assert sampled.num_local_classes == 77_247 and sampled.num_sample == 23_200
    assert derive(cfg.replace(num_classes=8 * 40, sample_rate=0.9), 8).num_sample == 40
    assert cfg.replace(lr=0.2).lr == 0.2 and cfg.lr == 0.1


def test_derive_step_counts(repo):
    cfg = load_config(repo / "configs/demo.py", {"max_steps": "7", "num_epoch": "2"})
    d = derive(cfg, 1)
    assert d.run_steps == 7
    assert d.schedule_steps == 2 * (cfg.num_image // cfg.batch_size)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"network": "r51"}, "'network'='r51' unknown backbone"),
        ({"num_classes": "0"}, "'num_classes'=0 must be > 0"),
        ({"margin_list": "1.0,2.0,0.0"}, "m2=2.0 out of range"),
        ({"margin_list": "0.5,0.5,0.0"}, "m1=0.5 out of range"),
        ({"margin_list": "1.0,0.5,1.5"}, "m3=1.5 out of range"),
        ({"margin_list": "1.0,0.5"}, "must be three numbers"),
        ({"precision": "fp64"}, "'precision'='fp64' must be one of fp32, bf16"),
        ({"lr": "-1"}, "'lr'=-1.0 must be > 0"),
        ({"batch_size": "abc"}, "'batch_size' expects int, got 'abc'"),
        ({"batch_size": "1.5"}, "'batch_size' expects int"),
        ({"sync_bn": "maybe"}, "'sync_bn' expects bool"),
        ({"margin_grad": "sloppy"}, "straight_through, exact"),
        ({"lr": "none"}, "'lr' must not be None"),
        ({"bacth_size": "2"}, "unknown config key 'bacth_size'"),
    ],
)
def test_rejections_name_the_key(repo, overrides, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(repo / "configs/r50.py", overrides)
    assert fragment in str(info.value)


def test_derive_rejections(repo):
    cfg = load_config(repo / "configs/demo.py", {"global_batch_size": "100"})
    with pytest.raises(ConfigError, match="'global_batch_size'=100 is not divisible by the 8"):
        derive(cfg, 8)
    assert derive(cfg, 4).batch_per_device == 25
    cfg = load_config(repo / "configs/demo.py", {"num_image": "10"})
    with pytest.raises(
        ConfigError, match="'num_image': num_image=10 is smaller than one optimizer step"
    ):
        derive(cfg, 1)
    cfg = load_config(repo / "configs/demo.py", {"warmup_epoch": "5"})
    with pytest.raises(ConfigError, match="'warmup_epoch'=5.0 leaves no steps"):
        derive(cfg, 1)


def test_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.py")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match=r"does not define get_config\(\)"):
        load_config(tmp_path / "empty.py")
    (tmp_path / "broken.py").write_text("def get_config(:\n")
    with pytest.raises(ConfigError, match="failed to load"):
        load_config(tmp_path / "broken.py")
    (tmp_path / "list.py").write_text("def get_config():\n    return [1]\n")
    with pytest.raises(ConfigError, match="returned list, expected a dict"):
        load_config(tmp_path / "list.py")
    (tmp_path / "partial.py").write_text("def get_config():\n    return {'lr': 0.1}\n")
    with pytest.raises(ConfigError, match="config is missing"):
        load_config(tmp_path / "partial.py")


def test_unknown_key_in_file(tmp_path, repo):
    (tmp_path / "typo.py").write_text(
        "from configs.base import get_config as b\n"
        "def get_config():\n    return b() | {'netwrok': 'r50'}\n"
    )
    sys.path.insert(0, str(repo))
    try:
        with pytest.raises(ConfigError, match="unknown config key 'netwrok'"):
            load_config(tmp_path / "typo.py")
    finally:
        sys.path.remove(str(repo))


def test_validate_plain_dict():
    with pytest.raises(ConfigError, match="unknown config key"):
        validate({"foo": 1})


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--config", "configs/missing.py"], "does not exist"),
        (["--config", "configs/r50.py", "--config.network=r7"], "unknown backbone"),
        (["--config", "configs/r50.py", "--config.nope=1"], "unknown config key 'nope'"),
        (["--config", "configs/r50.py", "--config.num_classes=0"], "'num_classes'=0"),
        (["--config", "configs/r50.py", "--config.margin_list=1,3,0"], "m2=3.0 out of range"),
        (["--config", "configs/demo.py", "--config.global_batch_size=12"], "not divisible"),
        (["--config", "configs/demo.py", "--config.num_devices=9"], "only 8 cpu device"),
        (["--config", "configs/r50.py", "--config.max_steps=1"], "a folder holding train.rec"),
        (["--config", "configs/demo.py", "stray"], "unexpected argument 'stray'"),
    ],
)
def test_cli_bad_input_exits_2_with_one_message(repo, monkeypatch, capsys, argv, fragment):
    monkeypatch.chdir(repo)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_subprocess_no_traceback(repo):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxface.train", "--config", "configs/nothing.py"],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "jaxface.train: error: config file 'configs/nothing.py' does not exist"
    )


def test_a_command_line_key_another_key_overrides_is_refused(repo):
    """adaface_r100.py sets global_batch_size: --config.batch_size alone would be ignored."""
    job = repo / "configs/adaface_r100.py"
    with pytest.raises(ConfigError) as err:
        load_config(job, parse_overrides(["--config.batch_size=16"]))
    assert str(err.value).startswith("--config.batch_size: has no effect")
    assert "sets global_batch_size=512, which decides the batch" in str(err.value)
    both = ["--config.batch_size=16", "--config.global_batch_size=none"]
    assert load_config(job, parse_overrides(both)).batch_size == 16
    assert load_config(repo / "configs/r50.py", {"batch_size": "16"}).batch_size == 16


# The official values, restated from each paper's code (not read from jaxface): ElasticFace's
# fdbtrs/ElasticFace config/config.py; margin gradients: arcface_torch applies the margin
# under no_grad, AdaFace / CurricularFace / MagFace / ElasticFace differentiate it.
@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"loss": "margin"}, {"margin_grad": "straight_through"}),
        ({"loss": "adaface"}, {"margin_grad": "exact", "adaface_h": 0.333}),
        ({"loss": "curricularface"}, {"margin_grad": "exact"}),
        ({"loss": "magface"}, {"margin_grad": "exact"}),
        (
            {"loss": "elasticface_arc"},
            {"margin_grad": "exact", "elastic_m": 0.5, "elastic_std": 0.05},
        ),
        (
            {"loss": "elasticface_arc", "elastic_plus": "true"},
            {"elastic_m": 0.5, "elastic_std": 0.0175},
        ),
        ({"loss": "elasticface_cos"}, {"elastic_m": 0.35, "elastic_std": 0.05}),
        (
            {"loss": "elasticface_cos", "elastic_plus": "true"},
            {"elastic_m": 0.35, "elastic_std": 0.02},
        ),
        # What the user sets stays.
        (
            {"loss": "elasticface_cos", "elastic_m": "0.3", "margin_grad": "straight_through"},
            {"elastic_m": 0.3, "elastic_std": 0.05, "margin_grad": "straight_through"},
        ),
        ({"loss": "adaface", "adaface_h": "0"}, {"adaface_h": 0.0}),
    ],
)
def test_a_loss_switch_brings_its_official_parameters(repo, overrides, expected):
    cfg = load_config(repo / "configs/r50.py", overrides)
    assert {key: cfg[key] for key in expected} == expected


def test_the_elasticface_job_config_follows_its_switches(repo):
    job = repo / "configs/elasticface_r50.py"
    assert load_config(job, {"elastic_plus": "true"}).elastic_std == 0.0175
    cos = load_config(job, {"loss": "elasticface_cos", "elastic_plus": "true"})
    assert (cos.elastic_m, cos.elastic_std) == (0.35, 0.02)


def test_wandb_needs_its_package_and_a_known_mode(repo, monkeypatch):
    with pytest.raises(ConfigError, match="'wandb_mode'='cloud' must be one of online, offline"):
        load_config(repo / "configs/demo.py", {"wandb_mode": "cloud"})
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"'wandb'=True needs the wandb package: pip install"):
        load_config(repo / "configs/demo.py", {"wandb": "true"})
