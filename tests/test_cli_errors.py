"""Every command line meets bad input with one line that names the culprit and an exit
status that says whose it was (2: the input, 1: the run), and no traceback unless asked."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compare import cli as compare_cli
from jaxface import convert_cli, infer, plot
from jaxface import eval as eval_cli
from jaxface import train as train_cli
from jaxface.convert import flax_to_torch
from jaxface.data import inspect as inspect_cli
from jaxface.data import pack as pack_cli
from jaxface.data.decode import encode_jpeg
from jaxface.data.pack import pack_records
from jaxface.models import get_model
from jaxface.weights import save_torch_state_dict, save_weights
from torchref import export_onnx
from torchref import infer as torch_infer
from torchref import train as torch_train

pytestmark = [pytest.mark.slow]

TINY_RUN = ["--config.num_classes=12", "--config.num_image=4000", "--config.batch_size=4",
            "--config.embedding_size=16", "--config.rec=synthetic",
            "--config.pack_synthetic=false", "--config.val_targets=[]",
            "--config.num_workers=0", "--config.max_steps=2", "--config.tensorboard=false",
            "--config.progress=plain"]  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small world of good and bad inputs, written once."""
    import jax

    root = tmp_path_factory.mktemp("inputs")
    model = get_model("iresnet_tiny", embedding_size=16)
    variables = jax.device_get(model.init(jax.random.key(0), np.zeros((1, 112, 112, 3))))
    params, stats = variables["params"], variables["batch_stats"]
    save_weights(root / "tiny.npz", params, stats, "iresnet_tiny")
    save_torch_state_dict(flax_to_torch(params, stats, "iresnet_tiny"), root / "tiny.pt")
    cut = {**params, "fc": {**params["fc"], "bias": params["fc"]["bias"][:5]}}
    save_weights(root / "cut_bias.npz", cut, stats, "iresnet_tiny")
    np.save(root / "empty.npy", np.zeros((0, 112, 112, 3), np.uint8))
    (root / "raises.py").write_text("def get_config():\n    raise RuntimeError('boom')\n")
    (root / "folder").mkdir()
    good = encode_jpeg(np.full((112, 112, 3), 90, np.uint8))
    items = [(good, i % 2) for i in range(63)] + [(b"\xff\xd8 not a jpeg at all", 1)]
    pack_records(root / "broken", sorted(items, key=lambda x: x[1]), image_size=None)
    (root / "run_without_metrics").mkdir()
    return root


def _case(name, fn, args, code, *needles):
    return pytest.param(fn, args, code, needles, id=name)


CASES = [
    _case("train: a bad value on the command line", train_cli.main,
          ["--config", "configs/demo.py", "--config.lr=-0.1"], 2,
          "--config.lr: config key 'lr'=-0.1 must be > 0"),
    _case("train: --config is a folder", train_cli.main, ["--config", "configs"], 2,
          "'configs' is a folder"),
    _case("train: get_config() raises", train_cli.main, ["--config", "{root}/raises.py"], 2,
          "get_config() raised RuntimeError('boom')"),
    _case("train: an unknown key", train_cli.main, ["--config", "configs/demo.py",
          "--config.learning_rate=1"], 2, "unknown config key 'learning_rate'"),
    _case("train: a corrupt JPEG without skip_corrupt", train_cli.main,
          ["--config", "configs/demo.py", *TINY_RUN, "--config.rec={root}/broken.rec",
           "--config.num_classes=2", "--config.num_image=64", "--config.batch_size=8",
           "--config.num_devices=1", "--config.max_steps=8", "--config.output={root}/run_b"],
          2, "broken.rec", "key 64", "offset"),
    _case("eval: embedding size not the weights'", eval_cli.main,
          ["--weights", "{root}/tiny.npz", "--embedding-size", "512", "--bin", "x.bin"], 2,
          "tiny.npz' has embedding size 16, expected 512"),
    _case("eval: a network not the weights'", eval_cli.main,
          ["--weights", "{root}/tiny.pt", "--network", "r18", "--bin", "x.bin"], 2,
          "holds a iresnet_tiny backbone, not a r18"),
    _case("infer: an empty .npy", infer.main,
          ["--weights", "{root}/tiny.npz", "--npy", "{root}/empty.npy", "--out", "{root}/e.npy"],
          2, "empty.npy' holds no images"),
    _case("torchref.infer: an empty .npy", torch_infer.main,
          ["--weights", "{root}/tiny.pt", "--npy", "{root}/empty.npy", "--out", "{root}/e.npy"],
          2, "empty.npy' holds no images"),
    _case("convert: an .npz with a cut fc/bias", convert_cli.main,
          ["jax2torch", "{root}/cut_bias.npz", "{root}/cut.pt"], 2, "fc/bias", "[5]"),
    _case("convert: an output that exists", convert_cli.main,
          ["torch2jax", "{root}/tiny.pt", "{root}/tiny.npz"], 2,
          "tiny.npz already exists; refusing to overwrite it"),
    _case("plot: a run folder without metrics", plot.main, ["{root}/run_without_metrics"], 2,
          "metrics.jsonl"),
    _case("pack: a source folder that does not exist", pack_cli.main,
          ["{root}/nope", "{root}/out"], 2, "nope is not a folder"),
    _case("inspect: a path that is no dataset", inspect_cli.main, ["{root}/nope.rec"], 2,
          "nope.rec"),
    _case("torchref.train: a bad value", torch_train.main,
          ["--config", "configs/demo.py", "--config.batch_size=0"], 2,
          "config key 'batch_size'=0 must be > 0"),
    _case("compare: an unknown framework", compare_cli.main,
          ["--config", "configs/demo.py", "--frameworks", "jax,tensorflow"], 2, "tensorflow"),
]  # fmt: skip


@pytest.mark.parametrize(("fn", "args", "code", "needles"), CASES)
def test_bad_input_gives_one_line_and_the_right_status(
    fn, args, code, needles, files, repo, monkeypatch, capsys
):
    monkeypatch.chdir(repo)
    argv = [a.format(root=files) for a in args]
    assert fn(argv) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle.format(root=files) in lines[0], err
    assert "Traceback" not in err


def test_onnx_export_without_onnxscript_names_the_extra(files, monkeypatch, capsys):
    monkeypatch.setattr(export_onnx, "find_spec", lambda name: None)
    out = files / "m.onnx"
    assert export_onnx.main(["--weights", str(files / "tiny.pt"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs onnxscript" in err and "pip install -e '.[onnx]'" in err and not out.exists()


def test_a_traceback_only_when_asked(files, repo):
    """--debug (or JAXFACE_DEBUG=1) adds the traceback; a bug is still one line without it."""
    argv = [sys.executable, "-m", "jaxface.infer", "--weights", str(files / "tiny.npz"),
            "--npy", str(files / "empty.npy"), "--out", str(files / "d.npy")]  # fmt: skip
    quiet = subprocess.run(argv, cwd=repo, capture_output=True, text=True)
    loud = subprocess.run([*argv, "--debug"], cwd=repo, capture_output=True, text=True)
    assert quiet.returncode == loud.returncode == 2
    assert "Traceback" not in quiet.stderr and "Traceback" in loud.stderr
    assert Path(files / "d.npy").exists() is False


def test_an_unexpected_failure_is_one_line_that_points_to_debug(monkeypatch, capsys):
    from jaxface import cli

    def broken(argv):
        raise KeyError("something internal")

    assert cli.run("jaxface.x", broken, []) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: KeyError" in err and "--debug" in err
