"""The embedded default: a tiny IResNet on 300 synthetic identities, minutes on a laptop CPU.

No dataset and no GPU needed: images are drawn from per-identity templates (see
jaxface/data/synthetic.py) and packed into a RecordIO file on first use. The loss falls
from about 24 to under 1, and a verification set of held-out pairs scores far above chance.
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
        # Packed into RecordIO by jaxface.data.pack on first use (about 180 MB), so the demo
        # reads through the same RecordIO loader as a real job.
        rec="work_dirs/demo_data/train",
        pack_synthetic=True,
        num_classes=300,
        num_image=300 * 40,
        num_epoch=1,
        frequent=10,
        val_targets=("synthetic",),
        verbose=100,
        checkpoint_every=100,
        output="work_dirs/demo",
    )
