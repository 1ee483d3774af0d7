"""MobileFaceNet-large (blocks 2-8-12-4, width x4) on WebFace12M, CosFace, SGD.

arcface_torch ships no mbf_large config: this is configs/mbf.py's recipe (arcface_torch's
configs/wf12m_mbf.py) with the larger network.
"""

from configs.mbf import get_config as mbf_config


def get_config() -> dict:
    return mbf_config() | dict(network="mbf_large", output="work_dirs/wf12m_mbf_large")
