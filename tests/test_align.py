"""Five-point alignment: the transform, and python -m jaxface.align to folders and RecordIO."""

import cv2
import numpy as np
import pytest

from jaxface.align import ARCFACE_TEMPLATE, alignment_matrix, main, umeyama, warp
from jaxface.data import open_recordio
from jaxface.data.synthetic import SyntheticFaces
from jaxface.ijb.synthetic import loose_crop


def similarity(scale, degrees, tx, ty):
    a = np.deg2rad(degrees)
    rot = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return rot, np.array([tx, ty])


def test_alignment_matrix_inverts_an_exact_similarity():
    rot, shift = similarity(1.7, 23.0, 41.0, -12.5)
    landmarks = ARCFACE_TEMPLATE.astype(np.float64) @ rot.T + shift  # template -> photo
    # The inverse by hand: x = R^-1 (x' - t), R^-1 = R^T / s^2 for a scaled rotation.
    inv = rot.T / 1.7**2
    want = np.hstack([inv, (-inv @ shift)[:, None]])
    np.testing.assert_allclose(alignment_matrix(landmarks), want, rtol=0, atol=2e-4)


def test_alignment_matrix_is_the_least_squares_similarity():
    rng = np.random.default_rng(0)
    rot, shift = similarity(0.6, -31.0, 80.0, 55.0)
    landmarks = ARCFACE_TEMPLATE @ rot.T + shift + rng.normal(scale=2.0, size=(5, 2))
    # Hand-made least squares over x' = a x - b y + c, y' = b x + a y + d.
    rows, rhs = [], []
    for (x, y), (u, v) in zip(landmarks, ARCFACE_TEMPLATE.astype(np.float64), strict=True):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    a, b, c, d = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    want = np.array([[a, -b, c], [b, a, d]])
    got = alignment_matrix(landmarks.astype(np.float32))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_umeyama_equals_skimage_when_installed():
    transform = pytest.importorskip("skimage.transform")
    rng = np.random.default_rng(1)
    for _ in range(20):
        points = ARCFACE_TEMPLATE * rng.uniform(0.5, 3) + rng.uniform(-50, 50, 2)
        points = (points + rng.normal(scale=3, size=(5, 2))).astype(np.float32)
        tform = transform.SimilarityTransform()
        tform.estimate(points, ARCFACE_TEMPLATE)
        np.testing.assert_array_equal(umeyama(points, ARCFACE_TEMPLATE), tform.params)


def test_warp_recovers_the_face():
    face = SyntheticFaces(3, seed=4, noise=0.0).image(1, 0)
    rng = np.random.default_rng(2)
    photo, landmarks = loose_crop(face, rng, (180, 160))
    crop = cv2.cvtColor(warp(photo, landmarks), cv2.COLOR_BGR2RGB)
    inner = (slice(10, -10), slice(10, -10))
    err = np.abs(crop[inner].astype(int) - face[inner].astype(int)).mean()
    assert err < 4, err
    wrong = cv2.cvtColor(warp(photo, landmarks[::-1]), cv2.COLOR_BGR2RGB)
    assert np.abs(wrong[inner].astype(int) - face[inner].astype(int)).mean() > 4 * err


# --- The command line --------------------------------------------------------------------


@pytest.fixture
def photos(tmp_path):
    """ROOT/<identity>/<n>.jpg photos (PNG-free, as users have them) and a landmark file;
    the last photo holds the second face listed for it too. Returns (root, file, faces)."""
    root = tmp_path / "photos"
    faces = SyntheticFaces(3, seed=5, noise=0.0)
    rng = np.random.default_rng(3)
    lines, aligned = [], []
    for identity in range(3):
        (root / f"id{identity}").mkdir(parents=True)
        for n in range(2):
            face = faces.image(identity, n)
            photo, points = loose_crop(face, rng, (170, 150))
            name = f"id{identity}/{n}.png"
            cv2.imwrite(str(root / name), photo)
            lines.append(name + " " + " ".join(f"{v:.4f}" for v in points.ravel()))
            aligned.append(face)
    lines.append(lines[-1])  # the same face again: written as 1_1
    aligned.append(aligned[-1])
    landmark_file = tmp_path / "faces.txt"
    landmark_file.write_text("# image x1 y1 ... x5 y5\n" + "\n".join(lines) + "\n")
    return root, landmark_file, aligned


def test_align_to_folder_and_refuse_to_overwrite(photos, tmp_path, capsys):
    root, landmark_file, aligned = photos
    out = tmp_path / "aligned"
    args = ["--root", root, "--landmarks", landmark_file, "--out", out, "--format", "png"]
    assert main([*map(str, args), "--workers", "0"]) == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == [
        "id0/0.png", "id0/1.png", "id1/0.png", "id1/1.png", "id2/0.png", "id2/1.png", "id2/1_1.png"
    ]  # fmt: skip
    for name, face in zip(written, aligned, strict=True):
        crop = cv2.cvtColor(cv2.imread(str(out / name)), cv2.COLOR_BGR2RGB)
        assert crop.shape == (112, 112, 3)
        assert np.abs(crop[10:-10, 10:-10].astype(int) - face[10:-10, 10:-10]).mean() < 4
    before = (out / "id0/0.png").read_bytes()
    capsys.readouterr()
    assert main([*map(str, args), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "id0/0.png already exists" in err and "Traceback" not in err
    assert (out / "id0/0.png").read_bytes() == before
    # Worker processes write the same bytes.
    out2 = tmp_path / "aligned2"
    args2 = ["--root", root, "--landmarks", landmark_file, "--out", out2, "--format", "png"]
    assert main([*map(str, args2), "--workers", "2"]) == 0
    for name in written:
        assert (out2 / name).read_bytes() == (out / name).read_bytes()
    assert not [p for p in out2.rglob(".*")]  # no temporary files left


def test_align_to_recordio(photos, tmp_path, capsys):
    root, landmark_file, aligned = photos
    rec = tmp_path / "train.rec"
    args = ["--root", root, "--landmarks", landmark_file, "--out", rec, "--workers", "0"]
    assert main(list(map(str, args))) == 0
    ds = open_recordio(rec)
    assert len(ds) == 7 and ds.num_classes == 3
    labels = [ds[i][1] for i in range(len(ds))]
    assert labels == [0, 0, 1, 1, 2, 2, 2]
    for i, face in enumerate(aligned):
        image = ds[i][0]
        assert np.abs(image[10:-10, 10:-10].astype(int) - face[10:-10, 10:-10]).mean() < 4
    names = (tmp_path / "train.identities.txt").read_text().split("\n")
    assert names[:3] == ["0\tid0", "1\tid1", "2\tid2"]
    capsys.readouterr()
    assert main(list(map(str, args))) == 2
    assert "train.rec already exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("train", ".train"))) == [
        "train.identities.txt", "train.idx", "train.rec"
    ]  # fmt: skip


def test_recordio_needs_identity_folders(tmp_path, capsys):
    face = SyntheticFaces(1, seed=0).image(0, 0)
    photo, points = loose_crop(face, np.random.default_rng(0), (150, 150))
    cv2.imwrite(str(tmp_path / "a.jpg"), photo)
    (tmp_path / "f.txt").write_text("a.jpg " + " ".join(map(str, points.ravel())) + "\n")
    rc = main(["--root", str(tmp_path), "--landmarks", str(tmp_path / "f.txt"),
               "--out", str(tmp_path / "x.rec"), "--workers", "0"])  # fmt: skip
    assert rc == 2
    assert "f.txt:1: a.jpg has no identity folder" in capsys.readouterr().err
    assert not (tmp_path / "x.rec").exists()


@pytest.mark.parametrize(
    "line, expect",
    [
        ("id0/9.png 1 2 3 4 5 6 7 8 9 10", "faces.txt:3: " + "{root}/id0/9.png: no such file"),
        ("id0/0.png 1 2 3", "faces.txt:3: expected 'image x1 y1 ... x5 y5'"),
        ("id0/0.png 1 2 3 4 5 6 7 8 9 x", "faces.txt:3: landmarks are not numbers"),
        ("../x.png 1 2 3 4 5 6 7 8 9 10", "faces.txt:3: ../x.png is not inside --root"),
    ],
)
def test_bad_landmark_lines(photos, tmp_path, capsys, line, expect):
    root, landmark_file, _ = photos
    lines = landmark_file.read_text().splitlines()
    lines[2] = line
    landmark_file.write_text("\n".join(lines) + "\n")
    out = tmp_path / "o"
    rc = main(["--root", str(root), "--landmarks", str(landmark_file), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and expect.format(root=root) in err, err
    assert not out.exists()


def test_landmarks_outside_warn(photos, tmp_path, capsys):
    root, landmark_file, _ = photos
    lines = landmark_file.read_text().splitlines()
    fields = lines[1].split()
    fields[2] = "-5"  # y of the left eye above the image
    lines[1] = " ".join(fields)
    landmark_file.write_text("\n".join(lines) + "\n")
    out = tmp_path / "o"
    rc = main(["--root", str(root), "--landmarks", str(landmark_file), "--out", str(out),
               "--workers", "0"])  # fmt: skip
    assert rc == 0
    assert "faces.txt:2: landmarks outside id0/0.png; aligned anyway" in capsys.readouterr().err
    assert cv2.imread(str(out / "id0/0.jpg")).shape == (112, 112, 3)
