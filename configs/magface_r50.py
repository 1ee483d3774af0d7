"""IResNet-50, MagFace as IrvingMeng/MagFace run/run_dist.sh trains it on MS1M: l_a 10,
u_a 110, l_m 0.45, u_m 0.8, lambda_g 35, s 64, batch 512, 25 epochs, lr 0.1, momentum 0.9,
weight decay 5e-4, fp32. Schedule: jaxface's polynomial decay (MagFace: x0.1 at epochs
10, 18, 22)."""

from configs.base import get_config as base_config


def get_config() -> dict:
    return base_config() | dict(
        network="r50",
        loss="magface",
        magface_l_a=10.0,
        magface_u_a=110.0,
        magface_l_m=0.45,
        magface_u_m=0.8,
        magface_lambda_g=35.0,
        scale=64.0,
        margin_grad="exact",  # MagFace's margin gradient, cosine and norm, as its autograd
        precision="fp32",
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        global_batch_size=512,
        rec="/data/faces_emore",  # fill in: the folder with train.rec and train.idx
        num_classes=85_742,
        num_image=5_822_653,
        num_epoch=25,
        warmup_epoch=0,
        val_targets=("lfw", "cfp_fp", "agedb_30"),
        output="work_dirs/ms1mv2_r50_magface",
    )
