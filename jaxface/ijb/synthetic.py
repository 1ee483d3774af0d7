"""A synthetic IJB layout for tests, the benchmark and a dry run of the IJB evaluation:
InsightFace's file formats, faces from jaxface.data.synthetic placed in larger 'loose crops'
by a random similarity transform whose image of ArcFace's template is written as the five
landmarks.

    python -m jaxface.ijb.synthetic OUT [--target IJBC|IJBB] [--subjects 6]
        [--templates-per-subject 4] [--seed 0]

writes OUT/loose_crop and OUT/meta as IJB_release/IJBC does (OUT must not exist; it is
written under a temporary name and renamed when complete), for
`python -m jaxface.ijb --root OUT --target IJBC ...`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from jaxface import cli
from jaxface.align import ARCFACE_TEMPLATE, IMAGE_SIZE
from jaxface.data.synthetic import SyntheticFaces
from jaxface.ijb.meta import TARGETS, meta_files


@dataclass(frozen=True)
class Layout:
    root: Path
    faces: int
    templates: int
    pairs: int
    subjects: np.ndarray  # subject of each template, in template-id order (ids 1 ..)


def loose_crop(
    aligned_rgb: np.ndarray, rng: np.random.Generator, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(BGR image of `size` (w, h) holding the face, its five landmarks [5, 2])."""
    width, height = size
    scale = rng.uniform(0.9, 1.4)
    angle = np.deg2rad(rng.uniform(-15, 15))
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = np.array([width / 2, height / 2]) + rng.uniform(-8, 8, 2)
    shift = centre - rot @ np.array([IMAGE_SIZE / 2, IMAGE_SIZE / 2])
    forward = np.hstack([rot, shift[:, None]])
    bgr = cv2.cvtColor(aligned_rgb, cv2.COLOR_RGB2BGR)
    image = cv2.warpAffine(bgr, forward, (width, height), borderMode=cv2.BORDER_REFLECT)
    landmarks = ARCFACE_TEMPLATE.astype(np.float64) @ rot.T + shift
    return image, landmarks


def write_layout(
    root: str | Path,
    target: str = "IJBC",
    subjects: int = 6,
    templates_per_subject: int = 4,
    seed: int = 0,
    size: tuple[int, int] = (150, 130),
    max_media: int = 3,
    max_images: int = 3,
    identification: bool = True,
) -> Layout:
    """Write ROOT/loose_crop and ROOT/meta for `target`; every template pair is listed."""
    root = Path(root)
    (root / "loose_crop").mkdir(parents=True, exist_ok=True)
    (root / "meta").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    faces = SyntheticFaces(subjects, seed=seed, noise=0.15, jitter=2)
    landmark_lines, face_lines, members = [], [], {}
    template_subject = []
    media_id = 100
    for subject in range(subjects):
        for _ in range(templates_per_subject):
            template = len(template_subject) + 1
            template_subject.append(subject)
            members[template] = []
            for _ in range(int(rng.integers(1, max_media + 1))):
                media_id += 1
                for _ in range(int(rng.integers(1, max_images + 1))):
                    number = len(face_lines) + 1
                    name = f"{number}.jpg"
                    aligned = faces.image(subject, number)
                    image, points = loose_crop(aligned, rng, size)
                    cv2.imwrite(str(root / "loose_crop" / name), image)
                    score = rng.uniform(0.3, 1.0)
                    coords = " ".join(f"{v:.3f}" for v in points.ravel())
                    landmark_lines.append(f"{name} {coords} {score:.6f}")
                    face_lines.append(f"{name} {template} {media_id}")
                    members[template].append(name)
    files = meta_files(root, target)
    files["landmarks"].write_text("\n".join(landmark_lines) + "\n")
    files["faces"].write_text("\n".join(face_lines) + "\n")
    count = len(template_subject)
    pairs = [
        f"{a} {b} {int(template_subject[a - 1] == template_subject[b - 1])}"
        for a in range(1, count + 1)
        for b in range(a + 1, count + 1)
    ]
    files["pairs"].write_text("\n".join(pairs) + "\n")
    if identification:
        header = "TEMPLATE_ID,SUBJECT_ID,FILENAME\n"
        rows = {"gallery1": [], "gallery2": [], "probe": []}
        first_template = {}
        for template, subject in enumerate(template_subject, 1):
            if subject not in first_template:
                first_template[subject] = template
                kind = "gallery1" if subject % 2 == 0 else "gallery2"
            else:
                kind = "probe"
            # Subject ids offset so they differ from template ids and row order.
            rows[kind] += [f"{template},{1000 + subject},{n}" for n in members[template]]
        for kind, lines in rows.items():
            files[kind].write_text(header + "\n".join(lines) + "\n")
    return Layout(root, len(face_lines), count, len(pairs), np.asarray(template_subject))


PROG = "python -m jaxface.ijb.synthetic"


def _write_new(args) -> int:
    out = Path(args.out)
    if out.exists():
        raise FileExistsError(f"{out} exists; give a new folder (nothing was written)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        layout = write_layout(tmp, args.target, args.subjects, args.templates_per_subject,
                              args.seed)  # fmt: skip
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(
        f"{out}: synthetic {args.target}, {args.subjects} subjects, {layout.templates} "
        f"templates, {layout.faces} images, {layout.pairs} pairs; evaluate with "
        f"python -m jaxface.ijb --root {out} --target {args.target} --weights RUN --out DIR"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the folder to create (must not exist)")
    p.add_argument("--target", default="IJBC", type=str.upper, choices=TARGETS)
    p.add_argument("--subjects", type=int, default=6, help="identities (default 6)")
    p.add_argument("--templates-per-subject", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    def body(args):
        parsed = build_parser().parse_args(args)
        if parsed.subjects < 2 or parsed.templates_per_subject < 2:
            raise ValueError("--subjects and --templates-per-subject must be >= 2")
        return _write_new(parsed)

    return cli.run(PROG, body, argv, ((ValueError, 2),))


if __name__ == "__main__":
    sys.exit(main())
