"""IResNet-34, ArcFace on WebFace12M (WebFace600K identities), 128 images per device."""

from configs.base import get_config as base_config


def get_config() -> dict:
    return base_config() | dict(
        network="r34",
        margin_list=(1.0, 0.5, 0.0),
        precision="bf16",
        optimizer="sgd",
        lr=0.1,
        batch_size=128,
        rec="/data/WebFace12M",  # fill in: the folder with train.rec and train.idx
        num_classes=617_970,
        num_image=12_720_066,
        num_epoch=20,
        warmup_epoch=0,
        val_targets=("lfw", "cfp_fp", "agedb_30"),
        output="work_dirs/wf12m_r34",
    )
