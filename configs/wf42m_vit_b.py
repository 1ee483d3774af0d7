"""ViT-B on WebFace42M, CosFace, Partial FC 0.3, AdamW; arcface_torch's
configs/wf42m_pfc03_40epoch_8gpu_vit_b.py (network vit_b_dp005_mask_005: drop-path 0.05,
masking 0.05; 256 per GPU x gradient_acc 12).

Differences: precision bf16 where arcface_torch says fp16 (see configs/wf42m_vit_t.py);
remat=True stands for arcface_torch's using_checkpoint, which its get_model turns on for
vit_b; jaxface averages accumulated gradients where arcface_torch sums them (see
jaxface.step), so the effective learning rate differs.
"""

from configs.base import get_config as base_config


def get_config() -> dict:
    return base_config() | dict(
        network="vit_b_dp005_mask_005",
        remat=True,
        embedding_size=512,
        margin_list=(1.0, 0.0, 0.4),
        sample_rate=0.3,
        precision="bf16",
        optimizer="adamw",
        lr=1e-3,
        weight_decay=0.1,
        batch_size=256,
        gradient_acc=12,  # 256 x 12 per GPU per step
        rec="/data/WebFace42M",  # fill in: the folder with train.rec and train.idx
        num_classes=2_059_906,
        num_image=42_474_557,
        num_epoch=40,
        warmup_epoch=4,
        val_targets=(),
        verbose=2000,
        output="work_dirs/wf42m_vit_b",
    )
