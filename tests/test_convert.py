"""`memoryformer.models.convert`: our Pythia block is numerically Hugging Face's `GPTNeoXForCausalLM`.

The reference is transformers' own implementation, built from a `GPTNeoXConfig` with random weights (no
download): logits must agree to 1e-5 in float32, in both conversion directions and through
`save_pretrained` / `from_hf(dir)`.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from memoryformer.config import ConfigError, ModelConfig
from memoryformer.models import LanguageModel
from memoryformer.models.convert import config_from_hf, from_hf, hf_key_map, to_hf

PYTHIA_70M = dict(
    vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048,
    rotary_pct=0.25, rotary_emb_base=10000, max_position_embeddings=2048, use_parallel_residual=True,
    layer_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="gelu",
)
SMALL = dict(PYTHIA_70M, vocab_size=211, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=256, max_position_embeddings=64)


def random_hf(seed: int = 0, **config) -> GPTNeoXForCausalLM:
    """A GPT-NeoX model with random weights and, unlike HF's init, random biases and norms; eval mode."""
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # matrices are already N(0, 0.02); biases start at 0 and norms at 1
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_logits(model: GPTNeoXForCausalLM, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits


def our_logits(model: LanguageModel, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)[0]


@pytest.mark.parametrize("parallel", [True, False])
def test_small_gpt_neox_round_trip_logits_agree(parallel):
    hf = random_hf(**dict(SMALL, use_parallel_residual=parallel))
    idx = torch.randint(0, 211, (3, 40))
    expected = hf_logits(hf, idx)
    ours = from_hf(hf).eval()
    assert ours.config.block == "pythia" and ours.config.parallel_residual is parallel
    torch.testing.assert_close(our_logits(ours, idx), expected, rtol=0, atol=1e-5)
    back = to_hf(ours).eval()
    torch.testing.assert_close(hf_logits(back, idx), expected, rtol=0, atol=1e-5)
    for name, tensor in hf.state_dict().items():
        if name in back.state_dict():
            assert torch.equal(back.state_dict()[name], tensor), name


def test_pythia_70m_shape_matches_hf():
    hf = random_hf(**PYTHIA_70M)
    idx = torch.randint(0, 50304, (2, 32))
    expected = hf_logits(hf, idx)
    ours = from_hf(hf).eval()
    assert ours.num_parameters() == 70_426_624  # EleutherAI's Pythia-70M total
    assert ours.config.rotary_ndims == 16 and ours.config.rotary_base == 10000
    torch.testing.assert_close(our_logits(ours, idx), expected, rtol=0, atol=1e-5)
    del hf
    back = to_hf(ours).eval()
    torch.testing.assert_close(hf_logits(back, idx), expected, rtol=0, atol=1e-5)


def test_save_pretrained_and_load_from_directory(tmp_path):
    hf = random_hf(**SMALL)
    hf.save_pretrained(tmp_path)
    idx = torch.randint(0, 211, (2, 16))
    ours = from_hf(tmp_path).eval()
    torch.testing.assert_close(our_logits(ours, idx), hf_logits(hf, idx), rtol=0, atol=1e-5)
    out_dir = tmp_path / "back"
    to_hf(ours).save_pretrained(out_dir)
    reloaded = GPTNeoXForCausalLM.from_pretrained(out_dir, local_files_only=True).eval()
    torch.testing.assert_close(hf_logits(reloaded, idx), hf_logits(hf, idx), rtol=0, atol=1e-5)


def test_greedy_generation_matches_hf_generate():
    hf = random_hf(**SMALL)
    ours = from_hf(hf).eval()
    prompt = torch.randint(0, 211, (1, 6))
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours.generate(prompt, 12, greedy=True), expected)


def test_key_map_covers_every_parameter_once():
    config = ModelConfig.from_name("pythia_70m", vocab_size=128, n_layer=2)
    with torch.device("meta"):
        model = LanguageModel(config)
    key_map = hf_key_map(2)
    assert set(key_map) == set(model.state_dict())
    assert len(set(key_map.values())) == len(key_map)


def test_config_from_hf_reads_gpt_neox_fields():
    config = config_from_hf(GPTNeoXConfig(**dict(PYTHIA_70M, rotary_pct=0.5, rotary_emb_base=500)))
    assert (config.n_layer, config.n_embd, config.n_head, config.mlp_hidden) == (6, 512, 8, 2048)
    assert config.rotary_ndims == 32 and config.rotary_base == 500 and config.block_size == 2048


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="model.block='memoryformer'"):
        to_hf(LanguageModel(ModelConfig.from_name("nano", n_layer=1)))
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        from_hf(tmp_path / "missing")
    with pytest.raises(ConfigError, match="hidden_act"):
        config_from_hf(GPTNeoXConfig(**dict(SMALL, hidden_act="relu")))
