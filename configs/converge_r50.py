"""python -m compare.converge on one GPU (compare/gpu_converge.sh): r50, 2,000 steps of 128,
jaxface bf16 against torchref fp16 with GradScaler, within about ten minutes on an H100 or
H200 (docs/converge.md).

The CPU setting's harder synthetic identities (noise 0.8, shift up to 12 pixels) at r50
scale: 10,000 identities of about 25 images each, drawn in memory by 8 loader processes.
"""

from configs.base import get_config as base_config


def get_config() -> dict:
    return base_config() | dict(
        network="r50",
        embedding_size=512,
        precision="bf16",  # compare.converge sets each run's own
        lr=0.1,
        warmup_epoch=0.1,
        batch_size=128,
        rec="synthetic",
        num_classes=10_000,
        num_image=128 * 2000,
        synthetic_noise=0.8,
        synthetic_jitter=12,
        num_workers=8,
        num_epoch=1,
        frequent=50,
        val_targets=("synthetic",),
        verbose=500,
        output="work_dirs/converge_r50",
    )
