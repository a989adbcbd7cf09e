"""Models: `LanguageModel` with MemoryFormer or Pythia (GPT-NeoX) blocks, `build_model`, `KVCache`.

Conversion to and from Hugging Face `GPTNeoXForCausalLM` lives in `memoryformer.models.convert` (it imports
transformers, so it is not imported here).
"""

from memoryformer.models.kv_cache import KVCache
from memoryformer.models.language_model import LanguageModel, build_model

__all__ = ["KVCache", "LanguageModel", "build_model"]
