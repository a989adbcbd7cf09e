"""Weight initialisation as in the released code (GPT-NeoX `small_init` / `wang_init`).

- `small_init`, N(0, sqrt(2 / (5 d))): token embedding, LM head, Q/K/V (Memory Layer tables or linears),
  Pythia's fused QKV and every MLP input layer.
- `wang_init`, N(0, 2 / (n_layer * sqrt(d))): layers that write into the residual stream through a dense
  output (Pythia's attention `dense`, every MLP's `fc_out`). MemoryFormer has no such layer by default.
- Memory Block tables: N(0, `model.table_init_std`^2) (default 0.02, the released code's); every Memory Layer
  bias is 0.001 * N(0, 1).
- Linear biases 0; norm scales 1 and norm biases 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from memoryformer.config import ModelConfig
from memoryformer.models.attention import MemoryFormerAttention, NeoXAttention
from memoryformer.models.blocks import MLP, MemoryBlock
from memoryformer.nn.memory_layer import MemoryLayer
from memoryformer.nn.norms import RMSNorm


def small_init_std(d: int) -> float:
    """sqrt(2 / (5 d)), GPT-NeoX `small_init` (Nguyen and Salazar 2019)."""
    return math.sqrt(2.0 / (5.0 * d))


def wang_init_std(d: int, n_layer: int) -> float:
    """2 / (n_layer * sqrt(d)), GPT-NeoX `wang_init` for residual output layers."""
    return 2.0 / (n_layer * math.sqrt(d))


def _init_projection(module: nn.Module, std: float) -> None:
    if isinstance(module, MemoryLayer):
        module.init_std = std
        module.reset_parameters()  # tables N(0, std^2), bias 0.001 * N(0, 1)
    elif isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    else:
        raise TypeError(f"cannot initialise a projection of type {type(module).__name__}.")


def _init_side_by_side(module: nn.Module, std: float, parts: int) -> None:
    """Initialise a projection that holds `parts` projections side by side in its output (Q, K and V) as
    `parts` separate ones, drawn in turn: a Memory Layer's tables `[R, parts * d]` get each part's
    `N(0, std^2)` block `[R, d]` and then its bias `0.001 * N(0, 1)` `[d]`; a linear layer's weight
    `[parts * d, d_in]` is already the parts' weights one after another. So a seed gives the same weights as
    three separate Q, K, V layers would, and runs trained before the merge retrain to the same numbers."""
    if not isinstance(module, MemoryLayer) or module.tables.dim() != 2:
        # (a ZeRO-3 shard placeholder inside zero.Init has no 2-d shape; its init comes once materialised)
        _init_projection(module, std)
        return
    module.init_std = std
    rows, width = module.tables.shape
    d = width // parts
    tables, bias = module.tables, module.bias
    with torch.no_grad():
        for i in range(parts):
            cols = slice(i * d, (i + 1) * d)
            tables[:, cols] = torch.empty(rows, d, dtype=tables.dtype, device=tables.device).normal_(0.0, std)
            if bias is not None:
                bias[cols] = torch.empty(d, dtype=bias.dtype, device=bias.device).normal_(0.0, 0.001)


def init_weights(
    model: nn.Module,
    config: ModelConfig,
    whole: Callable[[list[nn.Parameter]], AbstractContextManager] | None = None,
) -> None:
    """Initialise every parameter of a `LanguageModel` in place by the rules in this module's docstring.

    `whole(params)`: a context in which `params` are whole tensors, entered around the init of each
    module or projection, which overwrites every element of them (DeepSpeed ZeRO-3 holds parameters as
    shards and materialises one projection's at a time, `memoryformer.training.parallel.materialised_zero3`);
    by default none. The draws come in the same order either way.
    """
    small = small_init_std(config.n_embd)
    wang = wang_init_std(config.n_embd, config.n_layer)
    whole = whole or (lambda params: nullcontext())
    for module in model.modules():
        for target, step in _init_steps(module, small, wang, config.table_init_std):
            with whole(list(target.parameters())):
                step()
    with whole(list(model.lm_head.parameters())):
        _init_projection(model.lm_head, small)


def _init_steps(
    module: nn.Module, small: float, wang: float, table_std: float
) -> list[tuple[nn.Module, Callable[[], None]]]:
    """`[(target, step), ...]` in order: each `step` initialises every parameter of its `target` (`module`
    itself or one of its projections) and no other; empty when `module` has no rule of its own."""
    if isinstance(module, nn.Embedding):
        return [(module, lambda: nn.init.normal_(module.weight, mean=0.0, std=small))]
    if isinstance(module, (nn.LayerNorm, RMSNorm)):
        return [(module, module.reset_parameters)]
    if isinstance(module, MemoryFormerAttention):
        return [(module.qkv, lambda: _init_side_by_side(module.qkv, small, parts=3))]  # Q, K, V: small_init
    if isinstance(module, NeoXAttention):
        return [_projection(module.query_key_value, small), _projection(module.dense, wang)]
    if isinstance(module, MemoryBlock):
        return [_projection(module.layer1, table_std), _projection(module.layer2, table_std)]
    if isinstance(module, MLP):
        return [_projection(module.fc_in, small), _projection(module.fc_out, wang)]
    return []


def _projection(module: nn.Module, std: float) -> tuple[nn.Module, Callable[[], None]]:
    return module, lambda: _init_projection(module, std)
