"""lm-evaluation-harness adapter: our `LanguageModel` as lm-eval's model type `memoryformer`.

Importing this module registers the class with `lm_eval.api.registry.register_model`, so after it is
imported `lm_eval.simple_evaluate(model="memoryformer", model_args="checkpoint=PATH", ...)` works, and so
does the console script `memoryformer-lm-eval --model memoryformer --model_args checkpoint=PATH ...`
(`memoryformer.evaluation.cli`), which imports it before handing over to lm-eval's own CLI.

Scoring follows lm-eval's Hugging Face adapter: requests are sorted by descending total length (so a batch's
first row sets its padded length and time estimates are pessimistic), inputs are right-padded, a
context+continuation longer than the model's context is truncated from the left, and the log-probability
of a continuation is the sum over its tokens of log-softmax (computed in float32).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator
from tqdm import tqdm

from memoryformer.config import DTYPES, EOS_TOKEN, ConfigError
from memoryformer.errors import AdapterError  # the one AdapterError, also importable from here

log = logging.getLogger(__name__)


def _tokenizer_from(source: Any):
    """A `tokenizers.Tokenizer` from a path (via `data.tokenizer.load_tokenizer`) or the tokenizer itself."""
    from tokenizers import Tokenizer

    from memoryformer.data.tokenizer import load_tokenizer

    if isinstance(source, Tokenizer):
        return source
    if source is None:
        raise AdapterError(
            "no tokenizer is known for this checkpoint; pass tokenizer=PATH (a tokenizers JSON file) in "
            "model_args or export the model with tokenizer_path=."
        )
    try:
        return load_tokenizer(str(source))
    except ConfigError as err:
        reason = err.__cause__ or "no such file"
        raise AdapterError(
            f"tokenizer file {source} could not be read ({reason}); pass a tokenizers JSON file."
        ) from err


def _as_bool(value: Any) -> bool:
    # lm-eval's --model_args may hand over "true"/"false" strings
    return value.strip().lower() in ("1", "true", "yes") if isinstance(value, str) else bool(value)


@register_model("memoryformer")
class MemoryFormerLM(TemplateLM):
    """lm-eval `LM` over a `memoryformer.models.LanguageModel` and a `tokenizers` tokenizer.

    Args (all can come from lm-eval's `--model_args`):
        checkpoint: exported model dir, Lightning .ckpt or DeepSpeed dir (see `checkpoint.load_model`).
        model: an already built `LanguageModel` instead of `checkpoint` (Python use and tests).
        tokenizer: tokenizers JSON path (or `Tokenizer`); defaults to the one stored with the checkpoint.
        batch_size: rows per forward pass for log-likelihood requests (generation runs one request at a time).
        device, dtype: where and in which precision the model runs ("float32", "bfloat16", "float16").
        max_length: context used for scoring (default and maximum: the model's `block_size`).
        max_gen_toks: default generation budget when a task does not set one.
        eot_token: the end-of-text token, used as the context of an empty prompt and as a stop token.
        trust_checkpoint: unpickle the checkpoint fully (can run code from the file); only for trusted files.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        batch_size: int | str = 16,
        device: str = "cpu",
        dtype: str = "float32",
        max_length: int | None = None,
        max_gen_toks: int = 256,
        eot_token: str = EOS_TOKEN,
        max_batch_size: int | None = None,  # noqa: ARG002 - lm-eval's CLI always passes it; auto batching is off
        trust_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if (checkpoint is None) == (model is None):
            raise AdapterError(
                "pass exactly one of checkpoint=PATH or model=LanguageModel to the memoryformer LM."
            )
        if dtype not in DTYPES:
            raise AdapterError(f"dtype={dtype!r} is not supported; choose one of: {', '.join(DTYPES)}.")
        device = str(device)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise AdapterError(f"device={device} was requested but CUDA is not available; use device=cpu.")
        try:
            self.batch_size = int(batch_size)
        except ValueError as err:
            raise AdapterError(
                f"batch_size={batch_size!r} must be a positive integer (auto is not supported)."
            ) from err
        if self.batch_size <= 0:
            raise AdapterError(f"batch_size={batch_size} must be a positive integer.")

        if checkpoint is not None:
            from memoryformer.checkpoint import load_model

            model, stored_tokenizer = load_model(checkpoint, trust_checkpoint=_as_bool(trust_checkpoint))
            tokenizer = tokenizer if tokenizer is not None else stored_tokenizer
        self.model = model.to(device=device, dtype=getattr(torch, dtype)).eval()
        self._device = torch.device(device)
        self.tokenizer = _tokenizer_from(tokenizer)

        block_size = int(self.model.config.block_size)
        self._max_length = int(max_length) if max_length is not None else block_size
        if not 1 <= self._max_length <= block_size:
            raise AdapterError(f"max_length={max_length} must lie in [1, model.block_size={block_size}].")
        self.max_gen_toks = int(max_gen_toks)
        eot_id = self.tokenizer.token_to_id(eot_token)
        if eot_id is None:
            raise AdapterError(
                f"the tokenizer has no {eot_token!r} token; pass eot_token=<its end-of-text token>."
            )
        if eot_id >= self.model.config.vocab_size:
            raise AdapterError(
                f"the tokenizer's {eot_token!r} id {eot_id} is outside model.vocab_size="
                f"{self.model.config.vocab_size}; the tokenizer does not belong to this model."
            )
        self._eot_token_id = eot_id

    # ------------------------------------------------------------------------------------ properties
    @property
    def eot_token_id(self) -> int:
        """Id of the end-of-text token (the context of an empty prompt, a stop token for generation)."""
        return self._eot_token_id

    @property
    def max_length(self) -> int:
        """Tokens the model sees at once when scoring."""
        return self._max_length

    @property
    def device(self) -> torch.device:
        """Device the model runs on."""
        return self._device

    @property
    def tokenizer_name(self) -> str:
        """A name for lm-eval's request cache keys."""
        return "memoryformer-tokenizer"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of `string` (no special tokens are added, as for GPT-NeoX in lm-eval)."""
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)).ids

    def tok_decode(self, tokens: list[int]) -> str:
        """Text of `tokens`."""
        return self.tokenizer.decode(list(tokens), skip_special_tokens=False)

    # ------------------------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _model_logprobs(self, inputs: torch.Tensor) -> torch.Tensor:
        """log-softmax over the vocabulary, float32: ids `[B, T]` -> `[B, T, V]`."""
        logits, _ = self.model(inputs.to(self.device))
        return F.log_softmax(logits.float(), dim=-1)

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[Any, list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        """`(sum of continuation log-probs, is greedy output)` per request `(key, ctx_ids, cont_ids)`.

        Batched and sorted by descending length; the input is `(ctx + cont)[-(max_length+1):][:-1]`, right
        padded, so every continuation token is scored with as much left context as fits.
        """

        def sort_key(req: tuple[Any, list[int], list[int]]) -> tuple[int, tuple[int, ...]]:
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        reorder = Collator(requests, sort_fn=sort_key)
        batch_size = override_bs or self.batch_size
        results: list[tuple[float, bool]] = []
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="memoryformer loglikelihood")
        for chunk in reorder.get_batched(n=batch_size):
            rows, cont_lens = [], []
            for _, ctx, cont in chunk:
                if not cont:
                    raise AdapterError(
                        "a loglikelihood request has an empty continuation; lm-eval tasks never send one."
                    )
                if len(cont) > self.max_length:
                    raise AdapterError(
                        f"a continuation of {len(cont)} tokens exceeds max_length={self.max_length}; "
                        "it cannot be scored."
                    )
                rows.append((ctx + cont)[-(self.max_length + 1) :][:-1])
                cont_lens.append(len(cont))
            width = max(len(r) for r in rows)
            # Right padding never changes earlier positions of a causal model; the pad id is irrelevant.
            batch = torch.zeros(len(rows), width, dtype=torch.long)
            for i, r in enumerate(rows):
                batch[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            logprobs = self._model_logprobs(batch)
            for i, ((key, _, cont), n) in enumerate(zip(chunk, cont_lens, strict=True)):
                end = len(rows[i])
                lp = logprobs[i, end - n : end]  # [n, V]: predictions of the n continuation tokens
                target = torch.tensor(cont, dtype=torch.long, device=lp.device)
                score = float(lp.gather(-1, target[:, None]).sum())
                greedy = bool((lp.argmax(dim=-1) == target).all())
                results.append((score, greedy))
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, (score, greedy))
                pbar.update(1)
        pbar.close()
        return reorder.get_original(results)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood of each `(string,)`, scored in disjoint windows of `max_length` tokens.

        The first window predicts the first tokens from the end-of-text token; every later window predicts
        the next tokens with the full `max_length` of preceding text as context (lm-eval's rolling windows).
        """
        windows: list[tuple[None, list[int], list[int]]] = []
        owner: list[int] = []
        for i, (string,) in enumerate(req.args for req in requests):
            pairs = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.eot_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for ctx, cont in map(lm_utils.make_disjoint_window, pairs):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (score, _) in zip(owner, scores, strict=True):
            totals[i] += score
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def greedy_until(self, context_ids: list[int], until: list[str], max_gen_toks: int) -> str:
        """Greedy continuation text of `context_ids`, cut before the first `until` string.

        Uses the model's `KVCache`: the prompt is processed once, then one token per step. The model sees at
        most `max_length` tokens; when the cache is full it is rebuilt from the last `max_length` tokens,
        which is exactly what recomputing the cropped window at every step would give.
        """
        block = self.max_length
        ids = list(context_ids) or [self.eot_token_id]
        ids = ids[-block:]
        cache = self.model.new_kv_cache(block)
        logits, _ = self.model(torch.tensor([ids], device=self.device), kv_cache=cache)
        generated: list[int] = []
        text = ""
        for _ in range(max_gen_toks):
            token = int(logits[0, -1].float().argmax())
            if token == self.eot_token_id:
                break
            generated.append(token)
            ids.append(token)
            text = self.tok_decode(generated)
            if any(stop in text for stop in until):
                break
            if cache.length + 1 > block:
                cache.reset()
                logits, _ = self.model(torch.tensor([ids[-block:]], device=self.device), kv_cache=cache)
            else:
                logits, _ = self.model(torch.tensor([[token]], device=self.device), kv_cache=cache)
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy generation for each `(context, gen_kwargs)`, honouring `until` and `max_gen_toks`.

        `gen_kwargs` may set `until` (str or list; default: the end-of-text string), `max_gen_toks`, and the
        sampling switches `do_sample`/`temperature`, which must ask for greedy decoding.
        """
        out = []
        for context, gen_kwargs in tqdm(
            [r.args for r in requests], disable=disable_tqdm, desc="memoryformer generate"
        ):
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            eot_text = self.tok_decode([self.eot_token_id])
            if eot_text not in until:
                until.append(eot_text)
            max_gen = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0:
                raise AdapterError(
                    "the memoryformer LM decodes greedily only; set do_sample=false and temperature=0."
                )
            text = self.greedy_until(self.tok_encode(context), until, max_gen)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out
