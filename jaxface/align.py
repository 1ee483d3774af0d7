"""Five-point face alignment onto ArcFace's 112x112 template, and its command line.

    python -m jaxface.align --root PHOTOS --landmarks faces.txt --out ALIGNED
    python -m jaxface.align --root PHOTOS --landmarks faces.txt --out train.rec
    python -m jaxface.align --detect PHOTOS ALIGNED      (or train.rec; needs '.[detect]')

`faces.txt` has one face a line, `image x1 y1 x2 y2 ... x5 y5` (left eye, right eye, nose,
left and right mouth corner, in pixels of the image; the image path relative to --root; a
twelfth field, e.g. a detector score, is ignored). The transform is the one InsightFace's
`eval_ijbc.py` uses (and jaxface.ijb shares): the least-squares similarity transform
(Umeyama, as `skimage.transform.SimilarityTransform.estimate`) from the five points onto
ArcFace's template, applied with `cv2.warpAffine` (bilinear, border 0).

Output: an image folder (`ALIGNED/<sub-folders of the image path>/<stem>.jpg`; a second
face of one image gets `<stem>_1.jpg`, ...) or, for an `--out` ending in `.rec`, an
InsightFace RecordIO file (`.rec` + `.idx` + `.identities.txt`) through jaxface.data.pack,
the identity being the first folder of each image path. Every file is written under a
temporary name and renamed when complete; an existing file is never overwritten.

`--detect` finds the faces and their landmarks itself (jaxface.detect: MTCNN) in every
image under PHOTOS, keeps the largest face of each (or `--all-faces`) scoring at least
`--threshold`, aligns them as above and writes beside the crops the landmark file it made
(`landmarks.txt`, or `train.landmarks.txt`) and the list of images without a face
(`no_face.txt`, or `train.no_face.txt`).
Exit status: 0 done, 1 failed run, 2 bad input (named with its file and line).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from jaxface import cli, detect
from jaxface.data.decode import encode_jpeg
from jaxface.data.pack import pack_records
from jaxface.data.sources import IMAGE_EXTENSIONS
from jaxface.progress import format_duration

IMAGE_SIZE = 112


def _arcface_template() -> np.ndarray:
    # Built as eval_ijbc.py builds it (float32, then +8 on x) so the float32 values are
    # bit-identical to the reference's, not a rounding of the decimal 38.2946.
    points = np.array(
        [
            [30.2946, 51.6963],
            [65.5318, 51.5014],
            [48.0252, 71.7366],
            [33.5493, 92.3655],
            [62.7299, 92.2041],
        ],
        dtype=np.float32,
    )
    points[:, 0] += 8.0
    return points


ARCFACE_TEMPLATE = _arcface_template()  # [5, 2] x, y in the 112x112 crop


class AlignError(ValueError):
    """Bad input for alignment; the message names the file (and line)."""


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """3x3 float64 least-squares similarity transform (rotation, uniform scale,
    translation) taking points `src` [N, 2] onto `dst` [N, 2]: Umeyama (1991), step for
    step as skimage's SimilarityTransform.estimate, including its arithmetic in the
    inputs' dtype (float32 landmarks, as eval_ijbc.py passes them, give its float32
    rounding) and its rank and reflection handling."""
    src = np.asarray(src)
    dst = np.asarray(dst)
    n, dim = src.shape
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / n
    d = np.ones(dim, np.float64)
    if np.linalg.det(cov) < 0:
        d[-1] = -1
    transform = np.eye(dim + 1, dtype=np.float64)
    u, s, vt = np.linalg.svd(cov)
    rank = np.linalg.matrix_rank(cov)
    if rank == 0:
        return np.full((dim + 1, dim + 1), np.nan)
    if rank == dim - 1:
        # Degenerate (collinear points): pick the rotation, never a reflection.
        if np.linalg.det(u) * np.linalg.det(vt) > 0:
            transform[:dim, :dim] = u @ vt
        else:
            d_last = d.copy()
            d_last[-1] = -1
            transform[:dim, :dim] = u @ np.diag(d_last) @ vt
    else:
        transform[:dim, :dim] = u @ np.diag(d) @ vt
    scale = 1.0 / src_c.var(axis=0).sum() * (s @ d)
    transform[:dim, dim] = dst_mean - scale * (transform[:dim, :dim] @ src_mean)
    transform[:dim, :dim] *= scale
    return transform


def alignment_matrix(landmarks: np.ndarray) -> np.ndarray:
    """2x3 float64 matrix mapping image pixels onto the 112x112 ArcFace crop."""
    points = np.asarray(landmarks, np.float32).reshape(5, 2)
    return umeyama(points, ARCFACE_TEMPLATE)[:2]


def warp(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """The aligned 112x112 crop of `image` (channel order unchanged), border 0."""
    return cv2.warpAffine(
        image, alignment_matrix(landmarks), (IMAGE_SIZE, IMAGE_SIZE), borderValue=0.0
    )


def outside(landmarks: np.ndarray, shape: tuple[int, ...]) -> bool:
    """True when a landmark lies outside an image of `shape` [H, W, ...]."""
    points = np.asarray(landmarks, np.float64).reshape(5, 2)
    height, width = shape[:2]
    return bool(
        (points[:, 0] < 0).any()
        or (points[:, 0] > width - 1).any()
        or (points[:, 1] < 0).any()
        or (points[:, 1] > height - 1).any()
    )


def read_bgr(path: str | Path) -> np.ndarray:
    """uint8 [H, W, 3] BGR, read as the reference reads it (cv2.imread, EXIF applied)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        reason = "no such file" if not os.path.exists(path) else "not a readable image"
        raise AlignError(f"{path}: {reason}")
    return image


def align_file(path: str | Path, landmarks: np.ndarray) -> tuple[np.ndarray, bool]:
    """(aligned uint8 RGB crop, whether a landmark lies outside the image)."""
    bgr = read_bgr(path)
    crop = warp(bgr, landmarks)
    return cv2.cvtColor(crop, cv2.COLOR_BGR2RGB), outside(landmarks, bgr.shape)


# --- The landmark file -------------------------------------------------------------------


@dataclass(frozen=True)
class Face:
    image: str  # relative to the root
    landmarks: np.ndarray  # float32 [5, 2]
    line: int  # in the landmark file, from 1


def read_landmarks(path: Path) -> list[Face]:
    """Faces of a landmark file; AlignError naming the line of a malformed one."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise AlignError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    faces = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) not in (11, 12):
            raise AlignError(
                f"{path}:{number}: expected 'image x1 y1 ... x5 y5' (11 fields), got {len(fields)}"
            )
        try:
            points = np.array([float(v) for v in fields[1:11]], np.float32).reshape(5, 2)
        except ValueError:
            raise AlignError(f"{path}:{number}: landmarks are not numbers: {line!r}") from None
        if not np.isfinite(points).all():
            raise AlignError(f"{path}:{number}: landmarks are not finite: {line!r}")
        faces.append(Face(fields[0], points, number))
    if not faces:
        raise AlignError(f"{path}: no faces listed")
    return faces


# --- Outputs -----------------------------------------------------------------------------


def publish(tmp: Path, final: Path) -> None:
    """Rename a complete temporary file to `final`, refusing to replace an existing file."""
    try:
        os.link(tmp, final)  # fails if final exists: no window in which it could be replaced
    except FileExistsError:
        tmp.unlink(missing_ok=True)
        raise AlignError(f"{final} already exists; not overwritten") from None
    except OSError:  # a file system without hard links
        if final.exists():
            tmp.unlink(missing_ok=True)
            raise AlignError(f"{final} already exists; not overwritten") from None
        os.replace(tmp, final)
        return
    tmp.unlink()


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp{os.getpid()}")


def output_names(faces: Sequence[Face], ext: str) -> list[str]:
    """Relative output path of each face: the image's path with `ext`, `_k` for the k-th
    further face of the same image."""
    seen: dict[str, int] = {}
    names = []
    for face in faces:
        rel = Path(face.image)
        k = seen.get(face.image, 0)
        seen[face.image] = k + 1
        stem = rel.stem if k == 0 else f"{rel.stem}_{k}"
        names.append(str(rel.with_name(stem + ext)))
    taken: dict[str, int] = {}
    for face, name in zip(faces, names, strict=True):
        if name in taken:
            raise AlignError(
                f"lines {taken[name]} and {face.line} would both write {name}; rename one image"
            )
        taken[name] = face.line
    return names


def _check_inputs(root: Path, faces: Sequence[Face], landmark_file: Path) -> None:
    for face in faces:
        rel = Path(face.image)
        if rel.is_absolute() or ".." in rel.parts:
            raise AlignError(f"{landmark_file}:{face.line}: {face.image} is not inside --root")
        if not (root / rel).is_file():
            raise AlignError(f"{landmark_file}:{face.line}: {root / rel}: no such file")


# Worker side: one task aligns (and writes or encodes) a run of faces.


def _task_folder(root: str, out: str, jobs: list, quality: int) -> list[tuple[int, str]]:
    warnings = []
    for image, landmarks, line, name in jobs:
        crop, off = align_file(Path(root) / image, landmarks)
        if off:
            warnings.append((line, image))
        final = Path(out) / name
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_name(final)
        bgr = cv2.cvtColor(crop, cv2.COLOR_RGB2BGR)
        params = [cv2.IMWRITE_JPEG_QUALITY, quality] if final.suffix == ".jpg" else []
        ok, data = cv2.imencode(final.suffix, bgr, params)
        if not ok:
            raise AlignError(f"{final}: cannot be encoded")
        tmp.write_bytes(data.tobytes())
        publish(tmp, final)
    return warnings


def _task_encode(root: str, jobs: list, quality: int) -> list[tuple[bytes, int, str | None]]:
    out = []
    for image, landmarks, line in jobs:
        crop, off = align_file(Path(root) / image, landmarks)
        out.append((encode_jpeg(crop, quality), line, image if off else None))
    return out


def _worker_init() -> None:
    cv2.setNumThreads(1)  # one process per core already


def _chunks(items: Sequence, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _pool(workers: int) -> ProcessPoolExecutor | None:
    if workers <= 0:
        return None
    # spawn, not fork: callers (tests, jaxface.ijb) may hold jax's threads.
    return ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _worker_init)


def _map(pool, fn, tasks: list[tuple]) -> Iterator:
    if pool is None:
        return (fn(*t) for t in tasks)
    return pool.map(fn, *zip(*tasks, strict=True)) if tasks else iter(())


def align_to_folder(
    root: Path,
    faces: Sequence[Face],
    out: Path,
    ext: str = ".jpg",
    quality: int = 95,
    workers: int = 0,
    chunk: int = 64,
) -> list[tuple[int, str]]:
    """Write each face's crop under `out`; returns (line, image) of faces with landmarks
    outside their image. Refuses (AlignError) before writing anything if a target exists."""
    names = output_names(faces, ext)
    for face, name in zip(faces, names, strict=True):
        if (out / name).exists():
            raise AlignError(f"{out / name} already exists (line {face.line}); not overwritten")
    jobs = [(f.image, f.landmarks, f.line, n) for f, n in zip(faces, names, strict=True)]
    tasks = [(str(root), str(out), c, quality) for c in _chunks(jobs, chunk)]
    out.mkdir(parents=True, exist_ok=True)
    pool = _pool(workers)
    try:
        return [w for ws in _map(pool, _task_folder, tasks) for w in ws]
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def identity_of(image: str, landmark_file: Path, line: int) -> str:
    parts = Path(image).parts
    if len(parts) < 2:
        raise AlignError(
            f"{landmark_file}:{line}: {image} has no identity folder; RecordIO output needs "
            "image paths IDENTITY/FILE"
        )
    return parts[0]


def align_to_rec(
    root: Path,
    faces: Sequence[Face],
    rec: Path,
    landmark_file: Path,
    quality: int = 95,
    workers: int = 0,
    chunk: int = 64,
) -> tuple[list[tuple[int, str]], int, int]:
    """Write `rec` + `.idx` + `.identities.txt` (labels 0 .. C-1 in sorted identity
    order, images grouped by label); returns (warnings, images, identities)."""
    prefix = rec.with_suffix("")
    finals = [
        rec,
        prefix.with_name(prefix.name + ".idx"),
        prefix.with_name(prefix.name + ".identities.txt"),
    ]
    for final in finals:
        if final.exists():
            raise AlignError(f"{final} already exists; not overwritten")
    identities = [identity_of(f.image, landmark_file, f.line) for f in faces]
    names = sorted(set(identities))
    label_of = {name: i for i, name in enumerate(names)}
    order = sorted(range(len(faces)), key=lambda i: (label_of[identities[i]], i))
    jobs = [(faces[i].image, faces[i].landmarks, faces[i].line) for i in order]
    labels = [label_of[identities[i]] for i in order]
    tasks = [(str(root), c, quality) for c in _chunks(jobs, chunk)]
    tmp_prefix = prefix.with_name(f".{prefix.name}.tmp{os.getpid()}")
    warnings: list[tuple[int, str]] = []
    rec.parent.mkdir(parents=True, exist_ok=True)
    pool = _pool(workers)

    def items():
        encoded = (e for es in _map(pool, _task_encode, tasks) for e in es)
        for (data, line, off), label in zip(encoded, labels, strict=True):
            if off:
                warnings.append((line, off))
            yield data, label

    try:
        summary = pack_records(tmp_prefix, items(), quality=quality, image_size=None)
        tmp_names = tmp_prefix.with_name(tmp_prefix.name + ".identities.txt")
        tmp_names.write_text("".join(f"{i}\t{n}\n" for i, n in enumerate(names)))
        for tmp, final in zip((summary.rec, summary.idx, tmp_names), finals, strict=True):
            publish(tmp, final)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        for leftover in tmp_prefix.parent.glob(tmp_prefix.name + ".*"):
            leftover.unlink(missing_ok=True)
    return warnings, summary.num_images, summary.num_classes


def report_outside(warnings: list[tuple[int, str]], landmark_file: Path, prog: str) -> None:
    """One stderr line per face aligned from landmarks outside its image (the first 10)."""
    for line, image in warnings[:10]:
        print(
            f"{prog}: warning: {landmark_file}:{line}: landmarks outside {image}; aligned anyway",
            file=sys.stderr,
        )
    if len(warnings) > 10:
        print(f"{prog}: warning: {len(warnings) - 10} more faces like it", file=sys.stderr)


# --- Detection: from raw photos ---------------------------------------------------------

FIX_IMAGE = "remove or convert it, then run again"
LANDMARK_HEADER = "# image x1 y1 ... x5 y5 score (python -m jaxface.align --detect, MTCNN)\n"


@dataclass
class Detected:
    faces: list[Face]  # Face.line: its line in the landmark file (line 1 is the header)
    lines: list[str]  # the landmark file
    no_face: list[str]  # photos without a face at the threshold
    several: int  # photos with more than one face


def detect_photos(
    root: Path,
    photos: Sequence[str],
    all_faces: bool,
    threshold: float,
    min_face: int,
    max_side: int,
    say: Callable[[str], None] = print,
) -> Detected:
    """Detect the faces of each photo: the largest one, or all with `all_faces`."""
    found = Detected([], [LANDMARK_HEADER], [], 0)
    start = last = time.monotonic()
    for done, photo in enumerate(photos, 1):
        try:
            bgr = read_bgr(root / photo)
        except AlignError as exc:
            raise AlignError(f"{exc}; {FIX_IMAGE}") from None
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        faces = detect.detect(rgb, threshold, min_face, max_side)
        if not faces:
            found.no_face.append(photo)
        found.several += len(faces) > 1
        for face in faces if all_faces else faces[:1]:
            # Rounded to what the landmark file holds, so that aligning from that file
            # (--landmarks) gives these crops byte for byte.
            text = " ".join(f"{v:.2f}" for v in face.landmarks.ravel())
            points = np.array(text.split(), np.float32).reshape(5, 2)
            found.faces.append(Face(photo, points, len(found.lines) + 1))
            found.lines.append(f"{photo} {text} {face.score:.4f}\n")
        now = time.monotonic()
        if now - last >= 10 and done < len(photos):
            per_photo = (now - start) / done
            say(
                f"detected faces in {done:,} of {len(photos):,} images "
                f"({1 / per_photo:.1f}/s, {format_duration(per_photo * (len(photos) - done))} left)"
            )
            last = now
    return found


def _count(n: int, word: str) -> str:
    plural = word[:-1] + "ies" if word.endswith("y") else word + "s"
    return f"{n:,} {word if n == 1 else plural}"


def detect_reports(out: Path) -> tuple[Path, Path]:
    """Where --detect writes its landmark file and its list of images without a face."""
    if out.suffix == ".rec":
        prefix = out.with_suffix("")
        return (
            prefix.with_name(prefix.name + ".landmarks.txt"),
            prefix.with_name(prefix.name + ".no_face.txt"),
        )
    return out / "landmarks.txt", out / "no_face.txt"


def write_text(final: Path, text: str) -> None:
    tmp = _tmp_name(final)
    tmp.write_text(text)
    publish(tmp, final)


def _main_detect(args: argparse.Namespace, root: Path, out: Path, prog: str) -> int:
    args.threshold = detect.DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    args.min_face = detect.DEFAULT_MIN_FACE if args.min_face is None else args.min_face
    args.max_side = detect.DEFAULT_MAX_SIDE if args.max_side is None else args.max_side
    if not 0.0 <= args.threshold <= 1.0:
        raise AlignError(f"--threshold {args.threshold}: a face score is between 0 and 1")
    if args.min_face < 12 or args.max_side < args.min_face:
        raise AlignError(
            f"--min-face {args.min_face} --max-side {args.max_side}: MTCNN needs "
            "12 <= --min-face <= --max-side"
        )
    if os.path.realpath(out) == os.path.realpath(root):
        raise AlignError(f"{out}: the output must not be the photo folder itself")
    reports = detect_reports(out)
    for report in reports:
        if report.exists():
            raise AlignError(f"{report} already exists; not overwritten (choose another output)")
    photos, others = detect.list_photos(root, skip=out)
    if not photos:
        raise AlignError(
            f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in it or its sub-folders"
        )
    if out.suffix == ".rec":
        for photo in photos:
            if len(Path(photo).parts) < 2:
                raise AlignError(
                    f"{root / photo} has no identity folder; RecordIO output needs "
                    "PHOTOS/IDENTITY/FILE (or write an image folder: an output without .rec)"
                )
    for photo in photos:
        # The file's signature only, so that a file that is no image at all stops the run
        # before hours of detection rather than after; a truncated one is found when read.
        if not cv2.haveImageReader(str(root / photo)):
            raise AlignError(f"{root / photo}: not a readable image; {FIX_IMAGE}")
    print(f"loading the face detector (MTCNN on TensorFlow) for {_count(len(photos), 'image')}")
    detect.load()
    found = detect_photos(
        root, photos, args.all_faces, args.threshold, args.min_face, args.max_side
    )
    kept = "every face" if args.all_faces else "the largest of each"
    if not found.faces:
        raise AlignError(
            f"{root}: no face scoring {args.threshold:.2f} or more in its "
            f"{_count(len(photos), 'image')}; nothing written (a lower --threshold finds more)"
        )
    landmark_file, no_face_file = reports
    if out.suffix == ".rec":
        warnings, _, classes = align_to_rec(
            root, found.faces, out, landmark_file, args.quality, args.workers
        )
        done = f"{_count(len(found.faces), 'face')} of {_count(classes, 'identity')}"
    else:
        warnings = align_to_folder(
            root, found.faces, out, "." + args.format, args.quality, args.workers
        )
        done = _count(len(found.faces), "face")
    write_text(landmark_file, "".join(found.lines))
    if found.no_face:
        write_text(no_face_file, "".join(p + "\n" for p in found.no_face))
    report_outside(warnings, landmark_file, prog)
    with_face = len(photos) - len(found.no_face)
    print(f"{done} ({kept}) from {with_face:,} of {_count(len(photos), 'image')} -> {out}")
    if found.several and not args.all_faces:
        print(f"{_count(found.several, 'image')} held more than one face: --all-faces keeps all")
    if found.no_face:
        print(
            f"no face scoring {args.threshold:.2f} or more in "
            f"{_count(len(found.no_face), 'image')}, listed in {no_face_file}:"
        )
        for photo in found.no_face[:10]:
            print(f"  {photo}")
        if len(found.no_face) > 10:
            print(f"  ... and {len(found.no_face) - 10:,} more")
    if others:
        print(f"left out {_count(others, 'other file')} (images: {', '.join(IMAGE_EXTENSIONS)})")
    print(f"landmarks (image x1 y1 ... x5 y5 score): {landmark_file}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run("jaxface.align", _main, argv, ((AlignError, 2), (detect.DetectorMissing, 2)))


def _main(argv: list[str]) -> int:
    prog = "jaxface.align"
    parser = argparse.ArgumentParser(
        prog="python -m jaxface.align", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--root", help="folder the image paths are relative to (or PHOTOS)")
    parser.add_argument("--landmarks", help="lines 'image x1 y1 ... x5 y5'")
    parser.add_argument("--out", help="output folder, or FILE.rec for RecordIO (or OUT)")
    parser.add_argument("photos", nargs="?", metavar="PHOTOS", help="the same as --root")
    parser.add_argument("out_pos", nargs="?", metavar="OUT", help="the same as --out")
    detection = parser.add_argument_group("face detection, instead of --landmarks")
    detection.add_argument(
        "--detect", action="store_true", help="find faces and landmarks in every image (MTCNN)"
    )
    detection.add_argument(
        "--all-faces", action="store_true", help="every face of an image, not only the largest"
    )
    detection.add_argument(
        "--threshold", type=float, help=f"lowest face score ({detect.DEFAULT_THRESHOLD})"
    )
    detection.add_argument(
        "--min-face", type=int, help=f"pixels, at --max-side ({detect.DEFAULT_MIN_FACE})"
    )
    detection.add_argument(
        "--max-side",
        type=int,
        help=f"images are searched at most this large (longer side, {detect.DEFAULT_MAX_SIDE})",
    )
    parser.add_argument("--format", choices=("jpg", "png"), default="jpg", help="folder output")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--debug", action="store_true", help="tracebacks on errors (jaxface.cli)")
    args = parser.parse_args(argv)
    for flag, value, pos in (("--root", args.root, args.photos), ("--out", args.out, args.out_pos)):
        if value is not None and pos is not None:
            parser.error(f"{flag} {value} and {pos}: give it once")
    root_arg, out_arg = args.root or args.photos, args.out or args.out_pos
    if root_arg is None or out_arg is None:
        parser.error("give the photos (--root or PHOTOS) and the output (--out or OUT)")
    if args.detect == (args.landmarks is not None):
        parser.error("give either --landmarks FILE or --detect")
    root, out = Path(root_arg), Path(out_arg)
    if not root.is_dir():
        reason = "not a folder" if root.exists() else "no such folder"
        raise AlignError(f"{root}: {reason} (the photos: --root or PHOTOS)")
    if args.detect:
        return _main_detect(args, root, out, prog)
    detect_only = {
        "--all-faces": args.all_faces or None,
        "--threshold": args.threshold,
        "--min-face": args.min_face,
        "--max-side": args.max_side,
    }
    for flag, value in detect_only.items():
        if value is not None:
            parser.error(f"{flag} is for --detect; --landmarks gives the faces")
    landmark_file = Path(args.landmarks)
    faces = read_landmarks(landmark_file)
    _check_inputs(root, faces, landmark_file)
    if out.suffix == ".rec":
        warnings, images, classes = align_to_rec(
            root, faces, out, landmark_file, args.quality, args.workers
        )
        done = f"{images:,} faces of {classes:,} identities -> {out}"
    else:
        warnings = align_to_folder(root, faces, out, "." + args.format, args.quality, args.workers)
        done = f"{len(faces):,} faces -> {out}"
    report_outside(warnings, landmark_file, prog)
    print(done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
