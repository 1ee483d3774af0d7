"""MobileFaceNet on WebFace12M, CosFace, SGD; arcface_torch's configs/wf12m_mbf.py.

Differences: precision bf16 where arcface_torch says fp16 (same trunk/head split: conv_sep
and the GDC head stay float32); verification sets as configs/r50.py (arcface_torch: none).
"""

from configs.base import get_config as base_config


def get_config() -> dict:
    return base_config() | dict(
        network="mbf",
        embedding_size=512,
        margin_list=(1.0, 0.0, 0.4),
        sample_rate=1.0,
        interclass_filtering_threshold=0.0,
        precision="bf16",
        optimizer="sgd",
        lr=0.1,
        weight_decay=1e-4,
        batch_size=128,
        rec="/data/WebFace12M",  # fill in: the folder with train.rec and train.idx
        num_classes=617_970,
        num_image=12_720_066,
        num_epoch=20,
        warmup_epoch=0,
        val_targets=("lfw", "cfp_fp", "agedb_30"),
        output="work_dirs/wf12m_mbf",
    )
