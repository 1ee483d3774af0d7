"""IResNet backbones (Flax, NHWC) and their registry."""

from jaxface.models.iresnet import IResNet, get_model, normalize_images
from jaxface.models.names import BACKBONES, IMAGE_SIZE

__all__ = ["BACKBONES", "IMAGE_SIZE", "IResNet", "get_model", "normalize_images"]
