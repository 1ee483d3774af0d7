"""Weights & Biases logging beside TensorBoard (`--config.wandb=true`; off by default).

Every record the run writes to `metrics.jsonl` goes to W&B as `train/...` or
`val/NAME/...` at its step; the config is the run's config. The W&B run id is kept in
`OUTPUT/wandb-run-id`, so a resumed run continues the same W&B run. `wandb_mode=offline`
writes to `OUTPUT/wandb/` only (clusters without internet; `wandb sync` uploads later).
"""

from __future__ import annotations

import secrets
import string
from pathlib import Path

from jaxface.fileio import atomic_write

ID_FILE = "wandb-run-id"


class WandbLog:
    def __init__(self, cfg, out: Path, resuming: bool, say=print):
        # Imported here: wandb is an optional extra (config.py refuses wandb=true without it)
        # and takes a second to import, which no other run should pay.
        import wandb

        id_file = out / ID_FILE
        run_id = id_file.read_text().strip() if resuming and id_file.is_file() else None
        if run_id is None:
            # W&B's own form (8 of a-z0-9); its generator is not public API.
            run_id = "".join(
                secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8)
            )
            atomic_write(id_file, lambda f: f.write(run_id.encode()))
        self.run = wandb.init(
            project=cfg.wandb_project,
            entity=cfg.wandb_entity,
            name=cfg.wandb_name or out.name,
            id=run_id,
            resume="allow",
            dir=str(out),
            mode=cfg.wandb_mode,
            config=cfg.to_dict(),
            settings=wandb.Settings(silent=True),  # jaxface says what matters, in one line
        )
        where = (
            f"offline in {out / 'wandb'} (upload later with `wandb sync`)"
            if cfg.wandb_mode == "offline"
            else self.run.url
        )
        say(f"W&B run {self.run.name} ({run_id}): {where}")

    def log(self, record: dict, prefix: str) -> None:
        values = {
            f"{prefix}/{key}": value
            for key, value in record.items()
            if key != "step" and isinstance(value, int | float) and value == value
        }
        self.run.log(values, step=record["step"])

    def close(self) -> None:
        self.run.finish()
