"""IResNet backbones (Flax, NHWC) and their registry.

`jaxface.models.names` is pure data, read by the config validator without jax; the Flax
modules load on first use of the names below.
"""

from jaxface.models.names import BACKBONES, IMAGE_SIZE

_LAZY = ("IResNet", "get_model", "normalize_images")


def __getattr__(name):
    if name in _LAZY:
        from jaxface.models import iresnet

        return getattr(iresnet, name)
    raise AttributeError(f"module 'jaxface.models' has no attribute {name!r}")


__all__ = ["BACKBONES", "IMAGE_SIZE", *_LAZY]
