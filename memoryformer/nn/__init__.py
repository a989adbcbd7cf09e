"""Neural-network building blocks: the Memory Layer, norms and rotary embedding."""

from memoryformer.nn.memory_layer import HashCodes, MemoryLayer, chunk_weights, hash_chunks, sign_codes

__all__ = ["HashCodes", "MemoryLayer", "chunk_weights", "hash_chunks", "sign_codes"]
