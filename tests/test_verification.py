import io
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from jaxface.data.verification import VerificationSetError, evaluate, load_bin, write_bin


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 14, 14, 3)).astype(np.uint8)
    return np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)  # smooth: survives JPEG well


def _jpeg(img) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def reference_accuracy(emb, flip, issame):
    """The protocol written out plainly: sum, normalise, squared distance, 10 ordered folds."""
    x = emb + flip
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = ((x[0::2] - x[1::2]) ** 2).sum(1)
    n = len(issame)
    fold_size = [n // 10 + (1 if i < n % 10 else 0) for i in range(10)]
    bounds = np.cumsum([0] + fold_size)
    accs = []
    for k in range(10):
        test = np.zeros(n, bool)
        test[bounds[k] : bounds[k + 1]] = True
        best_t, best_acc = None, -1.0
        for t in np.arange(0, 4, 0.01):
            pred = d[~test] < t
            acc = (np.sum(pred & issame[~test]) + np.sum(~pred & ~issame[~test])) / (~test).sum()
            if acc > best_acc:
                best_t, best_acc = t, acc
        pred = d[test] < best_t
        accs.append(np.mean(pred == issame[test]))
    return np.mean(accs), np.std(accs)


def test_ten_fold_matches_reference():
    rng = np.random.default_rng(0)
    n = 203  # not a multiple of 10: uneven folds
    issame = rng.random(n) < 0.5
    a = rng.normal(size=(n, 16))
    b = np.where(issame[:, None], a + 0.9 * rng.normal(size=(n, 16)), rng.normal(size=(n, 16)))
    emb = np.empty((2 * n, 16))
    emb[0::2], emb[1::2] = a, b
    flip = emb + 0.1 * rng.normal(size=emb.shape)
    result = evaluate(emb, flip, issame)
    acc, std = reference_accuracy(emb, flip, issame)
    assert result.accuracy == pytest.approx(acc, abs=1e-12)
    assert result.std == pytest.approx(std, abs=1e-12)
    assert 0.6 < result.accuracy < 1.0
    norms = np.concatenate([np.linalg.norm(emb, axis=1), np.linalg.norm(flip, axis=1)])
    assert result.xnorm == pytest.approx(norms.mean())


def test_bin_round_trip(tmp_path):
    images = _images(8)
    issame = [True, False, True, False]
    write_bin(tmp_path / "set.bin", images, issame)
    loaded, same = load_bin(tmp_path / "set.bin", image_size=112)
    assert loaded.shape == (8, 112, 112, 3) and loaded.dtype == np.uint8
    assert same.tolist() == issame
    # Exactly what Pillow decodes from a quality-95 JPEG of each image.
    expected = np.stack(
        [np.asarray(Image.open(io.BytesIO(_jpeg(i))).convert("RGB")) for i in images]
    )
    np.testing.assert_array_equal(loaded, expected)
    assert np.abs(loaded.astype(int) - images).mean() < 12


def _py2_pickle(bins, issame) -> bytes:
    """What Python 2's pickle (protocol 2) writes: image bytes as BINSTRING (`str` in py2)."""
    out = bytearray(b"\x80\x02]")  # PROTO 2, EMPTY_LIST
    for data in bins:
        out += b"T" + struct.pack("<I", len(data)) + data + b"a"  # BINSTRING, APPEND
    out += b"]"
    for same in issame:
        out += (b"\x88" if same else b"\x89") + b"a"  # NEWTRUE / NEWFALSE, APPEND
    return bytes(out + b"\x86.")  # TUPLE2, STOP


def test_python2_pickle_fallback(tmp_path):
    images = _images(4, seed=1)
    raw = _py2_pickle([_jpeg(i) for i in images], [True, False])
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(raw)  # what a plain load does with InsightFace's own files
    (tmp_path / "py2.bin").write_bytes(raw)
    loaded, same = load_bin(tmp_path / "py2.bin")
    assert same.tolist() == [True, False] and loaded.shape == (4, 112, 112, 3)


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"not a pickle at all", "not a pickle of (bins, issame_list)"),
        (pickle.dumps({"a": 1}), "expected a pickle of (bins, issame_list), got dict"),
        (pickle.dumps(([b"x"] * 3, [True])), "odd number of images (3)"),
        (pickle.dumps(([b"x"] * 4, [True])), "4 images but 1 pair labels"),
        (pickle.dumps(([b"garbage", b"garbage"], [True])), "image 0 cannot be decoded"),
        (pickle.dumps(([_jpeg(np.zeros((50, 60, 3), np.uint8))] * 2, [True])), "image 0 is 60x50"),
        (pickle.dumps(([1, 2], [True])), "image 0 is int, not bytes"),
    ],
)
def test_bad_bins(tmp_path, content, fragment):
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    with pytest.raises(VerificationSetError) as info:
        load_bin(path)
    assert str(path) in str(info.value) and fragment in str(info.value)


def test_missing_bin(tmp_path):
    with pytest.raises(VerificationSetError, match="cannot be read"):
        load_bin(tmp_path / "nope.bin")
