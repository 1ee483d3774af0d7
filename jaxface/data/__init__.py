"""Data sources. Imports neither jax nor torch: torchref and compare use it too."""

from jaxface.data.synthetic import SyntheticFaces, SyntheticStream

__all__ = ["SyntheticFaces", "SyntheticStream"]
