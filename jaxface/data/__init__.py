"""Data sources. Imports neither jax nor torch: torchref and compare use it too."""

from jaxface.data.loader import HostLoader
from jaxface.data.recordio import (
    RecordIODataset,
    RecordIOError,
    RecordIOWarning,
    RecordIOWriter,
    open_recordio,
)
from jaxface.data.sources import SyntheticDataset, open_source
from jaxface.data.synthetic import SyntheticFaces, SyntheticStream

__all__ = [
    "HostLoader",
    "SyntheticDataset",
    "open_source",
    "RecordIODataset",
    "RecordIOError",
    "RecordIOWarning",
    "RecordIOWriter",
    "SyntheticFaces",
    "SyntheticStream",
    "open_recordio",
]
