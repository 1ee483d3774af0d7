"""Backbones (Flax, NHWC): IResNet, MobileFaceNet, ViT, and their registry.

`jaxface.models.names` is pure data, read by the config validator without jax; the Flax
modules load on first use of the names below.
"""

from jaxface.models.names import BACKBONES, IMAGE_SIZE, NETWORKS

_LAZY = ("IResNet", "get_model", "normalize_images")


def __getattr__(name):
    if name in _LAZY:
        from jaxface.models import factory, iresnet

        return factory.get_model if name == "get_model" else getattr(iresnet, name)
    raise AttributeError(f"module 'jaxface.models' has no attribute {name!r}")


__all__ = ["BACKBONES", "IMAGE_SIZE", "NETWORKS", *_LAZY]
