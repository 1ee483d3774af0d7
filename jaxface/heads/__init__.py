"""The class-sharded margin-softmax head (Partial FC) and its margins."""

from jaxface.heads.losses import (
    AdaFace,
    CurricularFace,
    ElasticFace,
    MagFace,
    PerSampleLoss,
    loss_from_config,
)
from jaxface.heads.margins import Margin, margin_from_config
from jaxface.heads.partial_fc import (
    gather_rows,
    init_class_centres,
    partial_fc_loss,
    partial_fc_loss_and_state,
    sample_class_ids,
)

__all__ = [
    "AdaFace",
    "CurricularFace",
    "ElasticFace",
    "MagFace",
    "Margin",
    "PerSampleLoss",
    "gather_rows",
    "init_class_centres",
    "loss_from_config",
    "margin_from_config",
    "partial_fc_loss",
    "partial_fc_loss_and_state",
    "sample_class_ids",
]
