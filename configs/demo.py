"""The embedded default: a tiny IResNet on 300 synthetic identities, minutes on a laptop CPU.

No dataset and no GPU needed: images are drawn from per-identity templates (see
jaxface/data/synthetic.py). The loss falls from about 30 to under 5, and held-out pairs of
one identity end up far closer than pairs of two.
"""

from configs.base import get_config as base_config


def get_config() -> dict:
    return base_config() | dict(
        network="iresnet_tiny",
        embedding_size=128,
        precision="fp32",
        margin_list=(1.0, 0.5, 0.0),
        scale=32.0,
        lr=0.1,
        warmup_epoch=0.1,
        batch_size=64,
        rec="synthetic",
        num_classes=300,
        num_image=300 * 40,
        num_epoch=1,
        frequent=10,
        val_targets=("synthetic",),
        verbose=100,
        checkpoint_every=100,
        output="work_dirs/demo",
    )
