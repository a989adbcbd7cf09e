"""Tests of `memoryformer.models`: shapes, causality, KV cache, shared hash, Table 5 shapes, init, training.

Reference numbers come from outside the model code: the paper's Table 5 and the released code's
initialisation (docs/paper-notes.md §3 and §4), float64 formulas and independent implementations written here.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memoryformer.config import ModelConfig
from memoryformer.models import KVCache, LanguageModel, build_model
from memoryformer.models.blocks import MLP, MemoryBlock, MemoryFormerBlock, PythiaBlock
from memoryformer.nn.memory_layer import MemoryLayer
from memoryformer.nn.norms import RMSNorm
from memoryformer.nn.rotary import apply_rotary, rotary_cos_sin
from memoryformer.training.parallel import apply_activation_checkpointing, checkpointed_blocks


def tiny(block: str = "memoryformer", **overrides) -> ModelConfig:
    """A model small enough for many forwards per second on CPU."""
    values = dict(block=block, vocab_size=97, n_layer=2, n_embd=64, n_head=4, block_size=24)
    if block == "memoryformer":
        values.update(num_tables=8, code_length=8)
    values.update(overrides)
    return ModelConfig(**values)


def seeded(config: ModelConfig, seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(config).eval()


BLOCKS = ["memoryformer", "pythia"]


# --------------------------------------------------------------------------- building blocks
def test_rmsnorm_matches_released_formula_in_float64():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-8)
    with torch.no_grad():
        norm.scale.copy_(torch.linspace(0.5, 1.5, 16))
    x = torch.randn(3, 5, 16)
    x64 = x.double()
    # GPT-NeoX RMSNorm: eps is added to the RMS, outside the square root.
    rms = (x64.pow(2).sum(-1, keepdim=True) / 16).sqrt()
    expected = norm.scale.double() * x64 / (rms + 1e-8)
    torch.testing.assert_close(norm(x).double(), expected, rtol=1e-6, atol=1e-6)
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_rotary_is_a_rotation_of_dim_pairs_i_and_i_plus_half():
    torch.manual_seed(0)
    head_size, rotary, base = 16, 4, 10000.0
    x = torch.randn(2, 3, 7, head_size)
    cos, sin = rotary_cos_sin(torch.arange(7), rotary, base)
    y = apply_rotary(x, cos, sin)
    # Independent reference: complex multiplication of (x_i + i x_{i+r/2}) by exp(i * pos * base^(-2i/r)).
    half = rotary // 2
    pos = torch.arange(7, dtype=torch.float64)[:, None]
    theta = pos * base ** (-torch.arange(half, dtype=torch.float64) * 2 / rotary)
    z = torch.complex(x[..., :half].double(), x[..., half:rotary].double()) * torch.polar(
        torch.ones_like(theta), theta
    )
    expected = torch.cat((z.real, z.imag, x[..., rotary:].double()), dim=-1)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- forward
@pytest.mark.parametrize("block", BLOCKS)
def test_forward_shapes_and_loss_against_float64_cross_entropy(block):
    config = tiny(block)
    model = seeded(config)
    idx = torch.randint(0, config.vocab_size, (3, 10))
    targets = torch.randint(0, config.vocab_size, (3, 10))
    targets[0, :4] = -100
    logits, loss = model(idx)[0], model(idx, targets)[1]
    assert logits.shape == (3, 10, config.vocab_size)
    logp = torch.log_softmax(logits.double(), dim=-1)
    keep = targets != -100
    expected = -logp[keep].gather(-1, targets[keep][:, None]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert model(idx)[1] is None
    assert math.log(config.vocab_size) == pytest.approx(loss.item(), rel=0.2)  # near uniform at init


@pytest.mark.parametrize("block", BLOCKS)
def test_whole_model_is_causal(block):
    config = tiny(block)
    model = seeded(config)
    idx = torch.randint(0, config.vocab_size, (2, 16))
    t = 9
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % config.vocab_size
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert (a[:, t:] - b[:, t:]).abs().amax() > 1e-3  # the change is visible from t on


def test_block_size_is_enforced():
    config = tiny()
    model = seeded(config)
    with pytest.raises(ValueError, match="block_size=24"):
        model(torch.zeros(1, 25, dtype=torch.long))


# --------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("block", BLOCKS)
def test_cached_forward_in_chunks_equals_one_full_forward(block):
    config = tiny(block)
    model = seeded(config)
    idx = torch.randint(0, config.vocab_size, (2, 20))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_kv_cache()
        pieces = [model(idx[:, a:b], kv_cache=cache)[0] for a, b in ((0, 7), (7, 8), (8, 15), (15, 20))]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", BLOCKS)
def test_greedy_generation_with_cache_equals_full_recomputation(block):
    config = tiny(block, block_size=16)
    model = seeded(config)
    prompt = torch.randint(0, config.vocab_size, (2, 5))
    # 20 new tokens run past block_size (16), so the cropped window and the cache rebuild are exercised.
    cached = model.generate(prompt, 20, greedy=True)
    recomputed = model.generate(prompt, 20, greedy=True, use_cache=False)
    assert cached.shape == (2, 25)
    assert torch.equal(cached, recomputed)
    # And an independent loop: argmax of the full forward over the last 16 tokens, step by step.
    seq = prompt
    with torch.no_grad():
        for _ in range(20):
            logits, _ = model(seq[:, -16:])
            seq = torch.cat((seq, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(cached, seq)


def test_temperature_zero_and_top_k_one_are_greedy_and_eos_stops():
    config = tiny()
    model = seeded(config)
    prompt = torch.randint(0, config.vocab_size, (2, 4))
    greedy = model.generate(prompt, 6, greedy=True)
    assert torch.equal(model.generate(prompt, 6, temperature=0.0), greedy)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(prompt, 6, temperature=0.7, top_k=1, generator=gen), greedy)
    eos = int(greedy[0, 5])  # the second generated token of row 0
    out = model.generate(prompt, 6, greedy=True, eos_token_id=eos)
    assert out[0, 5] == eos
    assert (out[0, 5:] == eos).all()  # a finished row keeps emitting eos


def test_sampling_is_reproducible_and_respects_top_k():
    config = tiny()
    model = seeded(config)
    prompt = torch.randint(0, config.vocab_size, (4, 3))
    a = model.generate(prompt, 8, temperature=1.5, top_k=5, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 8, temperature=1.5, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with torch.no_grad():  # every sampled token is among the 5 most likely at its step
        logits, _ = model(a[:, :-1])
    top5 = logits[:, 2:].topk(5, dim=-1).indices
    assert (top5 == a[:, 3:, None]).any(-1).all()


def test_kv_cache_refuses_overflow():
    cache = KVCache(n_layer=1, max_len=4)
    k = torch.zeros(1, 2, 3, 8)
    cache.update(0, k, k)
    cache.advance(3)
    with pytest.raises(ValueError, match="holds 4 positions"):
        cache.update(0, k, k)


# --------------------------------------------------------------------------- MemoryFormer block
def test_one_qkv_lookup_equals_three_layers_sharing_one_hash_in_float64():
    # The previous path: three d -> d Memory Layers Q, K, V; Q hashes x once, all three look up with it.
    config = tiny()
    attn = seeded(config).double().blocks[0].attn
    d = config.n_embd
    assert isinstance(attn.qkv, MemoryLayer) and attn.qkv.tables.shape[1] == 3 * d
    parts = []
    for i in range(3):
        layer = MemoryLayer(d, d, code_length=config.code_length, dtype=torch.float64)
        with torch.no_grad():
            layer.tables.copy_(attn.qkv.tables[:, i * d:(i + 1) * d])
            layer.bias.copy_(attn.qkv.bias[i * d:(i + 1) * d])
        parts.append(layer)
    x = torch.randn(2, 5, d, dtype=torch.float64)
    x_ref = x.clone().requires_grad_(True)
    hashed = parts[0].hash(x_ref)
    reference = [layer(x_ref, hashed=hashed) for layer in parts]
    x.requires_grad_(True)
    merged = attn.qkv(x).split(d, dim=-1)
    for got, want in zip(merged, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    upstream = [torch.randn_like(y) for y in reference]
    torch.autograd.backward(reference, upstream)
    torch.autograd.backward(merged, upstream)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    ref_tables = torch.cat([layer.tables.grad for layer in parts], dim=1)
    ref_bias = torch.cat([layer.bias.grad for layer in parts])
    torch.testing.assert_close(attn.qkv.tables.grad, ref_tables, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(attn.qkv.bias.grad, ref_bias, rtol=1e-12, atol=1e-12)


def test_qkv_initialises_as_three_layers_drawn_in_turn():
    # Q, K, V as three d -> d Memory Layers, each reset in turn (tables, then bias) from the same seed: the
    # merged layer's blocks are those draws, so runs trained before the merge retrain to the same weights
    from memoryformer.models.init import _init_side_by_side, small_init_std

    config = tiny()
    d, std = config.n_embd, small_init_std(config.n_embd)
    merged = MemoryLayer(d, 3 * d, code_length=config.code_length)
    torch.manual_seed(7)
    _init_side_by_side(merged, std, parts=3)
    torch.manual_seed(7)
    parts = [MemoryLayer(d, d, code_length=config.code_length) for _ in range(3)]
    torch.manual_seed(7)
    for layer in parts:
        layer.init_std = std
        layer.reset_parameters()
    assert torch.equal(merged.tables, torch.cat([layer.tables for layer in parts], dim=1))
    assert torch.equal(merged.bias, torch.cat([layer.bias for layer in parts]))
    assert merged.tables.std().item() == pytest.approx(std, rel=0.05)


def test_qkv_hashes_once_per_block(monkeypatch):
    config = tiny()
    model = seeded(config)
    qkv_layers = {id(block.attn.qkv) for block in model.blocks}
    hashed: list[int] = []
    original_hash = MemoryLayer.hash

    def counting_hash(self, x):
        hashed.append(id(self))
        return original_hash(self, x)

    monkeypatch.setattr(MemoryLayer, "hash", counting_hash)
    with torch.enable_grad():
        model(torch.randint(0, config.vocab_size, (1, 6)))
    assert sorted(h for h in hashed if h in qkv_layers) == sorted(qkv_layers)  # one hash per block
    assert len(hashed) == 3 * config.n_layer  # plus one for each Memory Block layer


@pytest.mark.parametrize(
    "expand_bits, mb_mb", [(0, 33.6), (1, 52.4), (2, 88.1), (3, 157.3)]  # paper Table 5
)
def test_expand_bits_gives_table5_memory_block_shapes(expand_bits, mb_mb):
    with torch.device("meta"):
        model = build_model("mf_tiny", expand_bits=expand_bits)
    ffn = model.blocks[0].ffn
    assert isinstance(ffn, MemoryBlock)
    k, tau_prime = 64, 8 + expand_bits
    # Stored as K stacked tables: T^{M1}_k in R^{256 x (8+e)*64}, T^{M2}_k in R^{2^(8+e) x 512}.
    assert ffn.layer1.tables.shape == (k * 256, tau_prime * 64)
    assert ffn.layer2.tables.shape == (k * 2**tau_prime, 512)
    assert ffn.layer2.code_length == tau_prime and ffn.layer1.code_length == 8
    assert ffn.norm.normalized_shape == (tau_prime * 64,) and ffn.norm.eps == 1e-5
    memory_mb = (ffn.layer1.storage_bytes_fp16 + ffn.layer2.storage_bytes_fp16) / 1e6
    assert round(memory_mb, 1) == mb_mb
    # Q/K/V: d -> d Memory Layers of 16.8 MB each (Table 3, tau = 8 row); no output projection.
    attn = model.blocks[0].attn
    assert isinstance(attn.qkv, MemoryLayer) and attn.qkv.tables.shape == (64 * 256, 3 * 512)
    assert round(attn.qkv.storage_bytes_fp16 / 3 / 1e6, 1) == 16.8
    assert not any(isinstance(m, nn.Linear) for m in model.blocks[0].modules())


@pytest.mark.parametrize(
    "overrides, attn_type, ffn_type",
    [
        (dict(qkv="linear"), nn.Linear, MemoryBlock),
        (dict(ffn="mlp"), MemoryLayer, MLP),
        (dict(qkv="linear", ffn="mlp", norm="layernorm"), nn.Linear, MLP),
        (dict(weighting="prob", temperature=0.5, memory_bias=False, expand_bits=0), MemoryLayer, MemoryBlock),
    ],
)
def test_memoryformer_variants_build_and_train(overrides, attn_type, ffn_type):
    config = tiny(**overrides)
    model = seeded(config).train()
    block = model.blocks[0]
    assert isinstance(block, MemoryFormerBlock)
    assert isinstance(block.attn.qkv, attn_type) and isinstance(block.ffn, ffn_type)
    if config.norm == "layernorm":
        assert isinstance(block.norm1, nn.LayerNorm) and isinstance(model.norm_f, nn.LayerNorm)
    else:
        assert isinstance(block.norm1, RMSNorm) and block.norm1.eps == 1e-8
    idx = torch.randint(0, config.vocab_size, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss)
    grad = block.attn.qkv.tables.grad if attn_type is MemoryLayer else block.attn.qkv.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_pythia_block_structure():
    model = seeded(tiny("pythia"))
    block = model.blocks[0]
    assert isinstance(block, PythiaBlock)
    assert block.attn.query_key_value.weight.shape == (3 * 64, 64)
    assert block.attn.query_key_value.bias is not None and block.attn.dense.bias is not None
    assert block.ffn.fc_in.weight.shape == (256, 64)
    assert model.lm_head.bias is None
    assert model.lm_head.weight.data_ptr() != model.wte.weight.data_ptr()


# --------------------------------------------------------------------------- init
def test_init_follows_released_code():
    torch.manual_seed(0)
    # MF-tiny width (d = 512, K = 64) with one layer and a small vocabulary, to keep it fast.
    model = build_model("mf_tiny", n_layer=1, vocab_size=2048)
    block = model.blocks[0]
    # docs/paper-notes.md §4: small_init std 0.0280 at d = 512 for embeddings, LM head and Q/K/V tables.
    attn = block.attn
    q_tables, v_tables = attn.qkv.tables[:, :512], attn.qkv.tables[:, 1024:]
    for tensor in (model.wte.weight, model.lm_head.weight, q_tables, v_tables):
        assert round(tensor.std().item(), 4) == pytest.approx(0.0280, abs=2e-4)
    for tensor in (block.ffn.layer1.tables, block.ffn.layer2.tables):  # Memory Block keeps N(0, 0.02)
        assert tensor.std().item() == pytest.approx(0.02, rel=0.01)
    assert block.attn.qkv.bias[512:1024].std().item() == pytest.approx(0.001, rel=0.2)  # 0.001 * N(0, 1)
    assert torch.equal(block.norm1.scale, torch.ones(512))
    assert torch.equal(block.ffn.norm.weight, torch.ones(640))
    assert torch.equal(block.ffn.norm.bias, torch.zeros(640))


def test_pythia_init_uses_wang_init_for_output_layers():
    torch.manual_seed(0)
    model = build_model("pythia_70m", vocab_size=2048, n_layer=6)
    block = model.blocks[0]
    small, wang = math.sqrt(2 / (5 * 512)), 2 / (6 * math.sqrt(512))
    assert block.attn.query_key_value.weight.std().item() == pytest.approx(small, rel=0.01)
    assert block.ffn.fc_in.weight.std().item() == pytest.approx(small, rel=0.01)
    assert block.attn.dense.weight.std().item() == pytest.approx(wang, rel=0.01)
    assert block.ffn.fc_out.weight.std().item() == pytest.approx(wang, rel=0.01)
    assert not block.attn.query_key_value.bias.any() and not block.ffn.fc_out.bias.any()


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("every", [1, 2])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(every):
    config = tiny()
    idx = torch.randint(0, config.vocab_size, (2, 12))
    grads = []
    for enabled in (False, True):
        model = seeded(config).train()
        keys = list(model.state_dict())
        if enabled:  # applied from the training side; the model's forward knows nothing of it
            assert apply_activation_checkpointing(model, every=every) == list(range(0, config.n_layer, every))
            apply_activation_checkpointing(model, every=every)  # a second call changes nothing
        assert checkpointed_blocks(model) == (list(range(0, config.n_layer, every)) if enabled else [])
        assert list(model.state_dict()) == keys
        _, loss = model(idx, idx)
        loss.backward()
        tables = model.blocks[0].attn.qkv.tables
        grads.append((loss.item(), tables.grad.clone(), model.wte.weight.grad.clone()))
        copied = copy.deepcopy(model)
        assert checkpointed_blocks(copied) == checkpointed_blocks(model)
        assert all(b.__dict__["forward"].block is b for b in copied.blocks if "forward" in b.__dict__)
        with torch.no_grad():  # decoding with a KV cache never recomputes (it would append twice)
            torch.testing.assert_close(model.generate(idx[:, :3], 4, greedy=True),
                                       model.generate(idx[:, :3], 4, greedy=True, use_cache=False))
    assert grads[0][0] == grads[1][0]
    torch.testing.assert_close(grads[0][1], grads[1][1])
    torch.testing.assert_close(grads[0][2], grads[1][2])
    with pytest.raises(ValueError, match="every=0 must be an int >= 1"):
        apply_activation_checkpointing(seeded(config), every=0)


def test_training_module_applies_activation_checkpointing_every_nth_block():
    from memoryformer.training.module import LMTrainingModule
    from memoryformer.training.optim import OptimConfig

    config = tiny(n_layer=3).to_dict()
    optim = dataclasses.asdict(OptimConfig())
    for enabled, every, expected in ((False, 1, []), (True, 1, [0, 1, 2]), (True, 2, [0, 2])):
        module = LMTrainingModule(config, optim, max_steps=1, activation_checkpointing=enabled,
                                  activation_checkpointing_every=every)
        assert checkpointed_blocks(module.model) == expected


def test_nano_overfits_one_batch():
    torch.manual_seed(0)
    model = build_model("nano").train()
    batch = torch.randint(0, model.config.vocab_size, (4, 33))
    inputs, targets = batch[:, :-1], batch[:, 1:]
    # lr 1e-2 crosses 10% in under 10 steps (3e-3, MF-tiny's LR, needs about 14): keeps the test short.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(300):
        _, loss = model(inputs, targets)
        first = loss.item() if first is None else first
        if loss.item() < 0.1 * first:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert first == pytest.approx(math.log(4096), rel=0.1)
    assert loss.item() < 0.1 * first


# --------------------------------------------------------------------------- build_model
def test_build_model_accepts_name_config_and_mapping():
    assert build_model("nano", block_size=64).config.block_size == 64
    config = tiny()
    assert build_model(config).config is config
    assert build_model(config, n_layer=1).config.n_layer == 1
    assert build_model(config.to_dict()).num_parameters() == build_model(config).num_parameters()
    with pytest.raises(TypeError, match="ModelConfig, a preset name or a mapping"):
        build_model(3)


def test_num_parameters_excludes_embedding_and_head():
    model = seeded(tiny("pythia"))
    assert model.num_parameters() - model.num_parameters(exclude_embeddings=True) == 2 * 97 * 64
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())


def test_bf16_forward_runs():
    model = seeded(tiny()).to(torch.bfloat16)
    idx = torch.randint(0, 97, (1, 8))
    logits, loss = model(idx)[0], model(idx, torch.randint(0, 97, (1, 8)))[1]
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert F.softmax(logits.float(), -1).sum(-1).sub(1).abs().max() < 1e-3
