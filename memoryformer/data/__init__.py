"""Data pipeline: MMIDIDX indexed datasets, GPT-NeoX index mappings, streaming, the sample corpus."""

from memoryformer.data.config import DataConfig
from memoryformer.data.indexed import MMapIndexedDataset, MMapIndexedDatasetBuilder
from memoryformer.errors import DataError

__all__ = ["DataConfig", "DataError", "MMapIndexedDataset", "MMapIndexedDatasetBuilder"]
