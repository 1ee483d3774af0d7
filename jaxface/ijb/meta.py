"""Reading InsightFace's IJB-B / IJB-C layout, with errors that name the file and line.

    ROOT/loose_crop/<image>
    ROOT/meta/<t>_name_5pts_score.txt    image x1 y1 ... x5 y5 faceness   (one face a line)
    ROOT/meta/<t>_face_tid_mid.txt       image template_id media_id       (same faces, same order)
    ROOT/meta/<t>_template_pair_label.txt  template_1 template_2 label(0/1)
    ROOT/meta/ijbc_1N_gallery_G1.csv, ..._G2.csv, ijbc_1N_probe_mixed.csv   (1:N, optional;
                                         IJB-B: ijbb_1N_gallery_S1.csv, ..._S2.csv)

eval_ijbc.py pairs the two face files by row without looking at the names; here the names
must agree line by line (they do in InsightFace's files), so a shifted file is an error
instead of silently wrong scores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TARGETS = ("IJBC", "IJBB")


class IJBInputError(ValueError):
    """Bad user input: a missing or malformed file; the message names file and line."""


@dataclass
class Identification:
    """1:N protocol files: template ids and subject ids of each row (several rows per
    template, as in the released CSVs), and each row's line number."""

    galleries: list[tuple[Path, np.ndarray, np.ndarray, np.ndarray]]
    probe: tuple[Path, np.ndarray, np.ndarray, np.ndarray]


@dataclass
class IJBMeta:
    target: str
    root: Path
    images: list[str]  # relative to ROOT/loose_crop, one per face
    landmarks: np.ndarray  # float32 [N, 5, 2]
    faceness: np.ndarray  # float32 [N]
    templates: np.ndarray  # int64 [N]
    medias: np.ndarray  # int64 [N]
    lines: np.ndarray  # line of each face in the landmark file (from 1)
    pairs: np.ndarray  # int64 [P, 2]
    labels: np.ndarray  # int8 [P]
    files: dict[str, Path] = field(default_factory=dict)
    identification: Identification | None = None

    @property
    def image_dir(self) -> Path:
        return self.root / "loose_crop"


def meta_files(root: Path, target: str) -> dict[str, Path]:
    t = target.lower()
    meta = root / "meta"
    g1, g2 = ("G1", "G2") if target == "IJBC" else ("S1", "S2")
    return {
        "landmarks": meta / f"{t}_name_5pts_score.txt",
        "faces": meta / f"{t}_face_tid_mid.txt",
        "pairs": meta / f"{t}_template_pair_label.txt",
        "gallery1": meta / f"{t}_1N_gallery_{g1}.csv",
        "gallery2": meta / f"{t}_1N_gallery_{g2}.csv",
        "probe": meta / f"{t}_1N_probe_mixed.csv",
    }


def _read_text(path: Path, wanted_by: str) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise IJBInputError(f"{path}: no such file ({wanted_by})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise IJBInputError(f"{path}: cannot be read ({exc})") from None


def _rows(path: Path, text: str, fields: int, what: str):
    """(line number, fields) of every non-blank line; exactly `fields` fields each."""
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != fields:
            raise IJBInputError(
                f"{path}:{number}: expected {fields} fields ({what}), got {len(parts)}: "
                f"{line[:80]!r}"
            )
        yield number, parts


def read_landmark_file(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(images, float32 landmarks [N, 5, 2], float32 faceness [N], line numbers [N])."""
    text = _read_text(path, "the faces' landmarks and scores")
    images, values, lines = [], [], []
    for number, parts in _rows(path, text, 12, "image x1 y1 ... x5 y5 faceness"):
        try:
            values.append([float(v) for v in parts[1:]])
        except ValueError:
            raise IJBInputError(f"{path}:{number}: landmarks or score not a number") from None
        images.append(parts[0])
        lines.append(number)
    if not images:
        raise IJBInputError(f"{path}: no faces listed")
    array = np.asarray(values, np.float32)
    if not np.isfinite(array).all():
        bad = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
        raise IJBInputError(f"{path}:{lines[bad]}: landmarks or score not finite")
    return images, array[:, :10].reshape(-1, 5, 2), array[:, 10], np.asarray(lines)


def read_face_file(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(images, template ids, media ids, line numbers)."""
    text = _read_text(path, "each face's template and media")
    images, ids, lines = [], [], []
    for number, parts in _rows(path, text, 3, "image template_id media_id"):
        try:
            ids.append((int(parts[1]), int(parts[2])))
        except ValueError:
            raise IJBInputError(f"{path}:{number}: template or media id not an integer") from None
        images.append(parts[0])
        lines.append(number)
    array = np.asarray(ids, np.int64).reshape(-1, 2)
    return images, array[:, 0], array[:, 1], np.asarray(lines)


# A line that is neither blank nor three integers; searched before the fast parse below so
# that a bad line is reported by number (the pair file has 15.7 M lines for IJB-C).
_BAD_PAIR_LINE = re.compile(rb"^(?![ \t]*-?\d+[ \t]+-?\d+[ \t]+\d+[ \t]*\r?$|[ \t]*\r?$).*$", re.M)


def read_pair_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(int64 template pairs [P, 2], int8 labels [P]) in file order."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IJBInputError(f"{path}: no such file (the template pairs to score)") from None
    except OSError as exc:
        raise IJBInputError(f"{path}: cannot be read ({exc})") from None
    bad = _BAD_PAIR_LINE.search(data)
    if bad is not None:
        number = data.count(b"\n", 0, bad.start()) + 1
        raise IJBInputError(
            f"{path}:{number}: expected 'template_1 template_2 label', got {bad.group()[:80]!r}"
        )
    values = np.fromstring(data, dtype=np.int64, sep=" ") if data.strip() else np.zeros(0)
    rows = values.reshape(-1, 3)
    if not len(rows):
        raise IJBInputError(f"{path}: no pairs listed")
    labels = rows[:, 2]
    if not np.isin(labels, (0, 1)).all():
        index = int(np.flatnonzero(~np.isin(labels, (0, 1)))[0])
        raise IJBInputError(f"{path}:{_line_of_row(data, index)}: label must be 0 or 1")
    return rows[:, :2].copy(), labels.astype(np.int8)


def _line_of_row(data: bytes, index: int) -> int:
    """Line number of the index-th non-blank line (for messages only)."""
    seen = -1
    for number, line in enumerate(data.splitlines(), 1):
        if line.strip():
            seen += 1
            if seen == index:
                return number
    return -1


def read_identification_csv(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(template ids, subject ids, line numbers) of a 1:N CSV: a header line, then
    TEMPLATE_ID,SUBJECT_ID,... per row (ijb_1n.py reads the first two columns)."""
    text = _read_text(path, "1:N protocol")
    templates, subjects, lines = [], [], []
    for number, line in enumerate(text.splitlines(), 1):
        if number == 1 or not line.strip():
            continue
        parts = line.split(",")
        try:
            templates.append(int(parts[0]))
            subjects.append(int(parts[1]))
        except (ValueError, IndexError):
            raise IJBInputError(
                f"{path}:{number}: expected TEMPLATE_ID,SUBJECT_ID,... (integers), got "
                f"{line[:80]!r}"
            ) from None
        lines.append(number)
    if not templates:
        raise IJBInputError(f"{path}: no rows after the header")
    return np.asarray(templates, np.int64), np.asarray(subjects, np.int64), np.asarray(lines)


def read_meta(root: str | Path, target: str, identification: str = "auto") -> IJBMeta:
    """Read and cross-check the layout. identification: auto (1:N when its three CSVs are
    there), on (they must be), off."""
    root = Path(root)
    if target not in TARGETS:
        raise IJBInputError(f"--target {target!r}: choose IJBC or IJBB")
    if not (root / "loose_crop").is_dir():
        raise IJBInputError(f"{root / 'loose_crop'}: no such folder (the IJB images)")
    files = meta_files(root, target)
    images, landmarks, faceness, lines = read_landmark_file(files["landmarks"])
    face_images, templates, medias, face_lines = read_face_file(files["faces"])
    if len(face_images) != len(images):
        raise IJBInputError(
            f"{files['faces']} lists {len(face_images)} faces, {files['landmarks']} "
            f"{len(images)}; they must list the same faces in the same order"
        )
    for i, (a, b) in enumerate(zip(images, face_images, strict=True)):
        if a != b:
            raise IJBInputError(
                f"{files['faces']}:{face_lines[i]} names {b}, but {files['landmarks']}:"
                f"{lines[i]} names {a}; the two files must list the same faces in order"
            )
    pairs, labels = read_pair_file(files["pairs"])
    meta = IJBMeta(
        target, root, images, landmarks, faceness, templates, medias, lines, pairs, labels,
        files,
    )  # fmt: skip
    _check_pairs(meta)
    one_n = [files["gallery1"], files["gallery2"], files["probe"]]
    if identification == "on" or (identification == "auto" and all(p.is_file() for p in one_n)):
        meta.identification = _read_identification(meta, *one_n)
    return meta


def _check_pairs(meta: IJBMeta) -> None:
    known = np.unique(meta.templates)
    missing = ~np.isin(meta.pairs, known)
    if missing.any():
        row, col = (int(v) for v in np.argwhere(missing)[0])
        data = meta.files["pairs"].read_bytes()
        raise IJBInputError(
            f"{meta.files['pairs']}:{_line_of_row(data, row)}: template "
            f"{int(meta.pairs[row, col])} has no images in {meta.files['faces']}"
        )
    if not (meta.labels == 1).any() or not (meta.labels == 0).any():
        kind = "genuine (1)" if not (meta.labels == 1).any() else "impostor (0)"
        raise IJBInputError(f"{meta.files['pairs']}: no {kind} pairs; a ROC needs both")


def _read_identification(meta: IJBMeta, g1: Path, g2: Path, probe: Path) -> Identification:
    known = np.unique(meta.templates)
    parts = []
    for path in (g1, g2, probe):
        templates, subjects, lines = read_identification_csv(path)
        missing = ~np.isin(templates, known)
        if missing.any():
            i = int(np.flatnonzero(missing)[0])
            raise IJBInputError(
                f"{path}:{lines[i]}: template {templates[i]} has no images in {meta.files['faces']}"
            )
        parts.append((path, templates, subjects, lines))
    return Identification(galleries=parts[:2], probe=parts[2])
