"""python -m compare.converge's CPU setting: jaxface and torchref side by side, fp32 and
jaxface bf16 against torchref fp16, in about five minutes on 2 idle CPU cores (docs/converge.md).

Harder than the demo, so that verification accuracy means something: 1,000 synthetic
identities of 3 to 4 training images each, drawn with more noise (0.8) and shift (up to 12
pixels) than the demo's; the held-out pairs end between 60 and 80 % after 100 steps
(docs/converge.md), depending on the seed and framework, well below 100 %.
One short epoch (100 steps of 32), drawn in memory by the loader (no packing).
"""

from configs.base import get_config as base_config


def get_config() -> dict:
    return base_config() | dict(
        network="iresnet_tiny",
        embedding_size=128,
        precision="fp32",  # compare.converge sets each run's own
        margin_list=(1.0, 0.5, 0.0),
        scale=32.0,
        lr=0.1,
        warmup_epoch=0.1,
        batch_size=32,
        rec="synthetic",
        num_classes=1000,
        num_image=3200,
        synthetic_noise=0.8,
        synthetic_jitter=12,
        num_workers=1,
        num_epoch=1,
        frequent=5,
        val_targets=("synthetic",),
        verbose=50,
        output="work_dirs/converge_cpu",
    )
