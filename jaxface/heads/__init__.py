"""The class-sharded margin-softmax head (Partial FC) and its margins."""

from jaxface.heads.margins import Margin, margin_from_config
from jaxface.heads.partial_fc import (
    gather_rows,
    init_class_centres,
    partial_fc_loss,
    sample_class_ids,
)

__all__ = [
    "Margin",
    "gather_rows",
    "init_class_centres",
    "margin_from_config",
    "partial_fc_loss",
    "sample_class_ids",
]
