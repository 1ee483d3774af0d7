"""python -m jaxface.ijb --weights W --network N --root ROOT --target IJBC|IJBB --out OUT

IJB-B / IJB-C 1:1 verification (TAR at FAR 1e-6 ... 1e-1) and, for IJB-C (IJB-B) when
ROOT/meta has the 1:N CSVs, 1:N identification (rank-1/5/10, TPIR at FPIR 0.01 / 0.1), by
the protocol of InsightFace's eval_ijbc.py and ijb_1n.py. W: a jaxface run folder, a
backbone.npz, a checkpoint folder or an arcface_torch model.pt.

Writes OUT/<t>.npy (one float64 score per pair, pair-file order), OUT/<t>.md and
OUT/<t>.json (the tables), OUT/<t>_roc.png, and the feature cache OUT/features.npy,
OUT/faceness.npy, OUT/features.json. A second run with the same weights, root and target
reuses the cache (only the protocol switches may change); without --weights it rescores
the cache. Exit status: 0 done, 1 failed run, 2 bad input (named with file and line).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from jaxface import cli
from jaxface.ijb import features as feat
from jaxface.ijb.meta import TARGETS, IJBInputError, IJBMeta, read_meta
from jaxface.ijb.metrics import MateError, identification, verification
from jaxface.ijb.protocol import Switches, scores_from_features, template_index
from jaxface.ijb.report import (
    identification_table,
    save_json,
    save_npy,
    save_roc_png,
    save_text,
    verification_table,
)
from jaxface.mesh import MeshError, make_mesh

PROG = "jaxface.ijb"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[1])
    p.add_argument("--weights", help="run folder, .npz, checkpoint folder or model.pt; "
                   "omitted: rescore the features cached in --out")  # fmt: skip
    p.add_argument("--network", help="backbone (r50, r100, ...); read from the weights if omitted")
    p.add_argument("--root", required=True, help="folder holding loose_crop/ and meta/")
    p.add_argument("--target", default="IJBC", type=str.upper, choices=TARGETS)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch", type=int, default=128, help="faces per device per call")
    p.add_argument("--devices", type=int, default=None, help="first N devices (default all)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                   help="alignment processes (0: in this process)")  # fmt: skip
    p.add_argument("--prefetch", type=int, default=2, help="batches aligned ahead")
    p.add_argument("--tf32", action="store_true",
                   help="TF32 float32 convolutions on GPUs that have them (faster; as torch's "
                   "cuDNN default); full float32 otherwise")  # fmt: skip
    p.add_argument("--no-flip", action="store_true", help="image embedding only (F1 off)")
    p.add_argument("--no-norm-score", action="store_true",
                   help="L2-normalise each image's embedding (N1 off)")  # fmt: skip
    p.add_argument("--no-detector-score", action="store_true",
                   help="do not weigh images by their faceness score (D1 off)")  # fmt: skip
    p.add_argument("--identification", choices=("auto", "on", "off"), default="auto",
                   help="1:N: auto runs it when the 1:N CSVs are in ROOT/meta")  # fmt: skip
    p.add_argument("--recompute", action="store_true",
                   help="embed again, replacing a cache of other weights in --out")  # fmt: skip
    p.add_argument("--name", default=None, help="row label in the tables (default: OUT's name)")
    p.add_argument("--progress", choices=("auto", "bar", "plain", "none"), default="auto")
    p.add_argument("--debug", action="store_true", help="tracebacks on errors (jaxface.cli)")
    return p


def _check_images(meta: IJBMeta) -> None:
    for image, line in zip(meta.images, meta.lines, strict=True):
        if not (meta.image_dir / image).is_file():
            raise IJBInputError(
                f"{meta.image_dir / image}: no such file (wanted by "
                f"{meta.files['landmarks']}:{line})"
            )


def embeddings(args, meta: IJBMeta, out: Path) -> tuple[np.ndarray, str]:
    """Raw [N, 2E] embeddings from the cache or a fresh pass; and where they came from."""
    cached = feat.read_cache(out)
    if args.weights is None:
        if cached is None:
            raise IJBInputError(f"{out} holds no cached features; pass --weights to embed")
        key, path = cached
        data = feat.data_key(meta)
        diff = feat.differences({k: key.get(k) for k in data}, data)
        if diff:
            raise IJBInputError(
                f"{path} was computed for another {', '.join(diff)}; pass --weights to embed"
            )
        weights = str(key.get("weights_sha256", "?"))[:12]
        return np.load(path), f"cached features {path} (weights sha256 {weights}...)"
    backbone = feat.load_weights(args.weights, args.network)
    key = feat.cache_key(meta, backbone, args.tf32)
    if cached is not None and not args.recompute:
        diff = feat.differences(cached[0], key)
        if not diff:
            return np.load(cached[1]), f"cached features {cached[1]} (same weights and data)"
        raise IJBInputError(
            f"{cached[1]} holds features of another {', '.join(diff)}; choose another --out "
            "or pass --recompute to replace them"
        )
    _check_images(meta)
    try:
        mesh = make_mesh(args.devices)
    except MeshError as exc:
        raise IJBInputError(str(exc).replace("config key 'num_devices'", "--devices")) from None
    embedder = feat.Embedder(backbone, mesh, args.batch, args.tf32)
    print(
        f"{PROG}: {backbone.network} (embedding {backbone.embedding_size}) on {mesh.size} "
        f"{mesh.devices.flat[0].platform} device(s), batch {embedder.batch} (+ flips), "
        f"{args.workers} alignment workers, {len(meta.images):,} faces",
        flush=True,
    )
    start = time.perf_counter()
    raw, outside = feat.embed_faces(meta, embedder, args.workers, args.prefetch, args.progress)
    seconds = time.perf_counter() - start
    for line, path in outside[:10]:
        print(f"{PROG}: warning: {meta.files['landmarks']}:{line}: landmarks outside {path}; "
              "aligned anyway", file=sys.stderr)  # fmt: skip
    if len(outside) > 10:
        print(f"{PROG}: warning: {len(outside) - 10} more faces like it", file=sys.stderr)
    feat.write_cache(out, key, raw, meta.faceness)
    rate = len(raw) / seconds
    return (
        raw,
        f"embedded in {seconds:.1f} s ({rate:,.0f} faces/s, compilation included), cached in {out}",
    )


def run(args) -> int:
    if args.batch < 1 or args.workers < 0 or args.prefetch < 0:
        raise IJBInputError("--batch must be >= 1, --workers and --prefetch >= 0")
    out = Path(args.out)
    meta = read_meta(args.root, args.target, args.identification)
    out.mkdir(parents=True, exist_ok=True)
    switches = Switches(not args.no_flip, not args.no_norm_score, not args.no_detector_score)
    raw, source = embeddings(args, meta, out)
    print(f"{PROG}: {source}", flush=True)
    scores, unique, tfeats = scores_from_features(
        raw, meta.faceness, meta.templates, meta.medias, meta.pairs, switches
    )
    t = meta.target.lower()
    save_npy(out / f"{t}.npy", scores)
    name = args.name or out.resolve().name
    result = verification(meta.labels, scores)
    text = [verification_table(name, meta.target, result)]
    record = {
        "target": meta.target,
        "name": name,
        "weights": args.weights,
        "switches": vars(switches),
        "faces": len(meta.images),
        "templates": len(unique),
        "pairs": len(scores),
        "positives": result.positives,
        "negatives": result.negatives,
        "tar_at_far": {f"{k:g}": v for k, v in result.tar.items()},
        "auc": result.auc,
    }
    if meta.identification is not None:
        one_n = identify(meta, unique, tfeats)
        text.append(identification_table(name, meta.target, one_n))
        record["identification"] = {
            "probes": one_n.probes,
            "gallery": one_n.gallery,
            "rank": {str(k): v for k, v in one_n.rank.items()},
            "tpir_at_fpir": {f"{k:g}": v for k, v in one_n.tpir.items()},
            "thresholds": {f"{k:g}": v for k, v in one_n.thresholds.items()},
        }
    table = "\n\n".join(text) + "\n"
    print(table, end="")
    save_text(out / f"{t}.md", table)
    save_json(out / f"{t}.json", record)
    save_roc_png(out / f"{t}_roc.png", name, meta.target, result)
    print(f"{PROG}: scores, tables and ROC in {out}/{t}.npy, .md, .json, _roc.png")
    return 0


def identify(meta: IJBMeta, unique: np.ndarray, tfeats: np.ndarray):
    """ijb_1n.py's gallery (G1 + G2 templates, subject of each template's first row) and
    mixed probes, scored on the same template features as the 1:1 protocol."""
    ident = meta.identification

    def templates_of(templates, subjects):
        ids, first = np.unique(templates, return_index=True)
        return tfeats[template_index(unique, ids)], subjects[first]

    g_templates = np.concatenate([g[1] for g in ident.galleries])
    g_subjects = np.concatenate([g[2] for g in ident.galleries])
    gallery, gallery_subjects = templates_of(g_templates, g_subjects)
    probe_path, p_templates, p_subjects, p_lines = ident.probe
    probes, probe_subjects = templates_of(p_templates, p_subjects)
    try:
        return identification(probes, probe_subjects, gallery, gallery_subjects)
    except MateError as exc:
        line = p_lines[int(np.flatnonzero(p_subjects == exc.subject)[0])]
        raise IJBInputError(f"{probe_path}:{line}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    # jaxface.cli: one line, exit 2 for bad input, 1 for a failed run, --debug for tracebacks.
    return cli.run(PROG, lambda args: run(build_parser().parse_args(args)), argv,
                   ((IJBInputError, 2),))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
