"""lm-evaluation-harness adapter: our `LanguageModel` as lm-eval's model type `memoryformer`.

Importing this module registers the class with `lm_eval.api.registry.register_model`, so after it is
imported `lm_eval.simple_evaluate(model="memoryformer", model_args="checkpoint=PATH", ...)` works, and so
does the console script `memoryformer-lm-eval --model memoryformer --model_args checkpoint=PATH ...`
(`memoryformer.evaluation.cli`), which imports it before handing over to lm-eval's own CLI.

Scoring is lm-eval's own Hugging Face model, `HFLM`, given a built model object: its request sorting,
right padding, left truncation, rolling windows and one-token logits cache apply unchanged. This module adds
only what `HFLM` cannot do for a model that is not a `transformers` model: loading our checkpoints, wrapping
our `tokenizers` tokenizer, calling our forward pass, and greedy decoding through our `KVCache`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from memoryformer.config import DTYPES, EOS_TOKEN, ConfigError
from memoryformer.errors import AdapterError  # the one AdapterError, also importable from here

log = logging.getLogger(__name__)


def _hf_tokenizer(source: Any, eot_token: str):
    """A `PreTrainedTokenizerFast` (eos = bos = pad = `eot_token`) over a tokenizers JSON path or object."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from memoryformer.data.tokenizer import load_tokenizer

    if source is None:
        raise AdapterError(
            "no tokenizer is known for this checkpoint; pass tokenizer=PATH (a tokenizers JSON file) in "
            "model_args or export the model with tokenizer_path=."
        )
    if not isinstance(source, Tokenizer):
        try:
            source = load_tokenizer(str(source))
        except ConfigError as err:
            reason = err.__cause__ or "no such file"
            raise AdapterError(
                f"tokenizer file {source} could not be read ({reason}); pass a tokenizers JSON file."
            ) from err
    if source.token_to_id(eot_token) is None:
        raise AdapterError(
            f"the tokenizer has no {eot_token!r} token; pass eot_token=<its end-of-text token>."
        )
    # No tokenization-space clean-up: decoding must give back exactly the text the tokens stand for.
    return PreTrainedTokenizerFast(
        tokenizer_object=source,
        eos_token=eot_token,
        bos_token=eot_token,
        pad_token=eot_token,
        clean_up_tokenization_spaces=False,
    )


def _as_bool(value: Any) -> bool:
    # lm-eval's --model_args may hand over "true"/"false" strings
    return value.strip().lower() in ("1", "true", "yes") if isinstance(value, str) else bool(value)


class _ModelForHFLM(torch.nn.Module):
    """Our `LanguageModel`, called as before, plus what `HFLM` reads from a built model: `device`,
    `tie_weights()` and `config` (our `ModelConfig`)."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        super().__init__()
        self.lm = model
        self.config = model.config
        self.device = device

    def tie_weights(self) -> None:
        """Nothing to do: our LM head ties itself at construction."""

    def new_kv_cache(self, max_len: int | None = None):
        """The wrapped model's empty `KVCache`."""
        return self.lm.new_kv_cache(max_len)

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The wrapped model's `(logits [B, T, vocab], loss)`."""
        return self.lm(*args, **kwargs)


@register_model("memoryformer")
class MemoryFormerLM(HFLM):
    """lm-eval `HFLM` over a `memoryformer.models.LanguageModel` and a `tokenizers` tokenizer.

    Args (all can come from lm-eval's `--model_args`):
        checkpoint: exported model dir, Lightning .ckpt or DeepSpeed dir (see `checkpoint.load_model`).
        model: an already built `LanguageModel` instead of `checkpoint` (Python use and tests).
        tokenizer: tokenizers JSON path (or `Tokenizer`); defaults to the one stored with the checkpoint.
        batch_size: rows per forward pass (an int, or lm-eval's "auto").
        device, dtype: where and in which precision the model runs ("float32", "bfloat16", "float16");
            log-softmax is always taken in float32.
        max_length: context used for scoring (default and maximum: the model's `block_size`).
        eot_token: the end-of-text token: context of an empty prompt, stop token, padding.
        trust_checkpoint: unpickle the checkpoint fully (can run code from the file); only for trusted files.
        Other keyword arguments go to `HFLM` (e.g. `max_batch_size`, which lm-eval's CLI always passes).
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
        eot_token: str = EOS_TOKEN,
        trust_checkpoint: bool = False,
        **hflm_kwargs: Any,
    ) -> None:
        if (checkpoint is None) == (model is None):
            raise AdapterError(
                "pass exactly one of checkpoint=PATH or model=LanguageModel to the memoryformer LM."
            )
        if dtype not in DTYPES:
            raise AdapterError(f"dtype={dtype!r} is not supported; choose one of: {', '.join(DTYPES)}.")
        device = str(device)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise AdapterError(f"device={device} was requested but CUDA is not available; use device=cpu.")
        if checkpoint is not None:
            from memoryformer.checkpoint import load_model

            model, stored_tokenizer = load_model(checkpoint, trust_checkpoint=_as_bool(trust_checkpoint))
            tokenizer = tokenizer if tokenizer is not None else stored_tokenizer
        hf_tokenizer = _hf_tokenizer(tokenizer, eot_token)
        config = model.config
        if hf_tokenizer.eos_token_id >= config.vocab_size:
            raise AdapterError(
                f"the tokenizer's {eot_token!r} id {hf_tokenizer.eos_token_id} is outside model.vocab_size="
                f"{config.vocab_size}; the tokenizer does not belong to this model."
            )
        max_length = int(max_length) if max_length is not None else int(config.block_size)
        if not 1 <= max_length <= config.block_size:
            raise AdapterError(
                f"max_length={max_length} must lie in [1, model.block_size={config.block_size}]."
            )
        model = model.to(device=device, dtype=getattr(torch, dtype)).eval()
        super().__init__(
            pretrained=_ModelForHFLM(model, torch.device(device)),
            tokenizer=hf_tokenizer,
            backend="causal",
            batch_size=batch_size,
            max_length=max_length,
            softmax_dtype=torch.float32,
            **hflm_kwargs,
        )

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """Logits `[B, T, vocab]` of ids `[B, T]` (right padding needs no mask in a causal model)."""
        with torch.no_grad():
            return self.model(inps.to(self.device))[0]

    @torch.no_grad()
    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs):
        """Greedy continuation of each row of `context` `[B, T]` (left padded) up to `max_length` tokens.

        Returns `[B, max_length]` ids: each row's context, left padding removed and its continuation
        appended, written back at the same width as `context` (HFLM cuts the first `T` ids) and right-padded
        with the end-of-text id. A row stops at the end-of-text token or once its text holds a `stop` string.
        HFLM has already cut the context so that context + continuation fit in `max_length` <= block_size,
        so the `KVCache` never overflows.
        """
        if generation_kwargs.get("do_sample") or float(generation_kwargs.get("temperature") or 0.0) > 0:
            raise AdapterError(
                "the memoryformer LM decodes greedily only; set do_sample=false and temperature=0."
            )
        mask = generation_kwargs.get("attention_mask")
        width = context.shape[1]
        out = torch.full((context.shape[0], max_length), self.eot_token_id, dtype=torch.long)
        out[:, :width] = context.cpu()
        for row in range(context.shape[0]):
            ids = context[row] if mask is None else context[row][mask[row].bool()]
            cache = self.model.new_kv_cache(self.max_length)
            logits, _ = self.model(ids[None].to(self.device), kv_cache=cache)
            new: list[int] = []
            while width + len(new) < max_length:
                token = int(logits[0, -1].float().argmax())
                if token == self.eot_token_id:
                    break
                new.append(token)
                if any(s and s in self.tok_decode(new) for s in stop):
                    break
                logits, _ = self.model(torch.tensor([[token]], device=self.device), kv_cache=cache)
            out[row, width : width + len(new)] = torch.tensor(new, dtype=torch.long)
        return out
