"""IResNet-50, ElasticFace-Arc as fdbtrs/ElasticFace config/config.py sets it for
MS1MV2 (emoreIresNet): s 64, m 0.5, std 0.05, 128 images per GPU, lr 0.1, momentum 0.9,
weight decay 5e-4, 26 epochs. m and std are left unset so that the loss's official values
apply: --config.elastic_plus=true gives ElasticFace-Arc+ (std 0.0175),
--config.loss=elasticface_cos ElasticFace-Cos (m 0.35, std 0.05; with plus 0.02).
Schedule: jaxface's polynomial decay (ElasticFace: x0.1 at epochs 8, 14, 20, 25)."""

from configs.base import get_config as base_config


def get_config() -> dict:
    return base_config() | dict(
        network="r50",
        loss="elasticface_arc",
        elastic_plus=False,
        scale=64.0,
        margin_grad="exact",  # the official code differentiates through acos/cos
        precision="bf16",
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        batch_size=128,
        rec="/data/faces_emore",  # fill in: the folder with train.rec and train.idx
        num_classes=85_742,
        num_image=5_822_653,
        num_epoch=26,
        warmup_epoch=0,
        val_targets=("lfw", "cfp_fp", "agedb_30"),
        output="work_dirs/ms1mv2_r50_elasticface",
    )
