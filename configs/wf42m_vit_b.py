"""ViT-B on WebFace42M, CosFace, Partial FC 0.3, AdamW; arcface_torch's
configs/wf42m_pfc03_40epoch_8gpu_vit_b.py (network vit_b_dp005_mask_005: drop-path 0.05,
masking 0.05; 256 per GPU x gradient_acc 12).

Differences: precision bf16 where arcface_torch says fp16 (see configs/wf42m_vit_t.py);
remat=True stands for arcface_torch's using_checkpoint, which its get_model turns on for
vit_b; jaxface averages accumulated gradients where arcface_torch sums them (see
jaxface.step), so the effective learning rate differs.

The WebFace42M recipe (CosFace, Partial FC 0.3, AdamW, 40 epochs) is configs/wf42m_vit_t.py's;
only what differs is set here.
"""

from configs.wf42m_vit_t import get_config as vit_t_config


def get_config() -> dict:
    return vit_t_config() | dict(
        network="vit_b_dp005_mask_005",
        remat=True,
        batch_size=256,
        gradient_acc=12,  # 256 x 12 per GPU per step
        output="work_dirs/wf42m_vit_b",
    )
