"""How large a run's steps are: the batch arithmetic and the memory plan it is checked against.

## Batch arithmetic

    global_batch_size = micro_batch_size x accumulate x devices x num_nodes

`micro_batch_size` (per device, per forward) is the knob and the accumulation is derived from it; a stated
`trainer.accumulate_grad_batches` is only checked. `micro_batch_size=auto` takes the largest micro-batch
that divides the device's share of the global batch and whose memory plan fits the device with
`AUTO_HEADROOM` left free. Every refusal is one sentence naming the key and the fix.

## The memory plan

The memory plan: the estimated peak memory of one training step on one device, before anything is built.

`plan_memory(model, seq_len, micro_batch_size, layout, ...)` is a pure function of the model config, the
sequence length, the micro-batch and the run's layout (precision, strategy, ZeRO stage, offload, bucket
sizes, world size). It counts, per device:

- model states: weights, gradients and AdamW's states, sharded as DDP (not at all) or ZeRO-1/2/3 shard
  them, on the host when offloaded (`Layout`, `model_states`);
- activations kept for backward, tensor by tensor for each block (`block_activation_bytes`), with
  activation checkpointing counted (a checkpointed block keeps its input and recomputes one block at a
  time in backward);
- the logits and the loss (`logits_and_loss_bytes`: the chunked cross-entropy's peak, also under ZeRO-3);
- the workspace of a Memory Layer's lookup backward on CUDA (`lookup_backward_bytes`, bounded by
  `memory_ops.LOOKUP_BACKWARD_BOUND`);
- bytes no tensor shows: the CUDA context, the caching allocator's slack, DeepSpeed's communication
  buckets (from the trainer YAML), NCCL's buffers.

The activation terms were read off the code (which tensors autograd saves, in which dtype) and checked
against `torch.autograd.graph.saved_tensors_hooks` (tests/test_memory_plan.py); the whole plan is
validated against a real step's peak on CPU (benchmarks/bench_memory_plan.py, docs/benchmarks.md).
docs/memory-plan.md says how to read it and what it leaves out.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from memoryformer.config import ConfigError, ModelConfig
from memoryformer.nn import chunked_loss, memory_ops

GIB = 2**30
GB = 10**9
#: Share of the device's memory that `micro_batch_size=auto` leaves free (fragmentation, the data loader's
#: pinned buffers, evaluation, anything the plan does not see).
AUTO_HEADROOM = 0.10
#: CUDA context + cuBLAS/cuDNN workspaces of one process (measured values are 0.5-0.9 GiB on A100/H100).
CUDA_CONTEXT_BYTES = int(0.75 * GIB)
#: NCCL's communicator buffers per process when more than one process runs.
NCCL_BYTES = int(0.5 * GIB)
#: Caching allocator slack on CUDA, as a share of the memory that changes within a step.
ALLOCATOR_SLACK = 0.10
ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32


@dataclass(frozen=True)
class Layout:
    """Where a run keeps its tensors: what the plan needs from `trainer.*` and the world size.

    `strategy`: "single" | "ddp" | "deepspeed"; `zero_stage` 0-3 (DeepSpeed only); `device`: "cuda" (the
    kernels a GPU runs) or "cpu"; `precision` as Lightning spells it; bucket sizes in elements.
    """

    strategy: str = "single"
    precision: str = "32-true"
    device: str = "cuda"
    world_size: int = 1
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    reduce_bucket_size: int = 0
    allgather_bucket_size: int = 0
    stage3_prefetch_bucket_size: int = 0
    stage3_max_live_parameters: int = 0
    ddp_bucket_view: bool = True
    fused_optimizer: bool = True
    grad_accum_fp32: bool = False  # DeepSpeed's data_types.grad_accum_dtype=fp32 under 16-bit weights

    @property
    def mixed(self) -> bool:
        """16-bit compute: bf16-mixed, 16-mixed (autocast, or DeepSpeed's 16-bit engine)."""
        return str(self.precision).startswith(("16", "bf16"))

    @property
    def deepspeed(self) -> bool:
        """True under DeepSpeed (the module itself is 16-bit there under mixed precision)."""
        return self.strategy == "deepspeed"


def layout_from_trainer(trainer_cfg: dict[str, Any], world_size: int, fused_optimizer: bool = True) -> Layout:
    """The `Layout` of a composed `trainer` node (plain dict): strategy, ZeRO settings, precision, device."""
    spec = trainer_cfg.get("strategy") or "auto"
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    device = "cpu" if accelerator == "cpu" else "cuda"
    common = dict(
        precision=str(trainer_cfg.get("precision", "32-true")), device=device, world_size=world_size,
        fused_optimizer=fused_optimizer,
    )
    name = str(spec.get("name") if isinstance(spec, dict) else spec).lower()
    if "deepspeed" in name:
        config = (spec.get("config") or {}) if isinstance(spec, dict) else {}
        zero = dict(config.get("zero_optimization") or {})
        if isinstance(spec, dict) and zero.get("stage") in (0, 1, 2, 3):  # what the run will give DeepSpeed
            from memoryformer.training.parallel import deepspeed_config

            config = deepspeed_config(spec, common["precision"])
        accum = (config.get("data_types") or {}).get("grad_accum_dtype")
        offload_opt = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
        offload_par = (zero.get("offload_param") or {}).get("device", "none") not in ("none", None)
        return Layout(
            strategy="deepspeed", zero_stage=int(zero.get("stage", 0)), offload_optimizer=offload_opt,
            offload_params=offload_par, reduce_bucket_size=int(zero.get("reduce_bucket_size", 5e8)),
            allgather_bucket_size=int(zero.get("allgather_bucket_size", 5e8)),
            stage3_prefetch_bucket_size=int(zero.get("stage3_prefetch_bucket_size", 5e7)),
            stage3_max_live_parameters=int(zero.get("stage3_max_live_parameters", 1e9)),
            grad_accum_fp32=accum in ("fp32", "float32"), **common,
        )
    if world_size > 1 or "ddp" in name:
        view = bool(spec.get("gradient_as_bucket_view", False)) if isinstance(spec, dict) else False
        return Layout(strategy="ddp", ddp_bucket_view=view, **common)
    return Layout(strategy="single", **common)


# ----------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a `LanguageModel`: `total`; `matmul`, the weights autocast casts to 16 bits
    (nn.Linear weights); `largest`, the largest single parameter (what ZeRO-3 gathers at once)."""

    total: int
    matmul: int
    largest: int


@functools.lru_cache(maxsize=64)
def _param_counts(frozen: tuple) -> ParamCounts:
    import torch
    from torch import nn

    from memoryformer.flops import build_on_meta

    model = build_on_meta(ModelConfig(**dict(frozen)))
    total = sum(p.numel() for p in model.parameters())
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    largest = max(p.numel() for p in model.parameters())
    assert all(p.device == torch.device("meta") for p in model.parameters())
    return ParamCounts(total, matmul, largest)


@functools.lru_cache(maxsize=64)
def _memory_layer_shapes(frozen: tuple) -> tuple[tuple[int, int, int], ...]:
    from memoryformer.flops import build_on_meta
    from memoryformer.nn import MemoryLayer

    model = build_on_meta(ModelConfig(**dict(frozen)))
    return tuple(sorted({(m.num_tables, m.tables.shape[0], m.out_features) for m in model.modules()
                         if isinstance(m, MemoryLayer)}))


def memory_layer_shapes(model: ModelConfig) -> tuple[tuple[int, int, int], ...]:
    """The distinct (K tables, table rows, output width) of `LanguageModel(model)`'s Memory Layers (none for
    a Pythia model), from the model built on the meta device, cached."""
    return _memory_layer_shapes(tuple(sorted((k, _hashable(v)) for k, v in model.to_dict().items())))


def param_counts(model: ModelConfig) -> ParamCounts:
    """`ParamCounts` of `LanguageModel(model)`, built once on the meta device (no memory) and cached."""
    return _param_counts(tuple(sorted((k, _hashable(v)) for k, v in model.to_dict().items())))


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# ----------------------------------------------------------------------------- model states
@dataclass
class ModelStates:
    """Bytes per device of weights, gradients and optimizer states (and what sits on the host)."""

    weights: int
    gradients: int
    optimizer_states: int
    buffers: int  # DeepSpeed buckets, gathered ZeRO-3 parameters
    host_offload: int  # on the host (offload), not on the device


def model_states(params: ParamCounts, layout: Layout) -> ModelStates:
    """Weights, gradients and AdamW states per device for `layout`.

    Without DeepSpeed the parameters, their gradients and both Adam moments are fp32 on every device (also
    under bf16-mixed, where autocast computes in 16 bits but keeps fp32 weights): 4 + 4 + 8 bytes/param.
    DeepSpeed under 16-bit precision keeps 16-bit weights and gradients and fp32 master weights, fp32
    gradients and moments (12 bytes/param, counted as optimizer states) partitioned over the world size
    (ZeRO-1: master weights and moments; ZeRO-2: also the gradients; ZeRO-3: also the weights), as in
    DeepSpeed's own `estimate_zero2_model_states_mem_needs`. With fp32 gradient accumulation
    (`layout.grad_accum_fp32`, bf16 at stage 1-3) the gradients are those DeepSpeed 0.19 then keeps: ZeRO-1
    a whole fp32 buffer besides the 16-bit gradients, ZeRO-2 and -3 an fp32 partition instead of the 16-bit
    one (on the device also with ZeRO-2's optimizer offload).
    """
    p, world = params.total, max(1, layout.world_size)
    if not layout.deepspeed:
        grads = 4 * p if (layout.strategy != "ddp" or layout.ddp_bucket_view) else 8 * p  # buckets: a copy
        return ModelStates(4 * p, grads, ADAM_STATE_BYTES * p, 0, 0)
    stage, w16 = layout.zero_stage, (2 if layout.mixed else 4)
    master = 4 if layout.mixed else 0  # fp32 copy of the weights the optimizer updates
    fp32_grads = 4 if layout.mixed else 0  # fp32 gradient partition the optimizer reads
    weights = w16 * p // world if stage >= 3 else w16 * p
    grads16 = w16 * p // world if stage >= 2 else w16 * p
    fp32_accum = layout.grad_accum_fp32 and layout.mixed and stage >= 1
    if fp32_accum:
        # data_types.grad_accum_dtype=fp32, as DeepSpeed 0.19 allocates it (docs/memory-plan.md):
        if stage == 1:
            # BF16_Optimizer (engine._do_optimizer_sanity_check): the 16-bit .grad plus a whole fp32 gradient
            # buffer (bf16_optimizer.py, fp32_groups_gradients_flat), whose partition the optimizer reads
            grads16, fp32_grads = w16 * p + 4 * p, 0
        elif stage == 2:
            # one fp32 partition replaces the 16-bit one and is the gradient the optimizer reads
            # (stage_1_and_2.py, _build_compact_grad_partition_buffer; step: .to(fp32) returns it); with
            # offload it stays on the device and is copied into the host's fp32 gradient at the boundary
            grads16 = 4 * p // world
            fp32_grads = 4 if layout.offload_optimizer else 0
        else:
            # the gradient partitions' flat buffer is fp32 (stage3.py, grad_partitions_flat_buffer); the
            # optimizer's flattened fp32 gradient is still made at the step
            grads16 = 4 * p // world
    sharded = (master + fp32_grads + ADAM_STATE_BYTES) * p // world
    buffers = 2 * layout.reduce_bucket_size * w16  # gradient reduction: two buckets in flight
    if stage in (1, 2):
        buffers += layout.allgather_bucket_size * w16  # all-gather of the updated weight partitions
    if stage >= 3:
        live = min(layout.stage3_max_live_parameters, p) + layout.stage3_prefetch_bucket_size
        buffers += w16 * max(live, params.largest)
    if layout.offload_optimizer:  # gradient partitions go to the host as they are reduced
        # except ZeRO-2's fp32 accumulation partition, which stays on the device (stage_1_and_2.py)
        on_device = stage < 2 or (fp32_accum and stage == 2)
        return ModelStates(weights, grads16 if on_device else 0, 0, buffers, sharded)
    return ModelStates(weights, grads16, sharded, buffers, 0)


# ----------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class ActivationBytes:
    """Bytes per token: `stream` (residual stream, Memory Layer outputs, norms' outputs), `matmul` (outputs
    of matmuls and attention, 16-bit under mixed precision), `cpu_buffers` (tensors only the CPU kernels
    keep: log-sigmoid's buffer), `embedding_bag` (offset2bag index of the CUDA lookup)."""

    stream: int
    matmul: int
    cpu_buffers: bool
    embedding_bag: bool


def activation_bytes(layout: Layout) -> ActivationBytes:
    """Element sizes of the activations under `layout`'s precision and device."""
    stream = 2 if (layout.mixed and layout.deepspeed) else 4  # autocast keeps the fp32 stream
    matmul = 2 if layout.mixed else 4
    cuda = layout.device == "cuda"
    return ActivationBytes(stream, matmul, cpu_buffers=not cuda, embedding_bag=cuda)


def _rmsnorm_bytes(width: int, a: ActivationBytes) -> int:
    # vector_norm keeps its input (and an fp32 copy of a 16-bit input), division its fp32 result, 2 x [N, 1]
    return a.stream * width + (4 * width if a.stream < 4 else 0) + 4 * width + 8


def _hash_bytes(width: int, num_tables: int, lookups: int, a: ActivationBytes) -> int:
    """One hash of a `width`-wide input into `num_tables` chunks, read by `lookups` Memory Layers.

    Kept: the input in fp32 (abs), 2|z| (log-sigmoid's input), log-sigmoid's buffer (CPU only), the exp and
    the L1 sum ([N, K] each), the rows (int64) and weights (fp32); the CUDA lookup
    (`memory_ops.BoundedEmbeddingBag`) keeps no offset2bag, only, with 16-bit tables (DeepSpeed), the weights
    rounded to the tables' dtype, per layer.
    """
    per_input = 4 * width + 4 * width + (4 * width if a.cpu_buffers else 0)
    per_chunk = 8 + 8 + 4 + (2 * lookups if a.embedding_bag and a.stream < 4 else 0)
    return per_input + per_chunk * num_tables


def _softmax_attention_bytes(model: ModelConfig, a: ActivationBytes) -> int:
    # q and k after rotary, v (16-bit copies under mixed precision), the attention output and its logsumexp
    return 3 * a.matmul * model.n_embd + a.matmul * model.n_embd + 4 * model.n_head


def block_activation_bytes(model: ModelConfig, a: ActivationBytes) -> int:
    """Bytes per token that one block keeps for backward (every tensor autograd saves, by dtype).

    Efficient attention cores (Table 2's linformer, cosformer, performer) are counted as the softmax core.
    """
    d = model.n_embd
    attention = _softmax_attention_bytes(model, a)
    if not model.is_memoryformer:
        hidden = model.mlp_hidden
        kept = a.stream * d + 8  # block input (LayerNorm's input), mean and rstd
        kept += a.matmul * d + a.matmul * 3 * d  # LayerNorm output (the linear's input), fused QKV output
        kept += 2 * a.matmul * d + a.matmul * d + 4 * model.n_head  # q, k rotated; output; logsumexp
        kept += a.matmul * d  # merged heads (the dense projection's input)
        kept += 8 + a.matmul * d + 2 * a.matmul * hidden  # LayerNorm 2; MLP input, fc_in and GELU outputs
        if not model.parallel_residual:
            kept += a.stream * d
        return kept
    hashed, k = model.resolved_hashed_width, model.num_tables
    kept = _rmsnorm_bytes(d, a) if model.norm == "rmsnorm" else a.stream * d + 8
    if model.qkv == "memory":
        # one Memory Layer gives q, k and v ([N, 3d]); with no dtype cast before the attention, v is a view
        # of that output and keeps all of it alive (q and k are new tensors after rotary)
        kept += _hash_bytes(hashed, k, 1, a) + attention
        if a.stream == a.matmul:
            kept += 2 * a.stream * d
    else:
        kept += a.matmul * d + attention
    kept += _rmsnorm_bytes(d, a) if model.norm == "rmsnorm" else a.stream * d + 8
    if model.ffn == "memory_block":
        h = model.memory_block_hidden
        kept += _hash_bytes(hashed, k, 1, a)
        kept += a.stream * h + 8  # layer 1 output + bias (the LayerNorm's input), mean and rstd
        if model.memory_block_activation == "gelu":
            kept += a.stream * h
        kept += _hash_bytes(h, k, 1, a)  # layer 2 hashes the LayerNorm's output in chunks of tau + e
    else:
        kept += a.matmul * d + 2 * a.matmul * model.mlp_hidden
    return kept


def head_activation_bytes(model: ModelConfig, a: ActivationBytes) -> int:
    """Bytes per token kept by the final norm and the LM head's input, plus the int64 inputs and labels."""
    d = model.n_embd
    norm = _rmsnorm_bytes(d, a) if model.is_memoryformer and model.norm == "rmsnorm" else a.stream * d + 8
    return norm + a.matmul * d + 16


def logits_and_loss_bytes(tokens: int, model: ModelConfig, a: ActivationBytes) -> tuple[int, int]:
    """(kept, transient) bytes of the logits and the cross-entropy for `tokens` tokens.

    The training loss is chunked (`memoryformer.nn.chunked_loss`), under every strategy: ZeRO-3 too, since
    the loss runs inside the LM head's forward (`ChunkedLossHead`), around which ZeRO-3 gathers the head's
    weight. `kept` is what the loss holds for backward, the fp32 gradients of the head (4 x V x d) and of the
    hidden states (4 x N x d); `transient` is one chunk's logits in the matmul's dtype with their fp32 copy
    and fp32 gradient, alive only inside the loss's forward.
    """
    total = chunked_loss.peak_bytes(tokens, model.vocab_size, model.n_embd, compute_bytes=a.matmul)
    kept = chunked_loss.kept_bytes(tokens, model.vocab_size, model.n_embd)
    return kept, total - kept


def lookup_backward_bytes(model: ModelConfig, tokens: int, a: ActivationBytes) -> int:
    """Peak extra bytes of one Memory Layer's backward on CUDA for `tokens` tokens, the largest over the
    model's layers (`memory_ops.lookup_backward_bytes`: one chunk's workspace of PyTorch's embedding-bag
    backward, at most `memory_ops.LOOKUP_BACKWARD_BOUND`, and two fp32 table-sized buffers); 0 on CPU,
    whose C++ kernel has no such workspace, and for models without Memory Layers."""
    if not a.embedding_bag:
        return 0
    return max((memory_ops.lookup_backward_bytes(tokens, k, width, rows)
                for k, rows, width in memory_layer_shapes(model)), default=0)


def activation_total(
    model: ModelConfig, tokens: int, a: ActivationBytes, checkpointing: bool, every: int
) -> tuple[int, int]:
    """(stored, recompute) activation bytes of the blocks, embedding and head for `tokens` tokens.

    With checkpointing, blocks 0, every, 2 * every, ... keep only their input and recompute in backward,
    one at a time: `recompute` is one block's activations, alive while it is differentiated.
    """
    per_block = block_activation_bytes(model, a) * tokens
    checkpointed = len(range(0, model.n_layer, every)) if checkpointing else 0
    stored = (model.n_layer - checkpointed) * per_block + checkpointed * a.stream * model.n_embd * tokens
    stored += head_activation_bytes(model, a) * tokens
    return stored, per_block if checkpointed else 0


# ----------------------------------------------------------------------------- the plan
@dataclass
class MemoryPlan:
    """The estimated peak of one training step on one device; `breakdown` sums to `peak_bytes`.

    `peak_at` says when the peak happens: "backward" (start of backward: activations, logits and loss
    alive) or "optimizer step" (all gradients, no activations). `host_bytes`: what offload keeps on the host.
    """

    micro_batch_size: int
    seq_len: int
    layout: Layout
    params: int
    peak_bytes: int
    peak_at: str
    breakdown: dict[str, int] = field(default_factory=dict)
    host_bytes: int = 0

    @property
    def memory_gib(self) -> float:
        """Estimated peak per device in GiB."""
        return self.peak_bytes / GIB

    def fits(self, device_bytes: int, headroom: float = 0.0) -> bool:
        """True if the peak fits in `device_bytes` leaving `headroom` (a share of the device) free."""
        return self.peak_bytes <= device_bytes * (1.0 - headroom)


def plan_memory(
    model: ModelConfig,
    seq_len: int,
    micro_batch_size: int,
    layout: Layout,
    activation_checkpointing: bool = False,
    activation_checkpointing_every: int = 1,
    accumulate: int = 1,
) -> MemoryPlan:
    """The `MemoryPlan` of one training step of `model` at `micro_batch_size` x `seq_len` tokens."""
    params = param_counts(model)
    states = model_states(params, layout)
    a = activation_bytes(layout)
    tokens = micro_batch_size * seq_len
    stored, recompute = activation_total(
        model, tokens, a, activation_checkpointing, activation_checkpointing_every
    )
    logits_kept, logits_transient = logits_and_loss_bytes(tokens, model, a)
    lookup = lookup_backward_bytes(model, tokens, a)
    # 16-bit copies of the matmul weights that autocast makes and backward keeps (not under DeepSpeed,
    # whose module is 16-bit already)
    casts = 2 * params.matmul if (layout.mixed and not layout.deepspeed) else 0
    # Gradients exist before backward when they outlive the step: DDP's buckets, DeepSpeed's partitions,
    # or accumulation over micro-batches; otherwise Lightning frees them after each optimizer step.
    grads_live = accumulate > 1 or layout.strategy != "single"
    head_grad = 4 * model.vocab_size * model.n_embd  # the LM head's gradient, first to appear in backward
    # The loss's transient logits are gone before any block's backward, where a checkpointed block is
    # recomputed and a Memory Layer's lookup backward takes its workspace: the plan counts one side or the
    # other, whichever is larger, never both.
    recompute_alive = recompute + lookup >= logits_transient
    logits = logits_kept + (0 if recompute_alive else logits_transient)
    activations = stored + (recompute if recompute_alive else 0)
    lookup = lookup if recompute_alive else 0
    in_backward = activations + logits + casts + lookup
    grads_at_backward = states.gradients if grads_live else min(head_grad, states.gradients)
    step_temporaries = 0 if (layout.fused_optimizer or layout.deepspeed) else states.gradients
    backward_peak = grads_at_backward + in_backward
    step_peak = states.gradients + step_temporaries
    breakdown = {"weights": states.weights, "optimizer_states": states.optimizer_states}
    if backward_peak >= step_peak:
        peak_at = "backward"
        breakdown.update(
            gradients=grads_at_backward, activations=activations, logits_and_loss=logits,
            lookup_backward=lookup, autocast_weight_copies=casts, optimizer_step_temporaries=0,
        )
    else:
        peak_at = "optimizer step"
        breakdown.update(
            gradients=states.gradients, activations=0, logits_and_loss=0, lookup_backward=0,
            autocast_weight_copies=0, optimizer_step_temporaries=step_temporaries,
        )
    breakdown["communication_buffers"] = states.buffers
    if layout.device == "cuda":
        dynamic = breakdown["activations"] + breakdown["logits_and_loss"] + breakdown["gradients"]
        dynamic += breakdown["lookup_backward"]
        breakdown["cuda_context"] = CUDA_CONTEXT_BYTES
        breakdown["nccl"] = NCCL_BYTES if layout.world_size > 1 else 0
        breakdown["allocator_slack"] = int(ALLOCATOR_SLACK * dynamic)
    return MemoryPlan(
        micro_batch_size=micro_batch_size, seq_len=seq_len, layout=layout, params=params.total,
        peak_bytes=sum(breakdown.values()), peak_at=peak_at, breakdown=breakdown,
        host_bytes=states.host_offload,
    )


def largest_fitting_micro_batch(
    candidates: list[int], device_bytes: int, headroom: float, plan_for: Any
) -> int | None:
    """The largest of `candidates` whose `plan_for(micro)` fits `device_bytes` with `headroom`; None if none.

    The plan grows with the micro-batch, so candidates are tried from the largest down.
    """
    for micro in sorted(candidates, reverse=True):
        if plan_for(micro).fits(device_bytes, headroom):
            return micro
    return None


def plan_summary(plan: MemoryPlan, accumulate: int, device_bytes: int | None, source: str) -> dict[str, Any]:
    """The plan as `plan.json` stores it (GiB, three decimals); `source` says where the device's size came
    from (the device, `device_memory_gb`, the host's RAM)."""
    layout = plan.layout
    gib = {key: round(value / GIB, 3) for key, value in plan.breakdown.items()}
    return {
        "micro_batch_size": plan.micro_batch_size,
        "accumulate_grad_batches": accumulate,
        "devices": None,  # filled in by the caller (devices per node)
        "num_nodes": None,
        "world_size": layout.world_size,
        "seq_len": plan.seq_len,
        "params": plan.params,
        "device_memory_gib": None if device_bytes is None else round(device_bytes / GIB, 3),
        "device_memory_source": source,
        "memory_gib": round(plan.memory_gib, 3),
        "peak_at": plan.peak_at,
        "breakdown": gib,
        "host_offload_gib": round(plan.host_bytes / GIB, 3),
        "layout": asdict(layout),
    }


def format_plan(summary: dict[str, Any]) -> str:
    """A few lines for the console: batch arithmetic, peak against the device, then the breakdown."""
    device = summary["device_memory_gib"]
    device_text = f"{device:.1f} GiB ({summary['device_memory_source']})" if device else "unknown"
    layout = summary["layout"]
    strategy = layout["strategy"]
    if strategy == "deepspeed":
        strategy += f" ZeRO-{layout['zero_stage']}"
    if layout["offload_optimizer"]:
        strategy += " + optimizer offload"
    lines = [
        f"Memory plan: micro-batch {summary['micro_batch_size']} x accumulate "
        f"{summary['accumulate_grad_batches']} x {summary['devices']} device(s) x {summary['num_nodes']} "
        f"node(s); {strategy}, {layout['precision']}, {summary['params'] / 1e6:,.0f}M parameters",
        f"  estimated peak {summary['memory_gib']:.2f} GiB per device (at the {summary['peak_at']}) of "
        f"{device_text}",
    ]
    lines += [f"  {key:<28}{value:10.3f} GiB" for key, value in summary["breakdown"].items() if value]
    if summary["host_offload_gib"]:
        lines.append(f"  on the host (offload)       {summary['host_offload_gib']:10.3f} GiB per device")
    return "\n".join(lines)


def dumps(summary: dict[str, Any]) -> str:
    """`summary` as indented JSON text (what `<run dir>/plan.json` holds)."""
    return json.dumps(summary, indent=2, sort_keys=False) + "\n"


AUTO = "auto"


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes of one device's memory (None: unknown) and where the number came from."""

    bytes: int | None
    source: str


def check_micro_batch_spec(value: Any) -> int | str | None:
    """`micro_batch_size` as None, "auto" or an int >= 1; anything else is refused in one sentence."""
    if value is None or value == AUTO:
        return value
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"micro_batch_size={value!r} must be an integer >= 1 or auto (the largest micro-batch the memory "
            f"plan fits into the device); set micro_batch_size=1 or more, or micro_batch_size=auto."
        )
    return value


def device_memory(
    device_memory_gb: float | None, trainer_cfg: dict[str, Any], processes_per_node: int
) -> DeviceMemory:
    """The memory of one device of the run.

    `device_memory_gb` (GB = 1e9 bytes) when given: plan for a device that is not here. Otherwise a CUDA
    device's total memory, or for `trainer.accelerator=cpu` the host's RAM shared by the node's processes.
    Under `trainer.accelerator=gpu` on a machine without CUDA it is unknown.
    """
    if device_memory_gb is not None:
        if not float(device_memory_gb) > 0:
            raise ConfigError(
                f"device_memory_gb={device_memory_gb} must be a positive number of GB (the memory of the "
                f"device to plan for, e.g. device_memory_gb=80) or null (this machine's device)."
            )
        return DeviceMemory(int(float(device_memory_gb) * GB), f"device_memory_gb={device_memory_gb:g}")
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    import torch

    cuda = torch.cuda.is_available()
    if accelerator == "cpu" or (accelerator == "auto" and not cuda):
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        share = f" / {processes_per_node} processes" if processes_per_node > 1 else ""
        return DeviceMemory(ram // max(1, processes_per_node), f"host RAM{share}")
    if not cuda:
        return DeviceMemory(None, "no CUDA device here")
    props = torch.cuda.get_device_properties(0)  # reads the device's properties; allocates nothing
    return DeviceMemory(int(props.total_memory), props.name)


def _divisors(n: int) -> list[int]:
    return [m for m in range(1, n + 1) if n % m == 0]


def resolve_batch(
    spec: int | str | None,
    global_batch_size: int,
    world: int,
    stated_accumulate: int | None,
    memory: DeviceMemory,
    plan_for: Callable[[int, int], MemoryPlan],
) -> tuple[int, int]:
    """(micro_batch_size, accumulate) for `spec` (None, "auto" or an int), refused in one sentence when the
    batch does not divide, a stated accumulation disagrees, or the plan does not fit the device.

    `plan_for(micro, accumulate)` is the memory plan of a micro-batch.
    """
    gbs = global_batch_size
    if gbs <= 0 or gbs % world:
        raise ConfigError(
            f"global_batch_size={gbs} is not divisible by devices x num_nodes = {world}; pick a "
            f"global_batch_size that is a multiple of {world}."
        )
    share = gbs // world
    if spec is None:  # the device's whole share, or what a stated accumulation leaves of it
        accumulate = stated_accumulate or 1
        if share % accumulate:
            per_step = world * accumulate
            raise ConfigError(
                f"global_batch_size={gbs} is not divisible by devices x num_nodes x "
                f"trainer.accumulate_grad_batches = {world} x {accumulate} = {per_step}; "
                f"pick a global_batch_size that is a multiple of {per_step}."
            )
        micro = share // accumulate
    elif spec == AUTO:
        if memory.bytes is None:
            raise ConfigError(
                f"micro_batch_size=auto needs the device's memory, but there is {memory.source}; give "
                f"device_memory_gb=N (e.g. 80) to plan for the GPU the run will use, or a micro_batch_size."
            )
        fits = largest_fitting_micro_batch(
            _divisors(share), memory.bytes, AUTO_HEADROOM, lambda m: plan_for(m, share // m)
        )
        if fits is None:
            _refuse_plan(plan_for(1, share), memory, None, "micro_batch_size=auto")
        micro = fits
    else:
        micro = int(spec)
        if share % micro:
            per_step = micro * world
            raise ConfigError(
                f"global_batch_size={gbs} is not divisible by micro_batch_size x devices x num_nodes = "
                f"{micro} x {world} = {per_step}; pick a global_batch_size that is a multiple of {per_step}, "
                f"or a micro_batch_size that divides {share}."
            )
    accumulate = share // micro
    if stated_accumulate is not None and stated_accumulate != accumulate:
        raise ConfigError(
            f"trainer.accumulate_grad_batches={stated_accumulate} disagrees with global_batch_size / "
            f"(micro_batch_size x devices x num_nodes) = {gbs} / ({micro} x {world}) = {accumulate}; remove "
            f"trainer.accumulate_grad_batches (the accumulation is derived) or set micro_batch_size="
            f"{share // stated_accumulate if share % stated_accumulate == 0 else 'N'}."
        )
    if memory.bytes is not None:
        plan = plan_for(micro, accumulate)
        if not plan.fits(memory.bytes):
            fits = largest_fitting_micro_batch(
                _divisors(share), memory.bytes, 0.0, lambda m: plan_for(m, share // m)
            )
            _refuse_plan(plan, memory, fits, f"micro_batch_size={micro}")
    return micro, accumulate


def _refuse_plan(plan: MemoryPlan, memory: DeviceMemory, fits: int | None, what: str) -> None:
    """Raise the one sentence for a plan larger than the device."""
    helps = (
        "activation_checkpointing=true, a ZeRO stage (trainer=deepspeed_zero2, deepspeed_zero3 or "
        "deepspeed_zero2_offload) or more devices (trainer.devices, trainer.num_nodes)"
    )
    device = f"{memory.bytes / GIB:.1f} GiB ({memory.source})"
    if fits is None:
        raise ConfigError(
            f"the memory plan needs {plan.memory_gib:.1f} GiB per device at {what} (even a micro-batch of "
            f"{plan.micro_batch_size} does not fit) but the device has {device}; use {helps}."
        )
    raise ConfigError(
        f"the memory plan needs {plan.memory_gib:.1f} GiB per device at {what} but the device has {device}; "
        f"set micro_batch_size={fits} (the largest that fits) or micro_batch_size=auto, or use {helps}."
    )
