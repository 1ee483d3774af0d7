"""Faces and their five landmarks in raw photos, for `python -m jaxface.align --detect`.

The detector is MTCNN (Zhang et al. 2016, the original authors' network weights) through
the `mtcnn` package (ipazc/mtcnn, MIT), whose weights ship inside the package: nothing is
downloaded at run time. It runs on TensorFlow; both come with the optional extra
`pip install -e '.[detect]'`. docs/evaluation.md says why this detector and not another.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from jaxface.data.sources import IMAGE_EXTENSIONS

DEFAULT_THRESHOLD = 0.9
DEFAULT_MIN_FACE = 20
DEFAULT_MAX_SIDE = 1024
EXTRA = "detect"


class DetectorMissing(ImportError):
    """The optional extra is not installed."""


@dataclass(frozen=True)
class Detection:
    box: np.ndarray  # float64 [4]: x1 y1 x2 y2, pixels of the photo
    score: float  # MTCNN's final (ONet) face probability
    # float32 [5, 2] x, y: left eye, right eye, nose, left and right mouth corner as seen
    # in the image (the subject's right eye first): jaxface.align's order.
    landmarks: np.ndarray

    @property
    def area(self) -> float:
        return float(max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1]))


@lru_cache(maxsize=1)
def _mtcnn():
    # TensorFlow prints oneDNN and absl notices on import and a warning for every image
    # without a face; none of it is the user's business. A value the user set wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    try:
        # Imported here, not at the top: TensorFlow takes seconds to load and is an
        # optional extra that only --detect needs.
        from mtcnn import MTCNN
    except ImportError as exc:
        raise DetectorMissing(
            f"face detection needs the '{EXTRA}' extra (mtcnn, tensorflow-cpu): "
            f"pip install -e '.[{EXTRA}]' ({exc})"
        ) from None
    return MTCNN(device="CPU:0")


def load() -> None:
    """Load the detector now (seconds: TensorFlow), so a caller can say so first."""
    _mtcnn()


def detect(
    rgb: np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    min_face: int = DEFAULT_MIN_FACE,
    max_side: int = DEFAULT_MAX_SIDE,
) -> list[Detection]:
    """Faces of a uint8 [H, W, 3] RGB photo scoring at least `threshold`, largest first.

    The photo is searched at a scale where its longer side is at most `max_side` (MTCNN's
    image pyramid costs 20 s on a 4000-pixel photo, 0.5 s at 1024); `min_face` is the
    smallest face searched for, in pixels of that scaled photo. Boxes and landmarks are in
    pixels of the photo as given."""
    height, width = rgb.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    small = rgb
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    rows = _mtcnn().detect_faces(
        np.ascontiguousarray(small),
        output_type="numpy",
        box_format="xyxy",
        threshold_onet=threshold,
        min_face_size=min_face,
    )
    faces = []
    for row in np.asarray(rows, np.float64).reshape(-1, 16):
        # mtcnn's numpy rows: image, x1 y1 x2 y2, score, the five x, then the five y.
        if row[5] < threshold:
            continue
        points = row[6:16].reshape(2, 5).T / scale
        faces.append(Detection(row[1:5] / scale, float(row[5]), points.astype(np.float32)))
    return sorted(faces, key=lambda f: -f.area)


def list_photos(root: Path, skip: Path | None = None) -> tuple[list[str], int]:
    """(image paths relative to root in sorted order, count of other files), recursively;
    hidden files and folders, and the folder `skip` (the output, when it lies inside
    root), are left out."""
    skip_real = os.path.realpath(skip) if skip is not None else None
    photos, others = [], 0
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".") and os.path.realpath(Path(folder, d)) != skip_real
        )
        for name in sorted(files):
            if name.startswith("."):
                continue
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                photos.append(Path(folder, name).relative_to(root).as_posix())
            else:
                others += 1
    return sorted(photos), others
