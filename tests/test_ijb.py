"""IJB evaluation: protocol, metrics and the command line on a synthetic IJB layout."""

import heapq
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxface.align import align_file
from jaxface.ijb.__main__ import main
from jaxface.ijb.meta import meta_files, read_meta
from jaxface.ijb.metrics import FARS, identification, roc_curve, tar_at_far
from jaxface.ijb.protocol import Switches, scores_from_features
from jaxface.ijb.synthetic import write_layout
from jaxface.models import get_model
from jaxface.step import make_embed_fn
from jaxface.weights import load_weights, save_weights

ALL_SWITCHES = [
    Switches(f, n, d) for f in (True, False) for n in (True, False) for d in (True, False)
]


# --- A plain re-statement of eval_ijbc.py's protocol (loops, no vectorisation) ------------


def reference_scores(raw, faceness, templates, medias, pairs, sw: Switches):
    half = raw.shape[1] // 2
    feats = raw[:, :half] + raw[:, half:] if sw.flip else raw[:, :half]
    if not sw.norm_score:
        feats = feats / np.sqrt(np.sum(feats**2, -1, keepdims=True))
    if sw.detector_score:
        feats = feats * faceness[:, None]
    unique = np.unique(templates)
    tfeats = np.zeros((len(unique), feats.shape[1]))
    for i, t in enumerate(unique):
        (rows,) = np.where(templates == t)
        media_feats = []
        for m in np.unique(medias[rows]):
            media_feats.append(np.mean(feats[rows[medias[rows] == m]], axis=0))
        tfeats[i] = np.sum(media_feats, axis=0)
    tfeats = tfeats / np.sqrt(np.sum(tfeats**2, -1, keepdims=True))
    where = {t: i for i, t in enumerate(unique)}
    return np.array([tfeats[where[a]] @ tfeats[where[b]] for a, b in pairs])


def test_scores_equal_plain_restatement():
    rng = np.random.default_rng(0)
    n, e = 60, 16
    raw = rng.normal(size=(n, 2 * e)).astype(np.float32) * rng.uniform(0.5, 3, (n, 1))
    raw = raw.astype(np.float32)
    faceness = rng.uniform(0.1, 1, n).astype(np.float32)
    templates = rng.integers(1, 13, n) * 7  # ids not 0..T-1, rows not sorted
    medias = rng.integers(0, 4, n) + 100 * templates
    medias[::5] = 999  # one media id shared by several templates
    unique = np.unique(templates)
    pairs = rng.choice(unique, (80, 2))
    for sw in ALL_SWITCHES:
        got, _, _ = scores_from_features(raw, faceness, templates, medias, pairs, sw)
        want = reference_scores(raw, faceness, templates, medias, pairs, sw)
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=str(sw))
    # The switches change the numbers (so the comparison above can fail).
    a = scores_from_features(raw, faceness, templates, medias, pairs, Switches())[0]
    b = scores_from_features(raw, faceness, templates, medias, pairs, Switches(flip=False))[0]
    assert np.abs(a - b).max() > 1e-2


# --- ROC and TAR@FAR --------------------------------------------------------------------


def brute_roc(labels, scores):
    """Every distinct score as a threshold (score >= t accepted), plus (0, 0)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    fpr, tpr = [0.0], [0.0]
    for t in np.unique(scores)[::-1]:
        fpr.append(np.sum(neg >= t) / len(neg))
        tpr.append(np.sum(pos >= t) / len(pos))
    return np.array(fpr), np.array(tpr)


def brute_drop(fpr, tpr):
    """sklearn's drop_intermediate re-stated: an inner point (of the curve without its
    prepended origin) goes when both counts change by the same step before and after it."""
    keep = [0, 1]
    for i in range(2, len(fpr) - 1):
        same_f = fpr[i] - fpr[i - 1] == fpr[i + 1] - fpr[i]
        same_t = tpr[i] - tpr[i - 1] == tpr[i + 1] - tpr[i]
        if not (same_f and same_t):
            keep.append(i)
    keep.append(len(fpr) - 1)
    return fpr[keep], tpr[keep]


@pytest.mark.parametrize("seed", range(6))
def test_roc_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    labels = rng.integers(0, 2, n)
    labels[:2] = (0, 1)
    # Rounded so that scores tie, within and across labels.
    scores = np.round(rng.normal(size=n) + labels, int(rng.integers(1, 3)))
    fpr, tpr, thr = roc_curve(labels, scores, drop_intermediate=False)
    bf, bt = brute_roc(labels, scores)
    np.testing.assert_allclose(fpr, bf, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tpr, bt, rtol=0, atol=1e-12)
    assert thr[0] == np.inf and np.array_equal(thr[1:], np.unique(scores)[::-1])
    fpr, tpr, _ = roc_curve(labels, scores)
    # Counts are exact, so the fractions compare exactly in the drop rule.
    counts_f, counts_t = bf * (labels == 0).sum(), bt * (labels == 1).sum()
    kf, kt = brute_drop(np.round(counts_f), np.round(counts_t))
    np.testing.assert_allclose(fpr, kf / (labels == 0).sum(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(tpr, kt / (labels == 1).sum(), rtol=0, atol=1e-12)


def test_roc_matches_sklearn_when_installed():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.normal(size=500) + labels, 1)
    for drop in (True, False):
        for a, b in zip(
            roc_curve(labels, scores, drop),
            metrics.roc_curve(labels, scores, drop_intermediate=drop),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)


def test_tar_at_far_is_eval_ijbc_nearest_point():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 3000)
    scores = np.round(rng.normal(size=3000) + 2 * labels, 2)
    fpr, tpr, _ = roc_curve(labels, scores)
    got = tar_at_far(fpr, tpr, FARS + (0.3, 0.5))
    # eval_ijbc.py's loop, literally: flip, then the minimum of (|fpr - far|, index).
    f, t = np.flipud(fpr), np.flipud(tpr)
    for far, value in got.items():
        _, i = min(zip(abs(f - far), range(len(f)), strict=True))
        assert value == t[i]
    # A hand-made curve: equal FPRs resolve to the larger TPR; equal distances to the
    # larger FPR (the first after flipping).
    fpr = np.array([0.0, 0.1, 0.1, 0.3, 1.0])
    tpr = np.array([0.0, 0.4, 0.6, 0.8, 1.0])
    assert tar_at_far(fpr, tpr, (0.1, 0.2))[0.1] == 0.6
    assert tar_at_far(fpr, tpr, (0.2,))[0.2] == 0.8


# --- 1:N ---------------------------------------------------------------------------------


def brute_identification(probe, probe_ids, gallery, gallery_ids, fars=(0.01, 0.1)):
    """ijb_1n.py's evaluation(), re-stated with loops."""
    mask = [next(j for j, g in enumerate(gallery_ids) if g == p) for p in probe_ids]
    sim = probe @ gallery.T
    order = np.argsort(-sim, axis=1, kind="stable")
    ranks = {k: np.mean([mask[i] in order[i, :k] for i in range(len(probe))]) for k in (1, 5, 10)}
    pos, neg = [], []
    for i in range(len(probe)):
        for j in range(len(gallery)):
            (pos if j == mask[i] else neg).append(sim[i, j])
    need = [math.ceil(len(probe) * f) for f in fars]
    top = heapq.nlargest(max(need), neg)
    tpir = {
        f: np.sum(np.array(pos) > top[k - 1]) / len(probe) for f, k in zip(fars, need, strict=True)
    }
    return ranks, tpir


def test_identification_equals_brute_force():
    rng = np.random.default_rng(2)
    subjects = 40
    gallery = rng.normal(size=(subjects, 8))
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    gallery_ids = rng.permutation(subjects) + 500
    probe_ids = rng.choice(gallery_ids, 230)
    probe = gallery[[list(gallery_ids).index(p) for p in probe_ids]] + rng.normal(
        scale=0.3, size=(230, 8)
    )
    probe /= np.linalg.norm(probe, axis=1, keepdims=True)
    got = identification(probe, probe_ids, gallery, gallery_ids, chunk=37)
    ranks, tpir = brute_identification(probe, probe_ids, gallery, gallery_ids)
    for k in (1, 5, 10):
        assert got.rank[k] == pytest.approx(ranks[k], abs=1e-12)
    for f in (0.01, 0.1):
        assert got.tpir[f] == pytest.approx(tpir[f], abs=1e-12)
    assert 0.2 < got.rank[1] < got.rank[5] < got.rank[10] < 1  # a non-trivial case
    assert 0 < got.tpir[0.01] < got.tpir[0.1] < 1


# --- The command line on a synthetic layout ----------------------------------------------


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijb") / "IJBC"
    return write_layout(root, subjects=6, templates_per_subject=4, seed=0)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    model = get_model("iresnet_tiny", embedding_size=128)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 112, 112, 3)), train=False)
    path = tmp_path_factory.mktemp("w") / "tiny.npz"
    save_weights(
        path,
        jax.device_get(variables["params"]),
        jax.device_get(variables["batch_stats"]),
        "iresnet_tiny",
    )
    return path


def run_cli(*args):
    return main([*map(str, args), "--progress", "none"])


@pytest.fixture(scope="module")
def full_run(layout, weights, tmp_path_factory):
    """All 8 devices, 2 faces each per call (the last call padded), alignment in-process."""
    out = tmp_path_factory.mktemp("out8")
    rc = run_cli(
        "--weights", weights, "--root", layout.root, "--out", out, "--batch", 2, "--workers", 0
    )
    assert rc == 0
    return out


def test_full_run_outputs(full_run, layout):
    scores = np.load(full_run / "ijbc.npy")
    assert scores.dtype == np.float64 and scores.shape == (layout.pairs,)
    record = json.loads((full_run / "ijbc.json").read_text())
    assert record["pairs"] == layout.pairs and record["templates"] == layout.templates
    assert set(record["tar_at_far"]) == {"1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"}
    assert set(record["identification"]["rank"]) == {"1", "5", "10"}
    assert (full_run / "ijbc_roc.png").read_bytes()[:4] == b"\x89PNG"
    assert "| Methods | 1e-06 |" in (full_run / "ijbc.md").read_text()
    assert not list(full_run.glob(".*tmp*"))


def test_features_are_image_and_flip_embeddings(full_run, layout, weights):
    raw = np.load(full_run / "features.npy")
    assert raw.shape == (layout.faces, 256)
    params, stats, _ = load_weights(weights)
    embed = jax.jit(make_embed_fn(get_model("iresnet_tiny", embedding_size=128)))
    lines = meta_files(layout.root, "IJBC")["landmarks"].read_text().splitlines()
    rows = [0, 7, layout.faces - 1]
    crops = []
    for r in rows:
        fields = lines[r].split()
        points = np.array(fields[1:11], np.float32).reshape(5, 2)
        crops.append(align_file(layout.root / "loose_crop" / fields[0], points)[0])
    crops = np.stack(crops)
    want = np.concatenate([embed(params, stats, crops), embed(params, stats, crops[:, :, ::-1])], 1)
    np.testing.assert_allclose(raw[rows], want, rtol=1e-5, atol=1e-5)


def test_cli_scores_equal_restatement_on_cached_features(full_run, layout):
    raw = np.load(full_run / "features.npy")
    files = meta_files(layout.root, "IJBC")
    faceness = np.array(
        [float(line.split()[-1]) for line in files["landmarks"].read_text().splitlines()],
        np.float32,
    )
    faces = np.array(
        [line.split()[1:] for line in files["faces"].read_text().splitlines()], np.int64
    )
    pairs = np.array([line.split() for line in files["pairs"].read_text().splitlines()], np.int64)
    want = reference_scores(raw, faceness, faces[:, 0], faces[:, 1], pairs[:, :2], Switches())
    np.testing.assert_allclose(np.load(full_run / "ijbc.npy"), want, rtol=0, atol=1e-6)
    # The synthetic identities are learnable even by a random tiny net: real numbers.
    fpr, tpr, _ = roc_curve(pairs[:, 2], want)
    record = json.loads((full_run / "ijbc.json").read_text())
    assert record["tar_at_far"]["0.1"] == tar_at_far(fpr, tpr)[0.1]
    assert record["auc"] > 0.6


def test_same_scores_on_one_device_other_batch_and_workers(full_run, layout, weights, tmp_path):
    rc = run_cli(
        "--weights", weights, "--root", layout.root, "--out", tmp_path, "--devices", 1,
        "--batch", 5, "--workers", 2, "--identification", "off",
    )  # fmt: skip
    assert rc == 0
    np.testing.assert_allclose(
        np.load(tmp_path / "features.npy"), np.load(full_run / "features.npy"), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        np.load(tmp_path / "ijbc.npy"), np.load(full_run / "ijbc.npy"), atol=1e-6
    )


def test_rescore_from_cache_equals_full_run(full_run, layout, weights, tmp_path, capsys):
    # A fresh full run with other switches ...
    fresh = tmp_path / "fresh"
    switches = ["--no-flip", "--no-detector-score"]
    assert (
        run_cli(
            "--weights",
            weights,
            "--root",
            layout.root,
            "--out",
            fresh,
            "--batch",
            2,
            "--workers",
            0,
            *switches,
        )
        == 0
    )
    # ... equals rescoring the first run's cache without weights, and with them (reused).
    rescored = tmp_path / "rescored"
    rescored.mkdir()
    for name in ("features.npy", "faceness.npy", "features.json"):
        (rescored / name).write_bytes((full_run / name).read_bytes())
    capsys.readouterr()
    assert run_cli("--root", layout.root, "--out", rescored, *switches) == 0
    assert "cached features" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(rescored / "ijbc.npy"), np.load(fresh / "ijbc.npy"))
    assert run_cli("--weights", weights, "--root", layout.root, "--out", rescored, *switches) == 0
    assert "same weights and data" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(rescored / "ijbc.npy"), np.load(fresh / "ijbc.npy"))
    assert not np.array_equal(np.load(fresh / "ijbc.npy"), np.load(full_run / "ijbc.npy"))


def test_cache_of_other_weights_is_refused(full_run, layout, tmp_path, capsys):
    model = get_model("iresnet_tiny", embedding_size=128)
    variables = model.init(jax.random.key(1), jnp.zeros((1, 112, 112, 3)), train=False)
    other = tmp_path / "other.npz"
    save_weights(
        other,
        jax.device_get(variables["params"]),
        jax.device_get(variables["batch_stats"]),
        "iresnet_tiny",
    )
    out = tmp_path / "out"
    out.mkdir()
    for name in ("features.npy", "faceness.npy", "features.json"):
        (out / name).write_bytes((full_run / name).read_bytes())
    assert run_cli("--weights", other, "--root", layout.root, "--out", out) == 2
    assert "weights_sha256" in capsys.readouterr().err
    assert not (out / "ijbc.npy").exists()


# --- Bad input ---------------------------------------------------------------------------


@pytest.fixture
def broken(layout, tmp_path):
    """A copy of the layout's meta folder, sharing its images, to break."""
    root = tmp_path / "root"
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").symlink_to(layout.root / "loose_crop")
    for path in (layout.root / "meta").iterdir():
        (root / "meta" / path.name).write_bytes(path.read_bytes())
    return root


def error_of(capsys, *args):
    rc = run_cli(*args)
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return rc, err


def test_missing_meta_file(broken, weights, tmp_path, capsys):
    (broken / "meta" / "ijbc_template_pair_label.txt").unlink()
    rc, err = error_of(capsys, "--weights", weights, "--root", broken, "--out", tmp_path / "o")
    assert rc == 2 and "ijbc_template_pair_label.txt: no such file" in err


def test_missing_image_names_the_line(broken, weights, tmp_path, capsys):
    lines = (broken / "meta" / "ijbc_name_5pts_score.txt").read_text().splitlines()
    faces = (broken / "meta" / "ijbc_face_tid_mid.txt").read_text().splitlines()
    lines[4] = "missing.jpg " + lines[4].split(" ", 1)[1]
    faces[4] = "missing.jpg " + faces[4].split(" ", 1)[1]
    (broken / "meta" / "ijbc_name_5pts_score.txt").write_text("\n".join(lines) + "\n")
    (broken / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(faces) + "\n")
    out = tmp_path / "o"
    rc, err = error_of(capsys, "--weights", weights, "--root", broken, "--out", out)
    assert rc == 2
    assert "missing.jpg: no such file" in err and "ijbc_name_5pts_score.txt:5" in err
    assert not (out / "ijbc.npy").exists() and not (out / "features.npy").exists()


@pytest.mark.parametrize(
    "name, line, text, expect",
    [
        ("ijbc_name_5pts_score.txt", 3, "3.jpg 1 2 3", ": expected 12 fields"),
        ("ijbc_face_tid_mid.txt", 2, "2.jpg 1 x", ": template or media id"),
        ("ijbc_template_pair_label.txt", 7, "1 2", ": expected"),
        ("ijbc_template_pair_label.txt", 9, "1 2 5", ": label must be 0 or 1"),
        ("ijbc_template_pair_label.txt", 4, "1 777 0", ": template 777 has no images"),
        ("ijbc_face_tid_mid.txt", 6, "nope.jpg 1 101", " names nope.jpg"),
        ("ijbc_1N_probe_mixed.csv", 3, "x,1,2.jpg", ": expected TEMPLATE_ID"),
    ],
)
def test_malformed_line_names_file_and_line(
    broken, weights, tmp_path, capsys, name, line, text, expect
):
    path = broken / "meta" / name
    lines = path.read_text().splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")
    rc, err = error_of(capsys, "--weights", weights, "--root", broken, "--out", tmp_path / "o")
    assert rc == 2 and f"{name}:{line}{expect}" in err, err


def test_network_not_matching_weights(layout, weights, tmp_path, capsys):
    rc, err = error_of(
        capsys, "--weights", weights, "--network", "r50", "--root", layout.root, "--out", tmp_path
    )
    assert rc == 2 and "iresnet_tiny" in err and "r50" in err


def test_landmarks_outside_warn_and_still_align(broken, weights, tmp_path, capsys):
    path = broken / "meta" / "ijbc_name_5pts_score.txt"
    lines = path.read_text().splitlines()
    fields = lines[1].split()
    fields[1] = "-20.0"  # left eye x outside the image
    lines[1] = " ".join(fields)
    path.write_text("\n".join(lines) + "\n")
    rc, err = error_of(
        capsys,
        "--weights",
        weights,
        "--root",
        broken,
        "--out",
        tmp_path,
        "--batch",
        2,
        "--workers",
        0,
        "--identification",
        "off",
    )
    assert rc == 0
    assert "ijbc_name_5pts_score.txt:2: landmarks outside" in err
    assert np.isfinite(np.load(tmp_path / "ijbc.npy")).all()


def test_torch_model_pt_reuses_the_npz_features(full_run, layout, weights, tmp_path, capsys):
    """A model.pt converted from the same weights has the same fingerprint: the cache of the
    .npz run is reused, and the scores are the same."""
    pytest.importorskip("torch")
    from jaxface.convert import flax_to_torch  # needs torch: skipped
    from jaxface.weights import save_torch_state_dict

    params, stats, _ = load_weights(weights)
    model_pt = tmp_path / "model.pt"
    save_torch_state_dict(flax_to_torch(params, stats, "iresnet_tiny"), model_pt)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("features.npy", "faceness.npy", "features.json"):
        (out / name).write_bytes((full_run / name).read_bytes())
    capsys.readouterr()
    assert (
        run_cli(
            "--weights", model_pt, "--network", "iresnet_tiny", "--root", layout.root, "--out", out
        )
        == 0
    )
    assert "same weights and data" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(out / "ijbc.npy"), np.load(full_run / "ijbc.npy"))


def test_a_far_below_one_over_the_negatives_reads_n_a():
    """276 pairs, 200 negative: one false accept is a FAR of 0.005, so 1e-6 ... 1e-3 cannot
    be measured (eval_ijbc.py would print the nearest ROC point's TAR, 100.00 here)."""
    from jaxface.ijb.metrics import verification
    from jaxface.ijb.report import verification_table

    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(76, int), np.zeros(200, int)]
    scores = labels + 0.1 * rng.normal(size=labels.size)
    result = verification(labels, scores)
    table = verification_table("r50", "IJBC", result)
    row = table.splitlines()[2].split("|")[2:-1]
    assert [c.strip() for c in row[:4]] == ["n/a"] * 4  # 1e-6, 1e-5, 1e-4, 1e-3
    assert all(c.strip() != "n/a" for c in row[4:])  # 1e-2, 1e-1: measurable
    assert "a FAR below 1/200 cannot be measured from 200 negative pairs" in table
    many = verification(np.r_[labels, np.zeros(10**6, int)], np.r_[scores, -np.ones(10**6)])
    assert "n/a" not in verification_table("r50", "IJBC", many)


def test_the_synthetic_layout_command_writes_a_new_folder_only(tmp_path, capsys):
    from jaxface.ijb.synthetic import main as synthetic_main

    out = tmp_path / "IJBB"
    assert synthetic_main([str(out), "--target", "ijbb", "--subjects", "3"]) == 0
    assert "evaluate with python -m jaxface.ijb --root" in capsys.readouterr().out
    meta = read_meta(out, "IJBB")
    assert len(meta.images) == len(list((out / "loose_crop").iterdir())) > 0
    assert [p.name for p in tmp_path.iterdir()] == ["IJBB"]  # no temporary folder left
    before = sorted(p.name for p in (out / "loose_crop").iterdir())
    assert synthetic_main([str(out)]) == 2
    assert "exists; give a new folder" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "loose_crop").iterdir()) == before


def test_eval_scores_a_bin_and_says_what_it_waits_for(weights, small_val_bin, capsys):
    """python -m jaxface.eval: results on stdout, a line before each wait on stderr."""
    from jaxface.eval import main as eval_main

    argv = ["--weights", str(weights), "--bin", str(small_val_bin), "--batch", "2"]
    assert eval_main(argv) == 0
    out, err = capsys.readouterr()
    assert re.fullmatch(r"\[small_val\]\[0\] XNorm [0-9.]+ +Accuracy-Flip [0-9.]+\+-[0-9.]+ +"
                        r"Highest [0-9.]+\n", out)  # fmt: skip
    assert f"loading {weights}" in err and f"loading {small_val_bin}" in err
    assert "[small_val] embedding 80 images and their flips (the first batch compiles" in err
