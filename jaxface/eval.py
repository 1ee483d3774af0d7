"""python -m jaxface.eval --weights W --network r50 --bin lfw.bin [more.bin ...]

W is a run folder of jaxface.train, its `backbone.npz`, a checkpoint folder
(`RUN/checkpoints/STEP`), or an arcface_torch / torchref `model.pt`. Prints the 10-fold
verification accuracy of each set.
Exit status: 0 done, 1 unusable weights or set, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


class WeightsError(ValueError):
    """Weights that cannot be loaded; the message names the file and why."""


def load_backbone(weights: str | Path, network: str | None = None) -> tuple[dict, dict, dict]:
    """(params, batch_stats, info) from a run folder, .npz, .pt or checkpoint folder."""
    from jaxface.convert import ConvertError
    from jaxface.convert import load_backbone as load_file
    from jaxface.export import NPZ_NAME

    path = Path(weights)
    if path.is_dir() and (path / NPZ_NAME).is_file():
        path = path / NPZ_NAME
    if path.is_dir() and (path / "state").is_dir():
        return _from_checkpoint(path)
    if path.is_file():
        try:
            params, stats, found = load_file(path, network)
        except ConvertError as exc:
            raise WeightsError(str(exc)) from None
        return params, stats, {"network": found}
    raise WeightsError(
        f"{path}: expected a jaxface run folder, a backbone.npz, a checkpoint folder "
        "(RUN/checkpoints/STEP) or a torch model.pt"
    )


def _from_checkpoint(step_dir: Path) -> tuple[dict, dict, dict]:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    state_dir = step_dir.absolute() / "state"
    try:
        # As host numpy arrays: the devices here need not match the ones that saved it.
        meta = checkpointer.metadata(state_dir)
        # The metadata object's shape differs between orbax releases.
        meta = getattr(meta, "item_metadata", meta)
        tree = getattr(meta, "tree", meta)
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        state = checkpointer.restore(state_dir, restore_args=as_numpy)
        meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir.absolute() / "meta")
    except Exception as exc:  # noqa: BLE001 - orbax raises many types for a bad folder
        raise WeightsError(
            f"{step_dir}: cannot be restored as a jaxface checkpoint: {exc}"
        ) from None
    cfg = meta.get("config", {})
    info = {"network": cfg.get("network"), "embedding_size": cfg.get("embedding_size")}
    return state["params"]["backbone"], state["batch_stats"], info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxface.eval", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--weights", required=True)
    parser.add_argument("--network", help="backbone name; read from the weights if omitted")
    parser.add_argument("--embedding-size", type=int, default=None)
    parser.add_argument("--bin", nargs="+", required=True, help="verification .bin files")
    parser.add_argument("--batch", type=int, default=64, help="images per device per call")
    args = parser.parse_args(argv)

    import jax

    from jaxface.convert import embedding_size_of_params
    from jaxface.data.verification import VerificationSetError
    from jaxface.mesh import make_mesh
    from jaxface.models import NETWORKS, get_model
    from jaxface.step import make_embed_fn
    from jaxface.verify import Verifier, format_result

    try:
        params, batch_stats, info = load_backbone(args.weights, args.network)
    except WeightsError as exc:
        print(f"jaxface.eval: error: {exc}", file=sys.stderr)
        return 1
    network = args.network or info.get("network")
    if network not in NETWORKS:
        print(f"jaxface.eval: error: unknown backbone {network!r}; choose one of "
              f"{', '.join(NETWORKS)}", file=sys.stderr)  # fmt: skip
        return 2
    if info.get("network") and info["network"] != network:
        print(f"jaxface.eval: error: {args.weights} holds a {info['network']}, not a {network}",
              file=sys.stderr)  # fmt: skip
        return 1
    embedding_size = args.embedding_size or embedding_size_of_params(params)
    model = get_model(network, embedding_size=embedding_size)
    mesh = make_mesh()
    try:
        verifier = Verifier(
            [Path(p) for p in args.bin], mesh, jax.jit(make_embed_fn(model)), args.batch * mesh.size
        )
        results = verifier.run(params, batch_stats)
    except VerificationSetError as exc:
        print(f"jaxface.eval: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, TypeError) as exc:
        print(f"jaxface.eval: error: weights do not fit a {network}: {exc}", file=sys.stderr)
        return 1
    for name, (result, best) in results.items():
        print(format_result(name, 0, result, best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
