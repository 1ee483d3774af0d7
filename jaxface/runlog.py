"""Run records: `metrics.jsonl` (always), TensorBoard events (when tensorboardX is there) and
Weights & Biases (when asked: jaxface.wandb_log)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path


class RunLog:
    """Appends one JSON record per line; mirrors numeric fields to TensorBoard scalars."""

    def __init__(
        self, out: Path, tensorboard: bool, append: bool, enabled: bool = True, wandb=None
    ):
        self.path = out / "metrics.jsonl"
        self._file = self.path.open("a" if append else "w") if enabled else None
        self._tb = None
        self._wandb = wandb if enabled else None  # a WandbLog, or None
        if tensorboard and enabled:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                warnings.warn(
                    "tensorboardX is not installed: TensorBoard logging is off "
                    "(pip install tensorboardX, or set --config.tensorboard=false)",
                    stacklevel=2,
                )
            else:
                self._tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, record: dict, prefix: str = "train") -> None:
        if self._file is None:  # not process 0
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and value == value:
                    self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])
        if self._wandb is not None and "step" in record:
            self._wandb.log(record, prefix)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()


def read_records(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a jaxface run folder?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
