"""Hugging Face-native export of our models.

`configuration_memoryformer.py` and `modeling_memoryformer.py` are self-contained (torch + transformers
only): they are copied into every exported MemoryFormer directory and loaded there with
`trust_remote_code=True`. `config_map` maps `ModelConfig` to their `config.json`; `export` writes the
directory. Nothing here imports transformers at import time.
"""
