"""Indexable image sources behind one interface: `len(src)`, `src.num_classes`,
`src[i] -> (uint8 [H, W, 3] RGB, int label)`.

Every source pickles without open files or caches, so spawn-started decode workers can
rebuild it; errors are RecordIOError (a ValueError) naming the file, key and offset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from jaxface.data.decode import DecodeError, decode_image
from jaxface.data.recordio import RecordIODataset, RecordIOError


class ImageSource(Protocol):
    num_classes: int

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]: ...


class ImageFolderDataset:
    """ROOT/IDENTITY/*.jpg|png: identities sorted by name are classes 0 .. C-1."""

    def __init__(self, root: str | Path, image_size: int | None = 112):
        from jaxface.data.pack import list_image_folder

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
    the numbering SyntheticStream uses, so held-out samples stay unseen."""

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
            from jaxface.data.synthetic import SyntheticFaces

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
