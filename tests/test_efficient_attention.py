"""Table 2's efficient attentions (`model.attention`): causal, cache-exact, and measured against references.

References are written here, outside the code under test: float64 causal softmax, cosFormer's masked
quadratic form, and the FLOPs formulas of the Performer, cosFormer and blockwise Linformer by hand.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from memoryformer import flops
from memoryformer.checkpoint import export_model, load_model
from memoryformer.conf_schema import register_configs
from memoryformer.config import ConfigError, ModelConfig
from memoryformer.models import LanguageModel
from memoryformer.models.attention_cores import (
    CosformerCore,
    LinformerCore,
    PerformerCore,
    causal_linear_attention,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the paper-table printer
import paper_flops  # noqa: E402

ATTENTIONS = ["softmax", "linformer", "cosformer", "performer"]
CONF = Path(__file__).resolve().parents[1] / "conf"


def tiny(attention: str, block: str = "pythia", **overrides) -> ModelConfig:
    """Two layers, 4 heads of 16 dims; Linformer blocks of 8 compressed to 2 rows, so T = 40 crosses 5."""
    values = dict(
        block=block, vocab_size=97, n_layer=2, n_embd=64, n_head=4, block_size=48, attention=attention,
        linformer_block=8, linformer_k=2, performer_features=32,
    )
    if block == "memoryformer":
        values.update(num_tables=8, code_length=8)
    values.update(overrides)
    return ModelConfig(**values)


def seeded(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float64) -> LanguageModel:
    """A model in eval mode whose prefix sums run in chunks of 8 positions (so 40 tokens cross 5 chunks)."""
    torch.manual_seed(seed)
    model = LanguageModel(config).to(dtype).eval()
    for module in model.modules():
        if hasattr(module, "chunk"):
            module.chunk = 8
    return model


def softmax_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention in float64, written out: `[B, H, T, hs]` -> `[B, H, T, hs]`."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    t = q.shape[-2]
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def no_rotary(t: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(t, 0, dtype=dtype), torch.zeros(t, 0, dtype=dtype)


def split(y: torch.Tensor, h: int) -> torch.Tensor:
    """`[B, T, H * hs]` -> `[B, H, T, hs]`."""
    b, t, d = y.shape
    return y.view(b, t, h, d // h).transpose(1, 2)


# ------------------------------------------------------------------------------ causality and cache
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_a_later_token_never_changes_an_earlier_output(attention):
    model = seeded(tiny(attention))
    idx = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[:, 17] = (changed[:, 17] + 1) % 97
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.equal(a[:, :17], b[:, :17])  # exactly: no later position enters, not even via a stabiliser
    assert (a[:, 17] - b[:, 17]).abs().max() > 1e-6
    assert (a[:, 18:] - b[:, 18:]).abs().amax(dim=-1).min() > 1e-9  # every later position moves


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_causal_in_training_mode_too(attention):
    model = seeded(tiny(attention)).train()
    idx = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(2))
    changed = idx.clone()
    changed[:, 30] = (changed[:, 30] + 5) % 97
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.equal(a[:, :30], b[:, :30])


@pytest.mark.parametrize("block", ["pythia", pytest.param("memoryformer", marks=pytest.mark.slow)])
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_cached_decoding_equals_the_full_forward(attention, block):
    # float64 for the Pythia block: agreement to 1e-10 means the same sums, not just close ones. The
    # MemoryFormer block's lookups run in float32, so 1e-5 there.
    dtype = torch.float64 if block == "pythia" else torch.float32
    model = seeded(tiny(attention, block=block), dtype=dtype)
    idx = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_kv_cache()
        pieces = [model(idx[:, :13], kv_cache=cache)[0]]  # prompt
        pieces += [model(idx[:, i: i + 1], kv_cache=cache)[0] for i in range(13, 23)]  # token by token
        pieces.append(model(idx[:, 23:40], kv_cache=cache)[0])  # a chunked continuation across chunks
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=tol, atol=tol)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_generate_with_cache_equals_without(attention):
    model = seeded(tiny(attention, block_size=16, n_layer=1), dtype=torch.float32)
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(4))
    # 14 new tokens run past block_size (16): the cache is reset and refilled from the cropped window.
    cached = model.generate(prompt, 14, greedy=True)
    assert torch.equal(cached, model.generate(prompt, 14, greedy=True, use_cache=False))


def test_recurrent_cache_holds_constant_memory():
    model = seeded(tiny("cosformer"))
    cache = model.new_kv_cache()
    with torch.no_grad():
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)
        shapes = [tuple(t.shape) for s in cache.states for t in s]
        model(torch.zeros(1, 20, dtype=torch.long), kv_cache=cache)
    assert [tuple(t.shape) for s in cache.states for t in s] == shapes  # (S [1, 4, 32, 16], z [1, 4, 32])
    assert shapes[0] == (1, 4, 32, 16) and cache.keys == [None, None]
    cache.reset()
    assert cache.states == [None, None] and cache.length == 0


# ------------------------------------------------------------------------------ each attention's math
def test_cosformer_prefix_sums_equal_its_quadratic_form():
    config = tiny("cosformer")
    core = CosformerCore(config)
    gen = torch.Generator().manual_seed(5)
    b, h, t, hs, start = 2, 4, 37, 16, 5
    q, k, v = (torch.randn(b, h, t, hs, generator=gen, dtype=torch.float64) for _ in range(3))
    fq, fk = core.features(q, k, start)
    out, _ = causal_linear_attention(fq, fk, v, eps=1e-12, chunk=8)
    # cosFormer's similarity written directly: ReLU(q_i).ReLU(k_j) cos(pi/2 (i - j) / M), j <= i,
    # at absolute positions start + i, with M = block_size = 48.
    pos = torch.arange(start, start + t, dtype=torch.float64)
    weight = torch.cos(math.pi / 2 * (pos[:, None] - pos[None, :]) / 48)
    sim = (torch.relu(q) @ torch.relu(k).transpose(-1, -2)) * weight
    sim = sim * torch.ones(t, t, dtype=torch.bool).tril()
    # the same floor as the code (a row whose ReLU features never overlap has a zero denominator)
    expected = (sim @ v) / sim.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_linear_attention_state_carries_across_calls():
    gen = torch.Generator().manual_seed(6)
    fq, fk = (torch.rand(1, 2, 30, 6, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, 2, 30, 4, generator=gen, dtype=torch.float64)
    whole, (s, z) = causal_linear_attention(fq, fk, v, chunk=7)
    first, state = causal_linear_attention(fq[:, :, :11], fk[:, :, :11], v[:, :, :11], chunk=4)
    second, _ = causal_linear_attention(fq[:, :, 11:], fk[:, :, 11:], v[:, :, 11:], state, chunk=5)
    torch.testing.assert_close(torch.cat((first, second), dim=2), whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s[0], fk[0].transpose(-1, -2) @ v[0], rtol=1e-12, atol=1e-12)  # sum fk v^T
    torch.testing.assert_close(z[0], fk[0].sum(dim=-2), rtol=1e-12, atol=1e-12)


def _performer_error(m: int, seed: int) -> float:
    config = tiny("performer", performer_features=m)
    gen = torch.Generator().manual_seed(100 + seed)
    # q, k ~ N(0, 1/4): |q + k|^2 / sqrt(hs) stays near 2, where the positive estimator's variance
    # (about exp(|q + k|^2 / sqrt(hs)) / m, relative) lets a few thousand features get close.
    q, k = (0.5 * torch.randn(1, 4, 64, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, 4, 64, 16, generator=gen, dtype=torch.float64)
    torch.manual_seed(seed)
    core = PerformerCore(config).double()
    out = split(core(q, k, v, *no_rotary(64)), 4)
    return float((out - softmax_reference(q, k, v)).abs().mean())


def test_performer_estimate_improves_with_more_features():
    # FAVOR+'s error falls roughly as 1 / sqrt(m); mean over 3 seeds of features and data.
    errors = {m: sum(_performer_error(m, s) for s in range(3)) / 3 for m in (16, 256, 2048)}
    assert errors[16] > errors[256] > errors[2048]
    assert errors[2048] < 0.02  # measured ~0.009; 1 / sqrt(m) from m = 16 predicts ~0.006


def test_performer_features_are_bounded_and_finite_for_large_inputs():
    config = tiny("performer")
    core = PerformerCore(config)
    x = 30.0 * torch.randn(1, 4, 16, 16)  # logits near 10^2: the unstabilised exp overflows float32 here
    fq, fk = core.features(x, x, 0)
    assert torch.isfinite(fq).all() and torch.isfinite(fk).all()
    assert fq.max() <= 1.0 and fk.max() <= 1.0 + 1e-6


def test_linformer_with_block_at_least_t_is_exact_causal_softmax():
    config = tiny("linformer", linformer_block=64)
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 4, 40, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    core = LinformerCore(config).double()
    out = split(core(q, k, v, *no_rotary(40)), 4)
    torch.testing.assert_close(out, softmax_reference(q, k, v), rtol=1e-12, atol=1e-12)
    # and the whole model equals the softmax model with the same weights (E, F unused)
    soft = seeded(tiny("softmax"))
    lin = LanguageModel(tiny("linformer", linformer_block=48)).double().eval()
    missing = lin.load_state_dict(soft.state_dict(), strict=False).missing_keys
    assert sorted(missing) == sorted(f"blocks.{i}.attn.core.{p}" for i in range(2) for p in "EF")
    idx = torch.randint(0, 97, (2, 40), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(lin(idx)[0], soft(idx)[0], rtol=1e-12, atol=1e-12)


def test_linformer_block_reads_compressed_earlier_blocks():
    # A query of block 2 (positions 16..23, L = 8) sees exact softmax over [E K_0, E K_1, k_16..k_i].
    config = tiny("linformer")
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 4, 24, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    core = LinformerCore(config).double()
    out = split(core(q, k, v, *no_rotary(24)), 4)
    E, Fm = core.E.detach(), core.F.detach()
    i = 19
    keys = torch.cat((E @ k[:, :, 0:8], E @ k[:, :, 8:16], k[:, :, 16: i + 1]), dim=2)
    vals = torch.cat((Fm @ v[:, :, 0:8], Fm @ v[:, :, 8:16], v[:, :, 16: i + 1]), dim=2)
    w = torch.softmax(q[:, :, i: i + 1] @ keys.transpose(-1, -2) / 4.0, dim=-1)
    torch.testing.assert_close(out[:, :, i: i + 1], w @ vals, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------ Performer features
def test_performer_features_live_in_the_state_dict_and_survive_export(tmp_path):
    config = tiny("performer")
    model = seeded(config, seed=11, dtype=torch.float32)
    key = "blocks.0.attn.core.feature_matrix"
    assert model.state_dict()[key].shape == (32, 16)
    assert not torch.equal(model.state_dict()[key], model.state_dict()["blocks.1.attn.core.feature_matrix"])
    twin = seeded(config, seed=11, dtype=torch.float32)
    assert torch.equal(twin.state_dict()[key], model.state_dict()[key])  # same seed, same features
    other = seeded(config, seed=12, dtype=torch.float32)
    assert not torch.equal(other.state_dict()[key], model.state_dict()[key])
    loaded, _ = load_model(export_model(model, tmp_path / "export"))
    for module in loaded.modules():
        if hasattr(module, "chunk"):
            module.chunk = 8  # the same summation order as `model`, so outputs agree exactly
    assert torch.equal(loaded.state_dict()[key], model.state_dict()[key])
    idx = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)


def test_performer_redraw_is_deterministic_and_off_by_default():
    off = seeded(tiny("performer"), seed=3)
    before = off.blocks[0].attn.core.feature_matrix.clone()
    off.begin_training_step(1000)
    assert torch.equal(off.blocks[0].attn.core.feature_matrix, before)
    a = seeded(tiny("performer", performer_redraw_interval=2), seed=3)
    b = seeded(tiny("performer", performer_redraw_interval=2), seed=3)
    core = a.blocks[0].attn.core
    a.begin_training_step(1)
    assert torch.equal(core.feature_matrix, before.to(core.feature_matrix.dtype))
    for step in range(2, 6):
        a.begin_training_step(step)
    assert int(core.feature_draw) == 2 and not torch.equal(core.feature_matrix, before)
    b.begin_training_step(5)  # a resumed run jumps straight to step 5 and gets the same features
    assert torch.equal(b.blocks[0].attn.core.feature_matrix, core.feature_matrix)


# ------------------------------------------------------------------------------ training and precision
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_one_training_step_gives_a_finite_loss_and_gradients(attention):
    config = ModelConfig.from_name("nano", block="pythia", attention=attention, block_size=64,
                                   linformer_block=16, linformer_k=4, performer_redraw_interval=1)
    torch.manual_seed(0)
    model = LanguageModel(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, config.vocab_size, (2, 64))
    model.begin_training_step(0)
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if attention == "linformer":
        assert model.blocks[0].attn.core.E.grad.abs().sum() > 0
    opt.step()


@pytest.mark.parametrize("attention", ["cosformer", "performer"])
def test_bf16_autocast_keeps_prefix_sums_in_float32(attention):
    model = seeded(tiny(attention), dtype=torch.float32)
    idx = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref, _ = model(idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, _ = model(idx)
    assert torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()


# ------------------------------------------------------------------------------ FLOPs
def test_flops_of_the_three_attentions_match_formulas_by_hand():
    s, d, h, hs = 2048, 1024, 16, 64
    dense = 12 * s * d * d
    costs = {r["row"]: r for r in paper_flops.table2_rows(s)}
    # Performer, m = int(64 ln 64) = 266: W q and W k (2 m hs), S update and read-out (2 m hs), z (2 m).
    m = 266
    assert costs["performer_410m"]["attention_flops"] == s * h * (4 * m * hs + 2 * m)
    # cosFormer: 2 hs features; cos/sin re-weighting of q and k (4 hs), S (2 * 2hs * hs), z (2 * 2hs).
    assert costs["cosformer_410m"]["attention_flops"] == s * h * (4 * hs * hs + 4 * hs + 4 * hs)
    # Linformer, L = 256, k = 64, 8 blocks: block b scores 256 own + 64 b compressed rows per query,
    # sum_b 256 (256 + 64 b) = 8 * 256^2 + 256 * 64 * 28; compressing K and V of 7 blocks: 2 * 7 * 64 * 256.
    pairs = 8 * 256 * 256 + 256 * 64 * 28
    assert costs["linformer_410m"]["attention_flops"] == 2 * pairs * d + 2 * 7 * 64 * 256 * d
    assert costs["pythia_410m"]["attention_flops"] == 2 * s * s * d
    for r in costs.values():
        assert r["total_exact"] == dense + r["attention_flops"]
    # A length that is not a multiple of L: blocks of 256, 256 and 88 positions.
    core_cfg = ModelConfig.from_name("pythia_410m", attention="linformer")
    cost = flops.model_cost(core_cfg, 600).block
    assert cost.attention == 2 * d * (256 * 256 + 256 * (256 + 64) + 88 * (88 + 128)) + 2 * 2 * 64 * 256 * d


def test_flops_tool_prints_table2_with_the_papers_numbers(capsys):
    assert paper_flops.main(["--model", "pythia_410m"]) == 0
    out = capsys.readouterr().out
    assert "## Table 2" in out
    for row, paper in (("linformer_410m", "26.1"), ("cosformer_410m", "30.0"), ("performer_410m", "26.7")):
        line = next(line for line in out.splitlines() if line.startswith(f"| `{row}`"))
        assert f"| {paper} |" in line
    performer = next(r for r in paper_flops.table2_rows() if r["row"] == "performer_410m")
    # 25.770 G dense + m * 2048 * 16 * (4 * 64 + 2) rounds to 26.7 G for m = 105..115
    assert performer["reproduces_paper"].startswith("m = 105..115")


# ------------------------------------------------------------------------------ config
def test_unknown_attention_fails_with_one_sentence():
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_name("pythia_70m", attention="flash")
    message = str(err.value)
    assert "model.attention='flash'" in message and "softmax, linformer, cosformer, performer" in message
    assert message.count(". ") == 0 and message.endswith(".")


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (dict(performer_features=-1), "model.performer_features"),
        (dict(linformer_k=0), "model.linformer_k"),
        (dict(linformer_block=0), "model.linformer_block"),
        (dict(cosformer_m=100), "model.cosformer_m"),
    ],
)
def test_bad_attention_knobs_name_their_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        ModelConfig.from_name("pythia_70m", **overrides)


def test_default_feature_count_is_hs_ln_hs():
    assert ModelConfig.from_name("pythia_410m").performer_num_features == int(64 * math.log(64)) == 266
    assert ModelConfig.from_name("pythia_410m", performer_features=128).performer_num_features == 128
    assert ModelConfig.from_name("pythia_410m").cosformer_horizon == 2048


@pytest.mark.parametrize("attention", ["linformer", "cosformer", "performer"])
def test_table2_experiments_are_pythia_410m_with_only_the_attention_swapped(attention):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={attention}_410m", "paths.output_dir=/tmp/mf_t2"])
        base = compose("config", overrides=["experiment=pythia_410m", "paths.output_dir=/tmp/mf_t2"])
    assert ModelConfig.from_dict(OmegaConf.to_container(cfg.model)).attention == attention
    ours, theirs = OmegaConf.to_container(cfg), OmegaConf.to_container(base)
    for c in (ours, theirs):
        del c["name"], c["model"]["name"], c["model"]["attention"]
    assert ours == theirs
    # it inherits the recipe (and its precision note) instead of restating it
    spec = OmegaConf.load(CONF / "experiment" / f"{attention}_410m.yaml")
    assert list(spec.defaults) == ["pythia_410m", "_self_"]
