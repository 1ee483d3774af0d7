"""Inference CLIs (jaxface and torchref agree on the same weights) and the ONNX export."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxface import infer as jax_infer  # noqa: E402
from torchref import get_model  # noqa: E402
from torchref import infer as torch_infer  # noqa: E402

pytestmark = [pytest.mark.torch]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = get_model("iresnet_tiny", num_features=64)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key.endswith(("running_mean", "bias")):
                value.normal_(0, 0.1)
            elif key.endswith("running_var"):
                value.uniform_(0.5, 2)
    path = tmp_path_factory.mktemp("w") / "model.pt"
    torch.save(model.state_dict(), path)
    return path


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_infer_clis_agree(weights, tmp_path, capsys):
    from PIL import Image

    from jaxface import convert_cli

    batch = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", batch)
    files = []
    for i, img in enumerate(batch):
        files.append(str(tmp_path / f"{i}.png"))  # lossless, so --images sees the same pixels
        Image.fromarray(img).save(files[-1])
    assert convert_cli.main(["torch2jax", str(weights), str(tmp_path / "w.npz")]) == 0

    runs = {
        "jax_pt_npy": (jax_infer, weights, ["--npy", str(tmp_path / "x.npy")]),
        "jax_npz_images": (jax_infer, tmp_path / "w.npz", ["--images", *files]),
        "torch_pt_images": (torch_infer, weights, ["--images", *files]),
        "torch_npz_npy": (torch_infer, tmp_path / "w.npz", ["--npy", str(tmp_path / "x.npy")]),
    }
    out = {}
    for name, (module, w, source) in runs.items():
        dst = tmp_path / f"{name}.npy"
        assert module.main(["--weights", str(w), "--network", "iresnet_tiny", *source,
                            "--out", str(dst)]) == 0  # fmt: skip
        out[name] = np.load(dst)
        assert out[name].dtype == np.float32 and out[name].shape == (3, 64)
    assert np.array_equal(out["jax_pt_npy"], out["jax_npz_images"])
    assert np.array_equal(out["torch_pt_images"], out["torch_npz_npy"])
    assert _rel(out["jax_pt_npy"], out["torch_pt_images"]) <= 1e-5


def test_infer_bad_inputs(weights, tmp_path, capsys):
    from PIL import Image

    Image.fromarray(np.zeros((100, 90, 3), np.uint8)).save(tmp_path / "small.png")
    np.save(tmp_path / "f.npy", np.zeros((2, 112, 112, 3), np.float32))
    cases = [
        (["--images", str(tmp_path / "small.png")], "is 90x100; expected an aligned 112x112"),
        (["--npy", str(tmp_path / "f.npy")], "expected uint8 [N, 112, 112, 3] RGB, got float32"),
    ]
    for module in (jax_infer, torch_infer):
        for source, message in cases:
            argv = ["--weights", str(weights), *source, "--out", str(tmp_path / "e.npy")]
            assert module.main(argv) == 2
            assert message in capsys.readouterr().err
        np.save(tmp_path / "u.npy", np.zeros((1, 112, 112, 3), np.uint8))
        argv = ["--weights", str(weights), "--network", "r18", "--npy", str(tmp_path / "u.npy"),
                "--out", str(tmp_path / "e.npy")]  # fmt: skip
        assert module.main(argv) == 2
        assert "holds a iresnet_tiny backbone, not a r18" in capsys.readouterr().err


@pytest.mark.slow
def test_onnx_export_matches_torch(weights, tmp_path, capfd, caplog):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from torchref.export_onnx import export

    model = torch_infer.load_model(str(weights), "iresnet_tiny")
    export(model, tmp_path / "m.onnx")
    # Quiet: the exporter's progress, its skipped torchvision operators, its deprecations.
    printed = "".join(capfd.readouterr()) + caplog.text
    assert "[torch.onnx]" not in printed and "torchvision" not in printed
    assert "FutureWarning" not in printed
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # the batch dimension is dynamic
        x = np.random.default_rng(batch).uniform(-1, 1, (batch, 3, 112, 112)).astype(np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        (got,) = session.run(None, {"input": x})
        assert got.shape == (batch, 64)
        # float32 rounding: different kernels, same maths.
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
