"""RecordIO read/write against bytes built here from the format description (docs/sources.md),
and every documented bad input."""

import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest

from jaxface.data import RecordIOError, RecordIOWarning, open_recordio
from jaxface.data.decode import decode_image, encode_jpeg, encode_png
from jaxface.data.pack import pack_folder, pack_records, pack_synthetic
from jaxface.data.recordio import RecordFile, RecordIOWriter, pack_payload, write_index

MAGIC = 0xCED7230A


def frame(payload: bytes, cflag: int = 0) -> bytes:
    """One RecordIO part: magic, lrec (cflag in the top 3 bits), payload, zero pad to 4."""
    lrec = (cflag << 29) | len(payload)
    return struct.pack("<II", MAGIC, lrec) + payload + b"\0" * (-len(payload) % 4)


def ir(flag: int, label: float, id_: int, id2: int = 0, labels=(), image=b"") -> bytes:
    return (
        struct.pack("<IfQQ", flag, label, id_, id2)
        + struct.pack(f"<{len(labels)}f", *labels)
        + image
    )


def image(value: int, size: int = 112) -> np.ndarray:
    """A smooth image (JPEG keeps it almost exactly) tagged by `value`."""
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x, y, (x + y) // 2], -1) * (100 / size)
    return np.clip(base + value * 10, 0, 255).astype(np.uint8)


def write_raw(tmp_path, records, name="data"):
    """Write (key, payload) records by hand: returns (rec, idx, offsets)."""
    rec, idx = tmp_path / f"{name}.rec", tmp_path / f"{name}.idx"
    blob, lines, offsets = b"", [], []
    for key, payload in records:
        offsets.append(len(blob))
        lines.append(f"{key}\t{len(blob)}\n")
        blob += frame(payload)
    rec.write_bytes(blob)
    idx.write_text("".join(lines))
    return rec, idx, offsets


# --- Layout ---------------------------------------------------------------------------


def test_insightface_layout_is_byte_exact(tmp_path):
    jpegs = [encode_jpeg(image(i)) for i in range(5)]
    labels = [0, 0, 1, 1, 1]
    summary = pack_records(tmp_path / "train", zip(jpegs, labels, strict=True))
    # Expected, from the format: header [a, b] = [6, 8]; images 1..5; identities 6, 7.
    payloads = [ir(2, 0.0, 0, labels=(6.0, 8.0))]
    payloads += [
        ir(0, float(lab), k + 1, image=j)
        for k, (j, lab) in enumerate(zip(jpegs, labels, strict=True))
    ]
    payloads += [ir(2, 0.0, 6, labels=(1.0, 3.0)), ir(2, 0.0, 7, labels=(3.0, 6.0))]
    blob, idx = b"", ""
    for key, p in enumerate(payloads):
        idx += f"{key}\t{len(blob)}\n"
        blob += frame(p)
    assert summary.rec.read_bytes() == blob
    assert summary.idx.read_text() == idx
    assert (summary.num_images, summary.num_classes) == (5, 2)

    ds = open_recordio(tmp_path / "train.rec")
    assert (len(ds), ds.num_classes, ds.header) == (5, 2, (6, 8))
    assert ds.labels().tolist() == labels
    assert ds.identity_ranges().tolist() == [[1, 3], [3, 6]]
    for i in range(5):
        img, label = ds[i]
        assert img.dtype == np.uint8 and img.shape == (112, 112, 3)
        assert label == labels[i]
        assert np.abs(img.astype(int) - image(i)).mean() < 2  # JPEG, nearly lossless here
        assert ds.raw(i) == (labels[i], jpegs[i])


def test_headerless_im2rec_with_multi_float_labels(tmp_path):
    # im2rec: every record an image, keys in .idx order (not sorted), labels may be several
    # floats with the class first; record 0 has flag > 0 but is an image, not a header.
    pngs = [encode_png(image(i)) for i in range(3)]
    records = [
        (7, ir(3, 0.0, 7, labels=(2.0, 0.5, -1.0), image=pngs[0])),
        (3, ir(0, 0.0, 3, image=pngs[1])),
        (5, ir(2, 0.0, 5, labels=(1.0, 9.0), image=pngs[2])),
    ]
    rec, _, offsets = write_raw(tmp_path, records)
    blob = b"".join(frame(p) for _, p in records)
    with RecordIOWriter(tmp_path / "w.rec") as w:
        w.write(7, pack_payload([2.0, 0.5, -1.0], pngs[0], id=7))
        w.write(3, pack_payload(0, pngs[1], id=3))
        w.write(5, pack_payload([1.0, 9.0], pngs[2], id=5))
    assert (tmp_path / "w.rec").read_bytes() == blob
    assert (tmp_path / "w.idx").read_text() == "".join(
        f"{k}\t{o}\n" for (k, _), o in zip(records, offsets, strict=True)
    )

    ds = open_recordio(rec)
    assert ds.header is None and len(ds) == 3
    assert ds.labels().tolist() == [2, 0, 1]
    assert ds.num_classes == 3
    for i in range(3):
        img, _ = ds[i]
        np.testing.assert_array_equal(img, image(i))  # PNG: exact
    assert [ds.offset(i) for i in range(3)] == offsets


def test_plain_record_fast_path_agrees_with_the_general_reader(tmp_path):
    # Flag-0 one-part records go through read_plain; multi-float labels, split records and
    # bad labels must not, and every path must give the same (image, label).
    pngs = [encode_png(image(i)) for i in range(4)]
    with RecordIOWriter(tmp_path / "m.rec") as w:
        w.write(0, pack_payload(1, pngs[0]))
        w.write(1, pack_payload([0.0, 3.5], pngs[1]))
        w.write(2, pack_payload(1.5, pngs[2]))  # not an integer class
        w.write(3, pack_payload(0, b"\x0a\x23\xd7\xce" * 2 + pngs[3]))  # split at a magic
    records = RecordFile(tmp_path / "m.rec")
    assert records.read_plain(0) == (1.0, pngs[0])
    assert records.read_plain(1) is None and records.read_plain(3) is None
    assert records.read_plain(99) is None
    ds = open_recordio(tmp_path / "m.rec")
    for i in (0, 1):
        img, label = ds[i]
        assert label == ds.raw(i)[0]
        np.testing.assert_array_equal(img, image(i))
    with pytest.raises(RecordIOError, match="label 1.5 is outside"):
        ds[2]
    with pytest.raises(RecordIOError, match="not a decodable image"):
        ds[3]  # reassembled by the general path: the magic word is back inside the payload


def test_continuation_records_split_like_dmlc(tmp_path):
    magic = struct.pack("<I", MAGIC)
    # The magic word at aligned offsets 8 and 16 splits the payload (the word is dropped);
    # at the unaligned offset 21 it is ordinary data.
    payload = b"A" * 8 + magic + b"B" * 4 + magic + b"C" + magic + b"DE"
    expected = (
        frame(b"A" * 8, cflag=1) + frame(b"B" * 4, cflag=2) + frame(b"C" + magic + b"DE", cflag=3)
    )
    with RecordIOWriter(tmp_path / "c.rec") as w:
        w.write(0, payload)
        w.write(1, b"xyz")
    assert (tmp_path / "c.rec").read_bytes() == expected + frame(b"xyz")
    records = RecordFile(tmp_path / "c.rec")
    assert records.read(0) == payload and records.read(1) == b"xyz"
    assert records.offset(1) == len(expected)


def test_continuation_out_of_sequence_is_refused(tmp_path):
    rec = tmp_path / "bad.rec"
    rec.write_bytes(frame(b"abcd", cflag=2))
    (tmp_path / "bad.idx").write_text("0\t0\n")
    with pytest.raises(RecordIOError, match="continuation flag 2") as err:
        RecordFile(rec).read(0)
    assert (err.value.key, err.value.offset) == (0, 0)


def test_missing_index_is_rebuilt_with_a_warning(tmp_path):
    summary = pack_synthetic(tmp_path / "syn", num_classes=3, images_per_class=2)
    original = summary.idx.read_text()
    summary.idx.unlink()
    with pytest.warns(RecordIOWarning, match="no index file"):
        ds = open_recordio(summary.rec)
    assert (len(ds), ds.num_classes) == (6, 3)
    assert ds.labels().tolist() == [0, 0, 1, 1, 2, 2]
    write_index(summary.rec)
    assert summary.idx.read_text() == original


def test_pack_folder_round_trip(tmp_path):
    for who, n in (("bob", 2), ("alice", 1)):
        (tmp_path / "src" / who).mkdir(parents=True)
        for k in range(n):
            (tmp_path / "src" / who / f"{k}.png").write_bytes(encode_png(image(k + len(who))))
    summary = pack_folder(tmp_path / "src", tmp_path / "out")
    ds = open_recordio(summary.rec)
    assert ds.labels().tolist() == [0, 1, 1]  # alice, bob, bob: sorted by name
    np.testing.assert_array_equal(ds[2][0], image(1 + 3))


def test_pack_refuses_non_contiguous_labels(tmp_path):
    items = [(image(0), 0), (image(1), 1), (image(2), 0)]
    with pytest.raises(ValueError, match="contiguous"):
        pack_records(tmp_path / "x", items)


# --- Bad input: each error names the file, the record key and the byte offset. ---


@pytest.fixture
def good(tmp_path):
    """Header file: 4 images of 2 classes; returns (rec path, offsets by key)."""
    pngs = [encode_png(image(i)) for i in range(4)]
    summary = pack_records(tmp_path / "g", zip(pngs, [0, 0, 1, 1], strict=True))
    lines = summary.idx.read_text().splitlines()
    offsets = dict(tuple(map(int, line.split("\t"))) for line in lines)
    return summary.rec, offsets


def assert_names(err, file, key, offset):
    exc = err.value
    assert (str(exc.file), exc.key, exc.offset) == (str(file), key, offset)
    text = str(exc)
    assert str(file) in text and f"record key {key}" in text and f"byte offset {offset}" in text


def patch(path, offset, data):
    blob = bytearray(path.read_bytes())
    blob[offset : offset + len(data)] = data
    path.write_bytes(bytes(blob))


def test_wrong_magic(good):
    rec, offsets = good
    patch(rec, offsets[3], b"\0\0\0\0")
    ds = open_recordio(rec)
    with pytest.raises(RecordIOError, match="wrong magic") as err:
        ds[2]  # image 2 is record key 3
    assert_names(err, rec, 3, offsets[3])


def test_truncated_record(good):
    rec, offsets = good
    # Keep the last image's header, lose most of its payload (and the identity records).
    rec.write_bytes(rec.read_bytes()[: offsets[4] + 40])
    idx = rec.with_suffix(".idx")
    idx.write_text("".join(f"{k}\t{o}\n" for k, o in offsets.items() if o < offsets[4] + 40))
    ds = open_recordio(rec, num_classes=2)
    with pytest.raises(RecordIOError, match="truncated") as err:
        ds[3]
    assert_names(err, rec, 4, offsets[4])


def test_garbled_index(good):
    rec, _ = good
    idx = rec.with_suffix(".idx")
    lines = idx.read_text().splitlines(keepends=True)
    position = len(lines[0]) + len(lines[1])
    idx.write_text("".join(lines[:2]) + "2\tnot-a-number\n" + "".join(lines[3:]))
    with pytest.raises(RecordIOError, match="garbled index line 3") as err:
        open_recordio(rec)
    assert_names(err, idx, "2", position)


def test_index_offset_past_end_of_file(good):
    rec, _ = good
    idx = rec.with_suffix(".idx")
    size = rec.stat().st_size
    idx.write_text(idx.read_text() + f"99\t{size + 400}\n")
    with pytest.raises(RecordIOError, match="past the end") as err:
        open_recordio(rec)
    assert_names(err, rec, 99, size + 400)


def test_index_of_another_file(good):
    rec, offsets = good
    idx = rec.with_suffix(".idx")
    idx.write_text("".join(f"{k}\t{o + 2}\n" for k, o in offsets.items()))
    with pytest.raises(RecordIOError, match="multiple of 4") as err:
        open_recordio(rec)
    assert_names(err, rec, 0, 2)
    # Aligned but wrong: caught by the magic check when the record is read.
    idx.write_text("".join(f"{k}\t{o + 4}\n" for k, o in offsets.items()))
    with pytest.raises(RecordIOError, match="wrong magic") as err:
        open_recordio(rec)
    assert_names(err, rec, 0, 4)


def test_payload_that_is_not_an_image(tmp_path):
    rec, _, offsets = write_raw(
        tmp_path,
        [
            (0, ir(0, 0.0, 0, image=encode_png(image(0)))),
            (1, ir(0, 1.0, 1, image=b"hello, not an image")),
        ],
    )
    ds = open_recordio(rec)
    ds[0]
    with pytest.raises(RecordIOError, match="not a.*image") as err:
        ds[1]
    assert_names(err, rec, 1, offsets[1])


def test_image_of_wrong_size(tmp_path):
    rec, _, offsets = write_raw(tmp_path, [(0, ir(0, 0.0, 0, image=encode_png(image(0, 96))))])
    with pytest.raises(RecordIOError, match="96x96, expected 112x112") as err:
        open_recordio(rec)[0]
    assert_names(err, rec, 0, offsets[0])
    assert open_recordio(rec, image_size=None)[0][0].shape == (96, 96, 3)


@pytest.mark.parametrize("encode", [encode_jpeg, encode_png])
@pytest.mark.parametrize("have_simplejpeg", [True, False])
def test_read_into_decodes_in_place_with_the_same_checks(
    tmp_path, monkeypatch, encode, have_simplejpeg
):
    from jaxface.data import decode

    if not have_simplejpeg:
        monkeypatch.setattr(decode, "simplejpeg", None)
    elif decode.simplejpeg is None:
        pytest.skip("simplejpeg not installed")
    records = [
        (0, ir(0, 1.0, 0, image=encode(image(5)))),
        (1, ir(0, 0.0, 1, image=encode(image(0, 96)))),
        (2, ir(0, 0.0, 2, image=b"\xff\xd8 a JPEG marker, then nothing")),
    ]
    rec, _, offsets = write_raw(tmp_path, records)
    ds = open_recordio(rec)
    out = np.zeros((112, 112, 3), np.uint8)
    assert ds.read_into(0, out) == 1
    np.testing.assert_array_equal(out, ds[0][0])
    with pytest.raises(RecordIOError, match="96x96, expected 112x112") as err:
        ds.read_into(1, out)
    assert_names(err, rec, 1, offsets[1])
    with pytest.raises(RecordIOError, match="not a decodable image") as err:
        ds.read_into(2, out)
    assert_names(err, rec, 2, offsets[2])


@pytest.mark.parametrize("bad_label", [2.0, -1.0, 0.5])
def test_label_outside_classes(tmp_path, bad_label):
    png = encode_png(image(0))
    records = [
        (0, ir(2, 0.0, 0, labels=(3.0, 5.0))),
        (1, ir(0, 0.0, 1, image=png)),
        (2, ir(0, bad_label, 2, image=png)),
        (3, ir(2, 0.0, 3, labels=(1.0, 2.0))),
        (4, ir(2, 0.0, 4, labels=(2.0, 3.0))),
    ]
    rec, _, offsets = write_raw(tmp_path, records)
    ds = open_recordio(rec)
    assert ds.num_classes == 2
    assert ds[0][1] == 0
    with pytest.raises(RecordIOError, match="outside \\[0, 2\\)") as err:
        ds[1]
    assert_names(err, rec, 2, offsets[2])
    with pytest.raises(RecordIOError, match="outside"):
        ds.labels()


def test_not_a_recordio_file(tmp_path):
    rec = tmp_path / "x.rec"
    rec.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecordIOWarning)
        with pytest.raises(RecordIOError, match="wrong magic") as err:
            open_recordio(rec)
    assert_names(err, rec, 0, 0)


def test_decoder_outputs_rgb():
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 200  # red: a BGR mix-up would show up in channel 2
    for data in (encode_jpeg(rgb), encode_png(rgb)):
        out = decode_image(data)
        assert out[..., 0].mean() > 190 and out[..., 2].mean() < 10


def test_decoders_agree_without_opencv(monkeypatch):
    from jaxface.data import decode

    rgb = image(3)
    png, jpeg = encode_png(rgb), encode_jpeg(rgb)
    fast = decode_image(jpeg)
    monkeypatch.setattr(decode, "cv2", None)
    monkeypatch.setattr(decode, "simplejpeg", None)
    assert decode.jpeg_backend() == "pillow"
    np.testing.assert_array_equal(decode_image(png), rgb)
    assert np.abs(decode_image(jpeg).astype(int) - fast).max() <= 8  # IDCTs differ a little


def test_pack_and_inspect_commands(tmp_path, capsys, monkeypatch):
    from jaxface.data import inspect as inspect_tool
    from jaxface.data import pack as pack_tool

    monkeypatch.chdir(tmp_path)
    assert pack_tool.main(["--synthetic", "3x4", "--seed", "1", str(tmp_path / "s")]) == 0
    assert "12 images, 3 identities" in capsys.readouterr().out
    (tmp_path / "s.idx").unlink()
    code = inspect_tool.main(
        ["s.rec", "--write-idx", "--check", "--identities", "2", "--montage", "s_montage.png"]
    )
    out = capsys.readouterr().out
    assert code == 0
    for text in (
        "header [a, b] = [13, 16]",
        "images: 12",
        "identities: 3",
        "label range: [0, 2]",
        "112x112x3: 12",
        "12 good, 0 bad",
        "s_montage.png",
    ):
        assert text in out
    from PIL import Image

    assert Image.open(tmp_path / "s_montage.png").size == (8 * 112, 2 * 112)
    assert pack_tool.main([str(tmp_path / "missing"), "x"]) == 2
    err = capsys.readouterr().err
    assert "jaxface.data.pack: error:" in err and "is not a folder" in err
    # No montage unless asked, and never over an existing file.
    assert inspect_tool.main(["s.rec"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["s_montage.png"]
    assert inspect_tool.main(["s.rec", "--montage", "s_montage.png"]) == 2
    assert "already exists; refusing to overwrite" in capsys.readouterr().err


def test_inspect_lists_every_bad_record_and_draws_odd_sizes(tmp_path, capsys):
    from jaxface.data import inspect as inspect_tool

    items = [(encode_jpeg(image(0)), 0), (encode_jpeg(image(1, size=100)), 0)]
    items += [(b"\xff\xd8 broken", 1), (encode_jpeg(image(3)), 1), (b"\xff\xd8 also", 1)]
    pack_records(tmp_path / "odd", items, image_size=None)
    png = tmp_path / "m.png"
    # Bad records found: exit 1, so that a script checking a dataset can tell.
    assert inspect_tool.main([str(tmp_path / "odd.rec"), "--check", "--montage", str(png)]) == 1
    out = capsys.readouterr().out
    assert "100x100x3: 1" in out and "unreadable" in out
    assert out.count("BAD image") == 2 and "3 good, 2 bad" in out
    assert "1 image(s) of another size resized" in out and "2 unreadable image(s)" in out
    from PIL import Image

    assert Image.open(png).size == (8 * 112, 2 * 112)


def test_ensure_synthetic_packs_once_per_parameters(tmp_path):
    from jaxface.data.pack import ensure_synthetic

    rec = ensure_synthetic(tmp_path / "demo", 2, 3, seed=0)
    stamp = rec.stat().st_mtime_ns
    assert ensure_synthetic(tmp_path / "demo", 2, 3, seed=0).stat().st_mtime_ns == stamp
    ds = open_recordio(ensure_synthetic(tmp_path / "demo", 2, 4, seed=0))
    assert (len(ds), ds.num_classes) == (8, 2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["demo.idx", "demo.rec", "demo.synthetic.json"]


def test_index_missing_a_key_the_header_promises(good):
    rec, offsets = good
    idx = rec.with_suffix(".idx")
    idx.write_text("".join(f"{k}\t{o}\n" for k, o in offsets.items() if k != 4))
    with pytest.raises(RecordIOError, match="no key 4") as err:
        open_recordio(rec)
    assert err.value.key == 4 and str(rec) in str(err.value)


def test_index_with_a_duplicate_key(good):
    rec, offsets = good
    idx = rec.with_suffix(".idx")
    idx.write_text(idx.read_text() + f"2\t{offsets[3]}\n")
    with pytest.raises(RecordIOError, match="key 2 appears twice") as err:
        open_recordio(rec)
    assert err.value.key == 2 and str(idx) in str(err.value)


def test_pack_synthetic_bytes_do_not_depend_on_workers(tmp_path):
    # Noise 0: JPEG keeps the smooth templates, so the decoded pixels can be checked.
    serial = pack_synthetic(tmp_path / "a", 4, 2, noise=0.0, workers=0)
    pooled = pack_synthetic(tmp_path / "b", 4, 2, noise=0.0, workers=2)
    assert serial.rec.read_bytes() == pooled.rec.read_bytes()
    ds = open_recordio(pooled.rec)
    from jaxface.data.synthetic import SyntheticFaces

    decoded, label = ds[5]  # identity 2, sample 1
    assert label == 2
    assert np.abs(decoded.astype(int) - SyntheticFaces(4, 0, noise=0.0).image(2, 1)).mean() < 2


def test_pack_runs_as_a_module_without_runpy_warnings(repo, tmp_path):
    """The package's own imports no longer load jaxface.data.pack, so `python -m` runs it
    once, without runpy's "found in sys.modules ... unpredictable behaviour" warning."""
    cmd = [sys.executable, "-m", "jaxface.data.pack", "--synthetic", "2x2", str(tmp_path / "s")]
    done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "RuntimeWarning" not in done.stderr and "4 images, 2 identities" in done.stdout
