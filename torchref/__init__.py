"""torchref: a faithful PyTorch arcface_torch (IResNet, MobileFaceNet, ViT, Partial FC,
margin loss, optimizer).

It is the reference jaxface is measured against: same state-dict keys as arcface_torch (a
released `model.pt` loads with strict=True), same maths, same config files.
"""

from torchref.iresnet import IResNet
from torchref.models import get_model

__all__ = ["IResNet", "get_model"]
