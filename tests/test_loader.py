"""Host loader: order, sharding across processes, resume, workers, skip_corrupt, sources."""

import os
import subprocess
import sys

import numpy as np
import pytest

from jaxface.data import RecordIOError, RecordIOWarning
from jaxface.data.decode import encode_png
from jaxface.data.loader import HostLoader, LoaderError
from jaxface.data.pack import pack_records, pack_synthetic
from jaxface.data.sources import (
    ImageFolderDataset,
    SyntheticDataset,
    open_source,
)

SIZE = 8


class Tagged:
    """Image i is filled with i % 251 and labelled i: every row says where it came from."""

    def __init__(self, n: int):
        self.n, self.num_classes = n, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        img = np.zeros((SIZE, SIZE, 3), np.uint8)
        img[:, : SIZE // 2] = i % 251  # left half only, so a flip is visible
        return img, i


def loader(n=96, global_batch=12, **kw):
    kw.setdefault("image_size", SIZE)
    return HostLoader(Tagged(n), global_batch, **kw)


def test_batch_holds_the_indexed_samples():
    ld = loader(flip=False)
    images, labels = ld.batch(3)
    assert images.shape == (12, SIZE, SIZE, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, ld.indices(3))
    np.testing.assert_array_equal(images[:, 0, 0, 0], labels % 251)


def test_order_deterministic_per_seed_and_differs_between_epochs():
    a, b, c = loader(seed=5), loader(seed=5), loader(seed=6)
    spe = a.steps_per_epoch
    assert spe == 8
    for step in (0, 7, spe, 3 * spe + 2):
        np.testing.assert_array_equal(a.global_indices(step), b.global_indices(step))
        np.testing.assert_array_equal(a.batch(step)[0], b.batch(step)[0])
    epoch0 = np.concatenate([a.global_indices(s) for s in range(spe)])
    epoch1 = np.concatenate([a.global_indices(s) for s in range(spe, 2 * spe)])
    other = np.concatenate([c.global_indices(s) for s in range(spe)])
    assert sorted(epoch0) == sorted(epoch1) == list(range(96))
    assert not np.array_equal(epoch0, epoch1)
    assert not np.array_equal(epoch0, other)


@pytest.mark.parametrize("n,processes", [(96, 3), (100, 4), (101, 2)])
def test_every_sample_once_per_epoch_across_processes(n, processes):
    shards = [loader(n, 12, process_index=p, process_count=processes) for p in range(processes)]
    spe = shards[0].steps_per_epoch
    assert spe == n // 12
    for epoch in range(2):
        seen = [
            label
            for step in range(epoch * spe, (epoch + 1) * spe)
            for shard in shards
            for label in shard.batch(step)[1]
        ]
        assert len(seen) == len(set(seen)) == spe * 12  # the last partial batch is dropped
        assert set(seen) <= set(range(n))


def test_process_rows_match_the_single_process_batch():
    # Flip and augmentation follow the sample's place in the global batch, so a process's
    # rows are exactly its slice of what one process would see.
    whole = loader(augment=True, seed=2)
    for p in range(4):
        part = loader(augment=True, seed=2, process_index=p, process_count=4)
        for step in (0, 9):
            images, labels = part.batch(step)
            ref_images, ref_labels = whole.batch(step)
            np.testing.assert_array_equal(labels, ref_labels[3 * p : 3 * p + 3])
            np.testing.assert_array_equal(images, ref_images[3 * p : 3 * p + 3])


def test_restored_loader_continues_with_the_next_batches():
    steady = loader(seed=3, augment=True)
    stopped = loader(seed=3, augment=True)
    reference = [next(steady) for _ in range(13)]
    for _ in range(5):
        next(stopped)
    state = stopped.state_dict()
    assert state["step"] == 5
    resumed = loader(seed=3, augment=True)
    resumed.load_state_dict(state)
    for want in reference[5:]:
        got = next(resumed)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    with pytest.raises(ValueError, match="global_batch"):
        loader(global_batch=24, seed=3).load_state_dict(state)


def test_flip_is_seeded_and_mirrors():
    plain, flipped = loader(flip=False, seed=1), loader(flip=True, seed=1)
    images, _ = plain.batch(0)
    out, _ = flipped.batch(0)
    mirrored = np.array([np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images, strict=True)])
    same = np.array([np.array_equal(o, i) for o, i in zip(out, images, strict=True)])
    assert np.all(mirrored ^ same) and mirrored.any() and same.any()
    np.testing.assert_array_equal(loader(flip=True, seed=1).batch(0)[0], out)


def test_augmentation_changes_images_deterministically():
    ds = SyntheticDataset(num_classes=4, num_image=64, seed=0)
    a = HostLoader(ds, 32, seed=0, flip=False, augment=True)
    b = HostLoader(ds, 32, seed=0, flip=False, augment=False)
    aug, _ = a.batch(0)
    plain, _ = b.batch(0)
    assert aug.shape == plain.shape and not np.array_equal(aug, plain)
    np.testing.assert_array_equal(
        HostLoader(ds, 32, seed=0, flip=False, augment=True).batch(0)[0], aug
    )


@pytest.fixture(scope="module")
def small_rec(tmp_path_factory):
    return pack_synthetic(tmp_path_factory.mktemp("rec") / "train", 5, 8, seed=0, workers=0).rec


def test_workers_give_the_same_batches_in_any_order(small_rec):
    source = open_source(small_rec)
    inline = HostLoader(source, 8, seed=4, augment=True)
    with HostLoader(source, 8, seed=4, augment=True, workers=2, prefetch=2, chunk=3) as pooled:
        # Sequential steps, then a jump back (drains and refills the prefetch window).
        for step in (0, 1, 2, 3, 9, 1):
            got, want = pooled.batch(step), inline.batch(step)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])


def test_default_chunk_is_one_task_per_worker(small_rec):
    source = open_source(small_rec)
    assert HostLoader(source, 8, workers=2).chunk == 4
    assert HostLoader(source, 8, workers=3).chunk == 3
    assert HostLoader(source, 8, workers=0).chunk == 8


def test_bench_reports_alternating_rounds_and_a_verdict(small_rec, capsys):
    from jaxface.data import bench

    args = ["--rec", str(small_rec), "--workers", "1", "--batch", "8"]
    assert bench.main([*args, "--seconds", "0.2", "--rounds", "3", "--prefetch", "1"]) == 0
    out = capsys.readouterr().out
    assert [line[:8] for line in out.splitlines() if line.startswith("round ")] == [
        "round 1:",
        "round 2:",
        "round 3:",
    ]
    assert "median round: loader" in out and "the 80 % goal)" in out
    assert "images per core-second" in out


def make_rec_with_a_bad_record(tmp_path):
    rng = np.random.default_rng(0)
    pngs = [encode_png(rng.integers(0, 255, (112, 112, 3), np.uint8)) for _ in range(7)]
    items = [(p, i // 2) for i, p in enumerate(pngs)] + [(pngs[0], 3)]
    summary = pack_records(tmp_path / "t", items)
    # Corrupt image 4 (record key 5): overwrite the PNG signature inside its payload.
    offset = dict(
        tuple(map(int, ln.split("\t"))) for ln in summary.idx.read_text().split("\n")[:-1]
    )[5]
    blob = bytearray(summary.rec.read_bytes())
    blob[offset + 8 + 24 : offset + 8 + 24 + 8] = b"garbage!"
    summary.rec.write_bytes(bytes(blob))
    return summary.rec, offset


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_record_raises_or_is_skipped_and_reported(tmp_path, workers):
    rec, offset = make_rec_with_a_bad_record(tmp_path)
    source = open_source(rec)
    strict = HostLoader(source, 8, seed=0, workers=workers)
    with strict, pytest.raises(RecordIOError, match="not a decodable image") as err:
        strict.batch(0)
    assert (str(err.value.file), err.value.key, err.value.offset) == (str(rec), 5, offset)

    lenient = HostLoader(source, 8, seed=0, skip_corrupt=True, workers=workers)
    with pytest.warns(RecordIOWarning, match=f"record key 5, byte offset {offset}"):
        images, labels = lenient.batch(0)
    assert images.shape == (8, 112, 112, 3) and sorted(labels.tolist()).count(2) == 2
    assert list(lenient.skipped) == [4]
    assert "1 bad record(s)" in lenient.report() and "record key 5" in lenient.report()
    with pytest.warns(RecordIOWarning, match="1 bad record"):
        lenient.close()


def test_sources_share_one_interface(tmp_path):
    for who in ("ann", "bo"):
        (tmp_path / who).mkdir()
        for k in range(2):
            img = np.full((SIZE, SIZE, 3), 10 * k + len(who), np.uint8)
            (tmp_path / who / f"{k}.png").write_bytes(encode_png(img))
    folder = open_source(tmp_path, image_size=SIZE)
    assert isinstance(folder, ImageFolderDataset)
    assert (len(folder), folder.num_classes) == (4, 2)
    assert folder[3][1] == 1 and folder[3][0][0, 0, 0] == 12
    ld = HostLoader(folder, 4, image_size=SIZE, flip=False)
    assert sorted(ld.batch(0)[1].tolist()) == [0, 0, 1, 1]

    synthetic = SyntheticDataset(num_classes=3, num_image=12, seed=7)
    from jaxface.data.synthetic import SyntheticFaces

    np.testing.assert_array_equal(synthetic[7][0], SyntheticFaces(3, 7).image(1, 2))
    assert synthetic[7][1] == 1

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png at all")
    with pytest.raises(RecordIOError, match="x.png"):
        ImageFolderDataset(tmp_path, SIZE)[2]


def test_tfds_without_the_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[tfds\]'"):
        open_source("tfds:mnist")


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        loader(global_batch=12, process_count=5)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        loader(n=10, global_batch=12)
    with pytest.raises(ValueError, match="not a .rec"):
        open_source("/nonexistent/thing")


def test_flip_and_augment_without_opencv(monkeypatch):
    from jaxface.data import augment

    ds = SyntheticDataset(num_classes=4, num_image=32, seed=0)
    with_cv2 = HostLoader(ds, 16, seed=0, augment=True).batch(0)[0]
    flips = HostLoader(ds, 16, seed=0).batch(0)[0]
    monkeypatch.setattr(augment, "cv2", None)
    np.testing.assert_array_equal(HostLoader(ds, 16, seed=0).batch(0)[0], flips)
    without = HostLoader(ds, 16, seed=0, augment=True).batch(0)[0]
    # Resize and blur kernels differ between opencv and Pillow; the draws are the same.
    assert np.abs(without.astype(int) - with_cv2).mean() < 8


def test_tfds_source_through_data_source(monkeypatch):
    # A stand-in for tensorflow_datasets: the adaptor's contract is tfds.data_source(name,
    # split=, data_dir=) -> a random-access source of {"image", "label"} dicts with
    # dataset_info.features["label"].num_classes.
    import types

    class Label:
        num_classes = 5

    class Source(list):
        dataset_info = types.SimpleNamespace(features={"label": Label()})

    calls = []

    def data_source(name, split, data_dir):
        calls.append((name, split, data_dir))
        gray = np.full((SIZE, SIZE, 1), 9, np.uint8)
        return Source(
            [
                {"image": gray, "label": 4},
                {"image": encode_png(np.zeros((SIZE,) * 2 + (3,), np.uint8)), "label": 1},
            ]
        )

    monkeypatch.setitem(
        sys.modules, "tensorflow_datasets", types.SimpleNamespace(data_source=data_source)
    )
    ds = open_source("tfds:faces:1.0.0", image_size=SIZE)
    assert calls == [("faces:1.0.0", "train", None)]
    assert (len(ds), ds.num_classes) == (2, 5)
    image, label = ds[0]
    assert image.shape == (SIZE, SIZE, 3) and image[0, 0, 2] == 9 and label == 4
    assert ds[1][0].shape == (SIZE, SIZE, 3) and ds[1][1] == 1
    with pytest.raises(RecordIOError, match="expected 112x112"):
        open_source("tfds:faces", image_size=112)[0]


def test_data_package_imports_neither_jax_nor_torch():
    code = (
        "import sys, jaxface.data, jaxface.data.loader, jaxface.data.pack, "
        "jaxface.data.inspect, jaxface.data.bench; "
        "print(sorted(m for m in ('jax', 'torch', 'flax') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


class Dying(Tagged):
    """Kills the worker process that loads image 5."""

    def __getitem__(self, i):
        if i == 5:
            import os

            os._exit(3)
        return super().__getitem__(i)


def test_a_dead_worker_fails_the_batch_instead_of_hanging():
    """Restarted a few times (a batch is a pure function of the step), then a message."""
    ld = HostLoader(Dying(24), 24, image_size=SIZE, workers=1)
    died = r"died 4 times \(the last while loading step 0\)"
    warned = pytest.warns(RecordIOWarning, match="restarted the workers")
    with ld, warned, pytest.raises(LoaderError, match=died):
        ld.batch(0)


SCRIPT = """
from jaxface.data.loader import HostLoader
from jaxface.data.sources import SyntheticDataset

def main():
    source = SyntheticDataset(10, 100, 0, 0.3, 4)
    loader = HostLoader(source, global_batch=8, workers=2, prefetch=1)
    print("batch", loader.batch(0)[0].shape)
    loader.close()

{call}
"""


def test_a_script_without_the_main_guard_is_told_so(repo, tmp_path):
    """Spawned decode workers import the parent's script again; unguarded, each built a
    loader of its own and the run ended with 'killed for memory?'. Now each worker says
    what is wrong in one line (as docs/data.md's snippet shows the guard)."""
    env = {**os.environ, "PYTHONPATH": str(repo)}
    bare = tmp_path / "bare.py"
    bare.write_text(SCRIPT.format(call="main()"))
    done = subprocess.run(
        [sys.executable, str(bare)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode != 0
    assert f"{bare} creates a HostLoader at import, so every spawned decode worker" in done.stderr
    guarded = tmp_path / "guarded.py"
    guarded.write_text(SCRIPT.format(call='if __name__ == "__main__":\n    main()'))
    done = subprocess.run(
        [sys.executable, str(guarded)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "batch (8, 112, 112, 3)" in done.stdout and "HostLoader at import" not in done.stderr
