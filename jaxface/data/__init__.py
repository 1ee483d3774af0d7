"""Data sources. Imports neither jax nor torch: torchref and compare use it too."""

from jaxface.data.loader import HostLoader
from jaxface.data.recordio import RecordIOError, RecordIOWarning, RecordIOWriter
from jaxface.data.sources import RecordIODataset, SyntheticDataset, open_recordio, open_source
from jaxface.data.synthetic import SyntheticFaces

__all__ = [
    "HostLoader",
    "SyntheticDataset",
    "open_source",
    "RecordIODataset",
    "RecordIOError",
    "RecordIOWarning",
    "RecordIOWriter",
    "SyntheticFaces",
    "open_recordio",
]
