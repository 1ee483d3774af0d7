"""Indexable image sources behind one interface: `len(src)`, `src.num_classes`,
`src[i] -> (uint8 [H, W, 3] RGB, int label)`.

Every source pickles without open files or caches, so spawn-started decode workers can
rebuild it; errors are RecordIOError (a ValueError) naming the file, key and offset.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from jaxface.data.decode import DecodeError, decode_image, decode_into
from jaxface.data.recordio import RecordFile, RecordIOError, RecordIOWarning, resolve_rec_path
from jaxface.data.synthetic import SyntheticFaces

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_image_folder(root: str | Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """(path, label) of every image under root/IDENTITY/, identities sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder of identity sub-folders")
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not names:
        raise ValueError(f"{root} has no sub-folders (one per identity expected)")
    items = []
    for label, name in enumerate(names):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        items.extend((p, label) for p in files)
    if not items:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return items, names


class ImageSource(Protocol):
    num_classes: int

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]: ...


class RecordIODataset:
    """Images and class labels of an InsightFace or im2rec RecordIO file.

    `ds[i] -> (uint8 [H, W, 3] RGB, int label)`; `raw(i)` gives (label, encoded bytes) for
    loaders that decode elsewhere. `image_size=None` accepts any size.
    """

    def __init__(
        self,
        path: str | Path,
        idx_path: str | Path | None = None,
        image_size: int | None = 112,
        num_classes: int | None = None,
    ):
        self.path = resolve_rec_path(path)
        self.records = RecordFile(self.path, idx_path)
        self.image_size = image_size
        self.identity_keys: np.ndarray | None = None
        self.header: tuple[int, int] | None = None
        # InsightFace's header is the record with key 0 wherever it lies in the file:
        # rec_builder writes it last, face2rec2 between the images and the identity
        # records; arcface_torch reads it by key through the index, and so does this.
        first = 0 if self.records.has_key(0) else int(self.records.keys[0])
        header, labels, image = self.records.unpack(first)
        # A multi-label im2rec image also has flag > 0 in record 0: a header has no image.
        if header.flag >= 2 and not image and first == 0:
            a, b = int(labels[0]), int(labels[1])
            if not (1 <= a <= b) or labels[0] != a or labels[1] != b:
                raise RecordIOError(
                    f"InsightFace header record holds [{labels[0]}, {labels[1]}]: expected "
                    "integers 1 <= a <= b",
                    str(self.path),
                    first,
                    self.records.offset(first),
                )
            self.header = (a, b)
            self.keys = np.arange(1, a, dtype=np.int64)
            if b > a:
                self.identity_keys = np.arange(a, b, dtype=np.int64)
            missing = [k for k in (1, a - 1) if a > 1 and not self.records.has_key(k)]
            if missing:
                raise RecordIOError(
                    f"the header says images are records 1..{a - 1} but the index "
                    f"{self.records.idx_path} has no key {missing[0]}",
                    str(self.path),
                    missing[0],
                )
        else:
            self.keys = self.records.keys
        if num_classes is None and self.identity_keys is not None:
            num_classes = len(self.identity_keys)
        self._num_classes = num_classes
        self._labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_classes(self) -> int:
        """From the header's identity records; for header-less files, max label + 1 over
        the records whose header reads (bad ones are counted in a warning, and fail again
        when read, unless the loader skips them)."""
        if self._num_classes is None:
            top, bad = -1, []
            for i in range(len(self)):
                try:
                    top = max(top, self._label_of(i))
                except RecordIOError as exc:
                    bad.append(exc)
            if bad:
                warnings.warn(
                    f"{self.path}: {len(bad)} record(s) with unreadable labels left out of "
                    f"num_classes; the first: {bad[0]}",
                    RecordIOWarning,
                    stacklevel=2,
                )
            self._num_classes = top + 1
        return self._num_classes

    def labels(self) -> np.ndarray:
        """int64 class of every image (reads record headers only, once)."""
        if self._labels is None:
            self._labels = np.fromiter(
                (self._label_of(i) for i in range(len(self))), np.int64, len(self)
            )
        return self._labels

    def key(self, i: int) -> int:
        return int(self.keys[i])

    def offset(self, i: int) -> int:
        return self.records.offset(self.key(i))

    def _class(self, labels: np.ndarray, key: int) -> int:
        value = float(labels[0])
        label = int(value)
        bad = label != value or label < 0
        if not bad and self._num_classes is not None and label >= self._num_classes:
            bad = True
        if bad:
            bound = self._num_classes if self._num_classes is not None else "num_classes"
            raise RecordIOError(
                f"label {value:g} is outside [0, {bound})",
                str(self.path),
                key,
                self.records.offset(key),
            )
        return label

    def _label_of(self, i: int) -> int:
        key = self.key(i)
        labels, _ = self.records.read_label_prefix(key)
        return self._class(labels, key)

    def raw(self, i: int) -> tuple[int, bytes]:
        """(class label, encoded image bytes) of image i, without decoding."""
        key = self.key(i)
        _, labels, image = self.records.unpack(key)
        return self._class(labels, key), image

    def decode(self, i: int, image: bytes) -> np.ndarray:
        """Decode and check the encoded image of image i (errors name file, key, offset)."""
        try:
            array = decode_image(image)
        except DecodeError as exc:
            key = self.key(i)
            raise RecordIOError(str(exc), str(self.path), key, self.records.offset(key)) from None
        size = self.image_size
        if size is not None and array.shape[:2] != (size, size):
            key = self.key(i)
            raise RecordIOError(
                f"image is {array.shape[1]}x{array.shape[0]}, expected {size}x{size}",
                str(self.path),
                key,
                self.records.offset(key),
            )
        return array

    def _encoded(self, i: int) -> tuple[int, bytes]:
        """(class, image bytes) of image i: one struct read for a plain record, the general
        reader (which also names any fault) for everything else."""
        n = len(self.keys)
        if not -n <= i < n:
            raise IndexError(f"image {i} out of range for {n} images")
        i %= n
        plain = self.records.read_plain(int(self.keys[i]))
        if plain is not None:
            value, image = plain
            label = int(value)
            if label == value and 0 <= label < (self._num_classes or label + 1):
                return label, image
        return self.raw(i)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        label, image = self._encoded(i)
        return self.decode(i % len(self), image), label

    def read_into(self, i: int, out: np.ndarray) -> int:
        """Decode image i straight into `out` (uint8 [S, S, 3], contiguous) and return its
        class: ds[i] without the copy, with out's size as the one expected."""
        label, image = self._encoded(i)
        try:
            decode_into(image, out)
        except DecodeError as exc:
            key = self.key(i % len(self))
            raise RecordIOError(str(exc), str(self.path), key, self.records.offset(key)) from None
        return label

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        for i in range(len(self)):
            yield self[i]

    def identity_ranges(self) -> np.ndarray | None:
        """[num_classes, 2] image-record ranges [start, stop) from the identity records."""
        if self.identity_keys is None:
            return None
        rows = [self.records.unpack(int(k))[1][:2] for k in self.identity_keys]
        return np.asarray(rows, np.int64).reshape(-1, 2)

    def close(self) -> None:
        self.records.close()


def open_recordio(
    path: str | Path,
    idx_path: str | Path | None = None,
    image_size: int | None = 112,
    num_classes: int | None = None,
) -> RecordIODataset:
    """Open `train.rec` (or a folder holding it, or a prefix). See RecordIODataset."""
    return RecordIODataset(path, idx_path, image_size, num_classes)


class ImageFolderDataset:
    """ROOT/IDENTITY/*.jpg|png: identities sorted by name are classes 0 .. C-1."""

    def __init__(self, root: str | Path, image_size: int | None = 112):
        self.root = Path(root)
        items, self.class_names = list_image_folder(self.root)
        self.paths = [str(p) for p, _ in items]
        self.labels = np.asarray([label for _, label in items], np.int64)
        self.num_classes = len(self.class_names)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path = self.paths[i]
        try:
            image = decode_image(Path(path).read_bytes())
        except (DecodeError, OSError) as exc:
            raise RecordIOError(str(exc), path, key=i, offset=0) from None
        size = self.image_size
        if size is not None and image.shape[:2] != (size, size):
            raise RecordIOError(
                f"image is {image.shape[1]}x{image.shape[0]}, expected {size}x{size}",
                path,
                key=i,
                offset=0,
            )
        return image, int(self.labels[i])


class SyntheticDataset:
    """SyntheticFaces as an indexable dataset: image i is (identity i % C, sample i // C),
    the numbering `heldout_pairs` relies on, so held-out samples stay unseen."""

    def __init__(
        self,
        num_classes: int,
        num_image: int,
        seed: int = 0,
        noise: float = 0.35,
        jitter: int = 4,
    ):
        self.num_classes = num_classes
        self.num_image = num_image
        self._args = (num_classes, seed, noise, jitter)
        self._faces = None

    def __getstate__(self):
        return {**self.__dict__, "_faces": None}  # its template cache does not pickle

    def __len__(self) -> int:
        return self.num_image

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        if self._faces is None:
            self._faces = SyntheticFaces(*self._args)
        identity, sample = i % self.num_classes, i // self.num_classes
        return self._faces.image(identity, sample), identity


class TFDSDataset:
    """A TFDS dataset through `tfds.data_source` (array_record; TensorFlow not needed).
    Needs features `image` and `label`; install with `pip install -e '.[tfds]'`."""

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str | None = None,
        image_size: int | None = 112,
    ):
        self.name, self.split, self.data_dir, self.image_size = name, split, data_dir, image_size
        self._source = None
        source = self._open()
        self._len = len(source)
        info = getattr(source, "dataset_info", None)
        label = info.features["label"] if info is not None else None
        if label is None or not hasattr(label, "num_classes"):
            raise ValueError(f"tfds:{name}: no ClassLabel feature 'label' to take classes from")
        self.num_classes = int(label.num_classes)

    def _open(self):
        if self._source is None:
            try:
                import tensorflow_datasets as tfds
            except ImportError:
                raise ImportError(
                    f"tfds:{self.name} needs tensorflow-datasets: pip install -e '.[tfds]' "
                    "(TensorFlow itself is not needed)"
                ) from None
            self._source = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir)
        return self._source

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        record = self._open()[i]
        image = record["image"]
        if isinstance(image, bytes):
            image = decode_image(image)
        image = np.asarray(image, np.uint8)
        if image.ndim == 2 or image.shape[-1] == 1:
            image = np.repeat(image.reshape(*image.shape[:2], 1), 3, axis=2)
        size = self.image_size
        if size is not None and image.shape[:2] != (size, size):
            raise RecordIOError(
                f"image is {image.shape[1]}x{image.shape[0]}, expected {size}x{size}",
                f"tfds:{self.name}[{self.split}]",
                key=i,
            )
        return image, int(record["label"])


def open_source(
    spec: str | Path,
    image_size: int | None = 112,
    num_classes: int | None = None,
    tfds_split: str = "train",
) -> ImageSource:
    """`tfds:NAME`, a `.rec` (or its prefix, or a folder holding `train.rec`), or an image
    folder with one sub-folder per identity. Synthetic data: build SyntheticDataset."""
    text = str(spec)
    if text.startswith("tfds:"):
        return TFDSDataset(text[len("tfds:") :], tfds_split, image_size=image_size)
    path = Path(text)
    is_rec = (
        path.suffix == ".rec"
        or (path.is_dir() and (path / "train.rec").is_file())
        or path.with_suffix(".rec").is_file()
    )
    if is_rec:
        return RecordIODataset(path, image_size=image_size, num_classes=num_classes)
    if path.is_dir():
        return ImageFolderDataset(path, image_size)
    raise ValueError(
        f"data source {text!r}: not a .rec file, a folder holding train.rec, an image folder, "
        "or tfds:NAME"
    )
