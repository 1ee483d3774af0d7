"""IResNet-50, CurricularFace (HuangYG123/CurricularFace head/metrics.py: m 0.5, s 64) on
MS1MV2 (faces_emore), global batch 512, SGD lr 0.1. Schedule: jaxface's polynomial decay."""

from configs.base import get_config as base_config


def get_config() -> dict:
    return base_config() | dict(
        network="r50",
        loss="curricularface",
        curricular_m=0.5,
        scale=64.0,
        margin_grad="exact",  # the official code differentiates cos(theta + m)
        precision="bf16",
        optimizer="sgd",
        lr=0.1,
        global_batch_size=512,
        rec="/data/faces_emore",  # fill in: the folder with train.rec and train.idx
        num_classes=85_742,
        num_image=5_822_653,
        num_epoch=24,
        warmup_epoch=0,
        val_targets=("lfw", "cfp_fp", "agedb_30"),
        output="work_dirs/ms1mv2_r50_curricularface",
    )
