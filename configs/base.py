"""The base of every job file: all of jaxface's defaults (each key, its type and meaning are
listed once, in jaxface/defaults.py). Job files start from get_config() and change a few
keys. No jax or torch here: torchref reads the same configs."""

from jaxface.defaults import get_config

__all__ = ["get_config"]
