"""Face detection (jaxface.detect, MTCNN) and python -m jaxface.align --detect, on
scikit-image's astronaut portrait: a real photo that a package ships."""

import sys

import cv2
import numpy as np
import pytest

from jaxface import detect
from jaxface.align import ARCFACE_TEMPLATE, alignment_matrix, main, read_landmarks
from jaxface.data import open_recordio

skimage_data = pytest.importorskip("skimage.data")

# Read by eye off an enlarged crop of the astronaut (pupils, nose tip, mouth corners), to
# a pixel or two: the subject's right eye (image left) first, as the template has it.
ASTRONAUT_MARKED = np.array(
    [[202.5, 100.3], [247.0, 102.5], [223.8, 125.5], [202.0, 138.3], [244.3, 140.0]]
)


def needs_detector():
    pytest.importorskip("mtcnn", reason="the detect extra: pip install -e '.[detect]'")


def two_faces() -> np.ndarray:
    """The astronaut and, beside her, a copy at half size: an RGB photo with two faces."""
    astronaut = skimage_data.astronaut()
    canvas = np.zeros((512, 800, 3), np.uint8)
    canvas[:, :512] = astronaut
    canvas[100:356, 540:796] = astronaut[::2, ::2]
    return canvas


def test_astronaut_landmarks_land_on_the_template():
    needs_detector()
    photo = skimage_data.astronaut()
    (face,) = detect.detect(photo)
    assert face.score > 0.99
    assert np.abs(face.landmarks - ASTRONAUT_MARKED).max() < 4, face.landmarks
    # mtcnn's own dictionaries (whole pixels) pin the column layout read from its arrays.
    (raw,) = detect._mtcnn().detect_faces(photo)
    names = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
    np.testing.assert_allclose(face.landmarks, [raw["keypoints"][n] for n in names], atol=1)
    # Aligned, the five points sit where ArcFace's template puts them; what is left is
    # this face's own proportions (a wide smile), not the detector's error.
    matrix = alignment_matrix(face.landmarks)
    moved = face.landmarks @ matrix[:, :2].T + matrix[:, 2]
    miss = np.linalg.norm(moved - ARCFACE_TEMPLATE, axis=1)
    assert miss.max() < 8 and miss.mean() < 5, miss
    swapped = face.landmarks[[1, 0, 2, 4, 3]]  # mirror order: the template must notice
    matrix = alignment_matrix(swapped)
    moved = swapped @ matrix[:, :2].T + matrix[:, 2]
    assert np.linalg.norm(moved - ARCFACE_TEMPLATE, axis=1).mean() > 3 * miss.mean()


def test_no_face_in_coffee_or_gray():
    needs_detector()
    assert detect.detect(skimage_data.coffee()) == []
    assert detect.detect(np.full((200, 200, 3), 128, np.uint8)) == []


def test_largest_first_and_the_scaled_search():
    needs_detector()
    faces = detect.detect(two_faces())
    assert len(faces) == 2 and faces[0].area > 3 * faces[1].area
    assert faces[0].box[0] < 512 <= faces[1].box[0]
    # Searched at 400 pixels (half size), the points come back in the photo's pixels.
    small = detect.detect(two_faces(), max_side=400)
    assert len(small) == 2
    assert np.abs(small[0].landmarks - faces[0].landmarks).max() < 4


# --- The command line --------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """PHOTOS/astronaut/{astronaut.jpg, two.png}, PHOTOS/objects/{coffee.jpg, gray.png}
    and a file that is not an image."""
    root = tmp_path_factory.mktemp("detect") / "photos"
    (root / "astronaut").mkdir(parents=True)
    (root / "objects").mkdir()
    bgr = lambda rgb: cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)  # noqa: E731
    cv2.imwrite(str(root / "astronaut/astronaut.jpg"), bgr(skimage_data.astronaut()))
    cv2.imwrite(str(root / "astronaut/two.png"), bgr(two_faces()))
    cv2.imwrite(str(root / "objects/coffee.jpg"), bgr(skimage_data.coffee()))
    cv2.imwrite(str(root / "objects/gray.png"), np.full((200, 200, 3), 128, np.uint8))
    (root / "notes.txt").write_text("not a photo\n")
    return root


def test_detect_to_folder_then_recordio(photos, tmp_path, capsys):
    needs_detector()
    out = tmp_path / "aligned"
    assert main(["--detect", str(photos), str(out), "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == [
        "astronaut/astronaut.jpg", "astronaut/two.jpg", "landmarks.txt", "no_face.txt"
    ]  # fmt: skip
    assert f"2 faces (the largest of each) from 2 of 4 images -> {out}" in printed
    assert "1 image held more than one face: --all-faces keeps all" in printed
    assert f"no face scoring 0.90 or more in 2 images, listed in {out}/no_face.txt" in printed
    assert "  objects/coffee.jpg\n  objects/gray.png\n" in printed
    assert "left out 1 other file" in printed
    assert (out / "no_face.txt").read_text() == "objects/coffee.jpg\nobjects/gray.png\n"
    assert cv2.imread(str(out / "astronaut/astronaut.jpg")).shape == (112, 112, 3)
    faces = read_landmarks(out / "landmarks.txt")
    assert [f.image for f in faces] == ["astronaut/astronaut.jpg", "astronaut/two.png"]
    # two.png's larger face is the astronaut at full size, at the same place.
    assert np.abs(faces[0].landmarks - faces[1].landmarks).max() < 2
    # The landmark file is jaxface.align's input: the same crops again, byte for byte.
    again = tmp_path / "again"
    args = ["--root", str(photos), "--landmarks", str(out / "landmarks.txt"), "--out", str(again)]
    assert main([*args, "--workers", "0"]) == 0
    for name in ("astronaut/astronaut.jpg", "astronaut/two.jpg"):
        assert (again / name).read_bytes() == (out / name).read_bytes()
    # Never over the previous run's files.
    capsys.readouterr()
    assert main(["--detect", str(photos), str(out), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out}/landmarks.txt already exists" in err
    # Every face, into RecordIO: the identity is the first folder.
    rec = tmp_path / "train.rec"
    assert main(["--detect", str(photos), str(rec), "--all-faces", "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "3 faces of 1 identity (every face) from 2 of 4 images" in printed
    ds = open_recordio(rec)
    assert len(ds) == 3 and ds.num_classes == 1
    assert [f.image for f in read_landmarks(tmp_path / "train.landmarks.txt")] == [
        "astronaut/astronaut.jpg", "astronaut/two.png", "astronaut/two.png"
    ]  # fmt: skip
    assert (tmp_path / "train.no_face.txt").read_text().split() == [
        "objects/coffee.jpg", "objects/gray.png"
    ]  # fmt: skip


def test_detect_bad_input(photos, tmp_path, capsys):
    def error(args: list) -> str:
        assert main(list(map(str, args))) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        return err

    out = tmp_path / "out"
    assert f"{tmp_path}/nope: no such folder" in error(["--detect", tmp_path / "nope", out])
    (tmp_path / "empty").mkdir()
    assert "no images (.jpg" in error(["--detect", tmp_path / "empty", out])
    bad = tmp_path / "bad"
    (bad / "a").mkdir(parents=True)
    (bad / "a/broken.jpg").write_bytes(b"not a jpeg")
    (bad / "b.jpg").write_bytes(cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1])
    want = f"{bad}/a/broken.jpg: not a readable image; remove or convert it"
    assert want in error(["--detect", bad, out])
    (bad / "a/broken.jpg").unlink()
    want = f"{bad}/b.jpg has no identity folder; RecordIO output needs PHOTOS/IDENTITY/FILE"
    assert want in error(["--detect", bad, tmp_path / "x.rec"])
    assert "must not be the photo folder itself" in error(["--detect", photos, photos])
    assert "--threshold 1.5" in error(["--detect", photos, out, "--threshold", "1.5"])
    assert not out.exists() and not (tmp_path / "x.rec").exists()
    with pytest.raises(SystemExit) as stop:
        main(["--detect", "--landmarks", "f.txt", str(photos), str(out)])
    assert stop.value.code == 2
    assert "give either --landmarks FILE or --detect" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--landmarks", "f.txt", "--all-faces", str(photos), str(out)])
    assert "--all-faces is for --detect" in capsys.readouterr().err


def test_no_face_anywhere_writes_nothing(tmp_path, capsys):
    needs_detector()
    photos = tmp_path / "photos"
    photos.mkdir()
    cv2.imwrite(str(photos / "gray.png"), np.full((64, 64, 3), 128, np.uint8))
    assert main(["--detect", str(photos), str(tmp_path / "out")]) == 2
    assert "no face scoring 0.90 or more in its 1 image; nothing written" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_without_the_extra(photos, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mtcnn", None)  # import mtcnn raises ImportError
    detect._mtcnn.cache_clear()
    try:
        assert main(["--detect", str(photos), str(tmp_path / "out")]) == 2
    finally:
        detect._mtcnn.cache_clear()
    err = capsys.readouterr().err
    assert "face detection needs the 'detect' extra" in err and "pip install -e '.[detect]'" in err
