"""memoryformer: a config-driven training framework for MemoryFormer (NeurIPS 2024, arXiv 2411.12992)."""

from memoryformer.config import ConfigError, ModelConfig

__version__ = "0.1.0"
__all__ = ["ConfigError", "ModelConfig", "__version__"]
