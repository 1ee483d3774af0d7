"""ViT-S on WebFace42M, CosFace, Partial FC 0.3, AdamW; arcface_torch's
configs/wf42m_pfc03_40epoch_64gpu_vit_s.py (network vit_s_dp005_mask_0, 384 per GPU).

Differences: precision bf16 where arcface_torch says fp16 (see configs/wf42m_vit_t.py).
"""

from configs.base import get_config as base_config


def get_config() -> dict:
    return base_config() | dict(
        network="vit_s_dp005_mask_0",
        embedding_size=512,
        margin_list=(1.0, 0.0, 0.4),
        sample_rate=0.3,
        precision="bf16",
        optimizer="adamw",
        lr=1e-3,
        weight_decay=0.1,
        batch_size=384,
        rec="/data/WebFace42M",  # fill in: the folder with train.rec and train.idx
        num_classes=2_059_906,
        num_image=42_474_557,
        num_epoch=40,
        warmup_epoch=4,
        val_targets=(),
        verbose=2000,
        output="work_dirs/wf42m_vit_s",
    )
