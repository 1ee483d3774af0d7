"""IResNet-100, AdaFace on WebFace12M: the setting mk-minchul/AdaFace publishes (README's
training command and config.py defaults: m 0.4, h 0.333, s 64, t_alpha 0.01, batch 512,
26 epochs, lr 0.1, SGD momentum 0.9 with weight decay 5e-4 as train_val.py sets it, fp16,
crop / low-resolution / photometric augmentation each with probability 0.2).

Differences (docs/losses.md): jaxface's LR schedule is polynomial (AdaFace: steps x0.1 at
epochs 12, 20, 24); weight decay acts on every parameter (AdaFace exempts BatchNorm);
the norm statistics are the global batch's (AdaFace: rank 0's batch, via DDP's buffer
broadcast).
"""

from configs.base import get_config as base_config


def get_config() -> dict:
    return base_config() | dict(
        network="r100",
        loss="adaface",
        adaface_m=0.4,
        adaface_h=0.333,
        adaface_t_alpha=0.01,
        scale=64.0,
        margin_grad="exact",  # AdaFace differentiates its margin formula (autograd)
        precision="fp16",
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        global_batch_size=512,
        adaface_augment=True,
        crop_augmentation_prob=0.2,
        low_res_augmentation_prob=0.2,
        photometric_augmentation_prob=0.2,
        rec="/data/WebFace12M",  # fill in: the folder with train.rec and train.idx
        num_classes=617_970,
        num_image=12_720_066,
        num_epoch=26,
        warmup_epoch=0,
        val_targets=("lfw", "cfp_fp", "agedb_30"),
        output="work_dirs/wf12m_r100_adaface",
    )
