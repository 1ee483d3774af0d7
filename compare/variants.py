"""What one row of the comparison runs: framework, flavour, precision column, batch.

Precision columns are the published tables' FP16 x TF32 pairs plus bf16:
fp32 (FP16 no, TF32 no), tf32 (no, yes), fp16 (yes, yes: arcface_torch's stock setting),
bf16 (bf16 autocast / compute dtype, TF32 yes for what stays float32).
PyTorch runs twice: `stock` is arcface_torch's own settings (NCHW, eager, autocast and
GradScaler under fp16), `tuned` adds channels_last (and torch.compile with
--torch-compile: on r50 it measured slower, docs/sources.md), so jaxface is compared with
the best PyTorch, not a strawman.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

FRAMEWORKS = ("jax", "torch")
PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
# column -> (compute precision, tf32 switch, the table's FP16 and TF32 cells)
COLUMNS = {
    "fp32": ("fp32", False, "no", "no"),
    "tf32": ("fp32", True, "no", "yes"),
    "fp16": ("fp16", True, "yes", "yes"),
    "bf16": ("bf16", True, "bf16", "yes"),
}
INSTALL = {
    "jax": "pip install -e .  (GPU: pip install -e '.[cuda]')",
    "torch": "pip install -e '.[torch]'  (the CPU build: pip install torch==2.13.0)",
}


@dataclass(frozen=True)
class Variant:
    framework: str  # jax | torch
    flavour: str  # jax | stock | tuned
    precision: str  # a column of COLUMNS
    batch: int  # per device

    @property
    def name(self) -> str:
        who = "jaxface" if self.framework == "jax" else f"torch {self.flavour}"
        return f"{who}, {self.precision}, batch {self.batch}"

    def to_dict(self) -> dict:
        return asdict(self)


def plan(frameworks, precisions, batches) -> list[Variant]:
    """Every row, grouped as the table shows them: batch, then precision, then framework."""
    rows = []
    for batch in batches:
        for precision in precisions:
            for framework in frameworks:
                flavours = ("jax",) if framework == "jax" else ("stock", "tuned")
                rows += [Variant(framework, f, precision, batch) for f in flavours]
    return rows
