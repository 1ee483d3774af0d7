"""ViT-L on WebFace42M, CosFace, Partial FC 0.3, AdamW; arcface_torch's
configs/wf42m_pfc03_40epoch_64gpu_vit_l.py (network vit_l_dp005_mask_005, 384 per GPU).

Differences: precision bf16 where arcface_torch says fp16 (see configs/wf42m_vit_t.py);
remat=True for arcface_torch's using_checkpoint (on for vit_l there).

The WebFace42M recipe (CosFace, Partial FC 0.3, AdamW, 40 epochs) is configs/wf42m_vit_t.py's;
only what differs is set here.
"""

from configs.wf42m_vit_t import get_config as vit_t_config


def get_config() -> dict:
    return vit_t_config() | dict(
        network="vit_l_dp005_mask_005",
        remat=True,
        batch_size=384,
        output="work_dirs/wf42m_vit_l",
    )
