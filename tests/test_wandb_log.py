"""Weights & Biases logging (offline): the id kept for resumes, the records sent."""

import pytest

from jaxface.config import load_config
from jaxface.wandb_log import ID_FILE, WandbLog

wandb = pytest.importorskip("wandb")


def test_a_resume_continues_the_same_wandb_run_and_a_fresh_start_does_not(repo, tmp_path):
    cfg = load_config(repo / "configs/demo.py", {"wandb": "true", "wandb_mode": "offline",
                                                 "wandb_name": "tiny"})  # fmt: skip
    said = []
    first = WandbLog(cfg, tmp_path, resuming=False, say=said.append)
    first.log({"step": 1, "loss": 2.5, "lr": 0.1, "event": "train", "nan": float("nan")}, "train")
    first.close()
    run_id = (tmp_path / ID_FILE).read_text()
    assert first.run.id == run_id and first.run.name == "tiny"
    assert said == [f"W&B run tiny ({run_id}): offline in {tmp_path / 'wandb'} (upload later "
                    "with `wandb sync`)"]  # fmt: skip
    resumed = WandbLog(cfg, tmp_path, resuming=True, say=said.append)
    resumed.close()
    assert resumed.run.id == run_id
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1
    fresh = WandbLog(cfg, tmp_path, resuming=False, say=said.append)
    fresh.close()
    assert fresh.run.id != run_id and (tmp_path / ID_FILE).read_text() == fresh.run.id
