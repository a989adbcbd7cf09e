"""The lm-eval adapter against direct computations with the model (float64 references written here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "eval"))
from eval_test_helpers import EOT, byte_tokenizer, tiny_model  # noqa: E402

from memoryformer.evaluation.lm_adapter import AdapterError, MemoryFormerLM  # noqa: E402


def _req(kind: str, args: tuple, i: int = 0) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=i, metadata=("t", i, 1))


def _direct_logprob(model, ids: list[int], n_cont: int) -> float:
    """Sum of log-softmax (float64) of the last `n_cont` tokens of `ids`, one unbatched forward pass."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    lp = torch.log_softmax(logits[0].double(), dim=-1)
    targets = torch.tensor(ids[1:])
    return float(lp[torch.arange(len(targets)), targets][-n_cont:].sum())


@pytest.fixture(scope="module")
def lm():
    return MemoryFormerLM(model=tiny_model(block_size=48), tokenizer=byte_tokenizer(), batch_size=3)


def test_loglikelihood_matches_direct_sum_for_mixed_lengths(lm):
    tok = byte_tokenizer()
    pairs = [
        ("Question: what is red?\nAnswer:", " a ripe tomato"),
        ("Hi", " there"),
        (
            "A much longer context that goes on and on, well past the model's context of forty-eight tokens.",
            " end",
        ),
        ("", "no context at all"),
        ("Trailing space ", "moves"),
        ("x", " y"),
        ("Question: what is red?\nAnswer:", " the sky"),
    ]
    got = lm.loglikelihood([_req("loglikelihood", p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    eot = tok.token_to_id(EOT)
    for (ctx, cont), (score, greedy) in zip(pairs, got, strict=True):
        if ctx == "":
            ctx_ids, cont_ids = [eot], tok.encode(cont).ids
        else:
            # lm-eval moves the context's trailing spaces into the continuation.
            stripped = ctx.rstrip()
            cont = ctx[len(stripped) :] + cont
            ctx_ids, cont_ids = tok.encode(stripped).ids, tok.encode(cont).ids
        ids = (ctx_ids + cont_ids)[-(48 + 1) :]  # left truncation to the context (+1 target)
        ref = _direct_logprob(lm.model, ids, len(cont_ids))
        assert score == pytest.approx(ref, abs=1e-5)
        assert isinstance(greedy, bool)


def test_is_greedy_true_exactly_for_the_models_own_argmax(lm):
    ctx = byte_tokenizer().encode("Greedy check:").ids
    ids = list(ctx)
    with torch.no_grad():
        for _ in range(3):  # the model's own greedy continuation, token by token
            logits, _ = lm.model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    greedy = ids[len(ctx) :]
    other = greedy[:2] + [(greedy[2] + 1) % 256]
    (_, g1), (_, g2) = lm._loglikelihood_tokens([(None, ctx, greedy), (None, ctx, other)], disable_tqdm=True)
    assert g1 is True and g2 is False


def test_loglikelihood_rolling_equals_windowed_whole_text(lm):
    tok = byte_tokenizer()
    text = "The quick brown fox jumps over the lazy dog. " * 4  # 180 tokens > 48-token context
    ids = tok.encode(text).ids
    assert len(ids) > 3 * 48
    (got,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (text,))], disable_tqdm=True)
    # Independent reference: token i is predicted by a window that ends right before it and holds up to
    # 48 tokens. The first window starts with <|endoftext|> and predicts tokens 0..47; each later window
    # predicts the next (up to) 48 tokens with the 48 tokens before its last target as input.
    full = [tok.token_to_id(EOT), *ids]  # full[j + 1] = ids[j]
    total, done, window = 0.0, 0, 48
    while done < len(ids):
        n = min(window, len(ids) - done)
        end = done + n  # predict ids[done:end]; input = full[max(0, end - window):end]
        inputs = full[max(0, end - window) : end]
        with torch.no_grad():
            logits, _ = lm.model(torch.tensor([inputs]))
        lp = torch.log_softmax(logits[0].double(), dim=-1)[-n:]
        total += float(lp[torch.arange(n), torch.tensor(ids[done:end])].sum())
        done = end
    assert got == pytest.approx(total, abs=1e-4)
    # and the whole-text sum differs from scoring only the first window (the windows matter)
    (first,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (text[:40],))], disable_tqdm=True)
    assert first != pytest.approx(total)


def _manual_greedy(model, ids: list[int], steps: int, block: int, eot: int) -> list[int]:
    """Greedy decoding without a cache: recompute the cropped window every step."""
    out = []
    ids = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            logits, _ = model(torch.tensor([ids[-block:]]))
            t = int(logits[0, -1].argmax())
            if t == eot:
                break
            out.append(t)
            ids.append(t)
    return out


@pytest.mark.slow  # ~100 single-token forward passes on a shared CPU
def test_generate_until_matches_uncached_greedy_and_stops_at_until(lm):
    tok = byte_tokenizer()
    eot = tok.token_to_id(EOT)
    ctx, other = "Once upon a time", "Hi"  # 16 and 2 tokens: one left-padded batch of two rows
    # lm-eval's HFLM keeps the last max_length - max_gen_toks = 48 - 30 = 18 context tokens: all 16 here.
    ref_ids = _manual_greedy(lm.model, tok.encode(ctx).ids, 30, 48, eot)
    ref_text = tok.decode(ref_ids)
    kwargs = {"until": [], "max_gen_toks": 30}
    batch = [_req("generate_until", (c, kwargs), i) for i, c in enumerate((ctx, other))]
    free, short_ctx = lm.generate_until(batch, disable_tqdm=True)
    assert free == ref_text
    assert len(ref_ids) == 30  # no early end-of-text: the whole budget was decoded
    assert short_ctx == tok.decode(_manual_greedy(lm.model, tok.encode(other).ids, 30, 48, eot))

    # 40 new tokens leave room for 8 context tokens: the prompt is cut from the left.
    (cut_left,) = lm.generate_until(
        [_req("generate_until", (ctx, {"until": [], "max_gen_toks": 40}))], disable_tqdm=True
    )
    assert cut_left == tok.decode(_manual_greedy(lm.model, tok.encode(ctx).ids[-8:], 40, 48, eot))

    # Stop at a string the model does produce: 3 generated characters form the stop sequence.
    stop = ref_text[5:8]
    assert stop and stop in ref_text
    (cut,) = lm.generate_until(
        [_req("generate_until", (ctx, {"until": [stop], "max_gen_toks": 30}))], disable_tqdm=True
    )
    assert cut == ref_text.split(stop)[0]
    assert stop not in cut

    (short,) = lm.generate_until(
        [_req("generate_until", (ctx, {"until": ["\u2603"], "max_gen_toks": 5}))], disable_tqdm=True
    )
    assert short == tok.decode(ref_ids[:5])


def test_generate_until_rejects_sampling(lm):
    with pytest.raises(AdapterError, match="greedily"):
        lm.generate_until(
            [_req("generate_until", ("x", {"do_sample": True, "temperature": 0.7, "max_gen_toks": 5}))],
            disable_tqdm=True,
        )


def test_adapter_argument_errors_are_one_sentence():
    model, tok = tiny_model(), byte_tokenizer()
    with pytest.raises(AdapterError, match="exactly one of checkpoint"):
        MemoryFormerLM(tokenizer=tok)
    with pytest.raises(AdapterError, match="dtype='fp8'"):
        MemoryFormerLM(model=model, tokenizer=tok, dtype="fp8")
    with pytest.raises(AdapterError, match="no tokenizer is known"):
        MemoryFormerLM(model=model)
    with pytest.raises(AdapterError, match="has no '<eos>' token"):
        MemoryFormerLM(model=model, tokenizer=tok, eot_token="<eos>")
    with pytest.raises(AdapterError, match="max_length=500"):
        MemoryFormerLM(model=model, tokenizer=tok, max_length=500)


def test_registered_under_memoryformer():
    from lm_eval.api.registry import get_model

    assert get_model("memoryformer") is MemoryFormerLM
