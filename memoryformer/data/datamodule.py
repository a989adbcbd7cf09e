"""`LMDataModule`: the one Lightning data module training uses, whatever `data.source` is.

Batches are dicts `{"input_ids": int64 [B, seq_len], "labels": int64 [B, seq_len]}`, cut from samples of
`seq_len + 1` tokens (labels = inputs shifted left by one). `B` is the micro-batch size per rank.

Exact resume: the module counts the training samples consumed by all ranks together (in
`on_before_batch_transfer`, i.e. batches that really reached a training step, not batches prefetched by
workers) and Lightning stores `state_dict()` in every checkpoint; after `load_state_dict`, the next
`train_dataloader` starts at that sample. Index-backed sources use `MegatronSampler` (Pythia's assignment
of samples to ranks); streaming sources skip the consumed batches of each (rank, worker) shard.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from memoryformer.config import ConfigError
from memoryformer.data.config import DataConfig, strip_extension
from memoryformer.data.gpt_neox import BlendedDataset, GPTSampleDataset, PreshuffledDataset, blend_sizes
from memoryformer.data.indexed import MMapIndexedDataset
from memoryformer.data.sample import build_sample_corpus
from memoryformer.data.sampler import MegatronSampler
from memoryformer.data.streaming import PackedStream, expand_globs
from memoryformer.data.tokenizer import check_vocab_fits, eos_id, load_tokenizer, resolve_tokenizer_path
from memoryformer.errors import DataError

log = logging.getLogger(__name__)


def collate_samples(samples: list) -> dict[str, torch.Tensor]:
    """`[B]` samples of `seq_len + 1` ids -> `{"input_ids": [B, seq_len], "labels": [B, seq_len]}` (int64)."""
    x = torch.stack([torch.as_tensor(np.asarray(s), dtype=torch.int64) for s in samples])
    return {"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()}


class _TrainLoader(DataLoader):
    """The training DataLoader: resumable the way Lightning understands it (`state_dict` / `load_state_dict`).

    The position itself is the data module's `consumed_samples`, which the sampler (or the stream) reads at
    each `iter()`; these two methods report and restore it, so Lightning stores it with its loop state and
    knows that a checkpoint saved in the middle of an epoch resumes at the right sample.
    """

    def __init__(self, module: LMDataModule, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._module = module

    def state_dict(self) -> dict[str, int]:
        """Samples consumed by all ranks together, and where the current pass over a stream began."""
        dm = self._module
        return {"consumed_samples": dm.consumed_samples, "stream_origin": dm._stream_origin}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Restore the position saved by `state_dict` (before Lightning's first `iter()` of a resumed fit)."""
        self._module.consumed_samples = int(state_dict["consumed_samples"])
        self._module._stream_origin = int(state_dict.get("stream_origin", 0))


class _ResumingLoader(_TrainLoader):
    """DataLoader over a `PackedStream` that tells the stream, at each `iter()`, how many batches to skip."""

    def __iter__(self):
        self.dataset.skip_batches = self._module._stream_skip_batches()
        return super().__iter__()


class _IndexedSplit:
    """A split of an index-backed source: a map-style dataset of samples, read through `MegatronSampler`."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i]

    def train_loader(self, dm: LMDataModule) -> DataLoader:
        rank, world = dm._dist()
        sampler = MegatronSampler(
            len(self.dataset),
            dm.micro_batch_size,
            rank,
            world,
            wrap=True,
            start_fn=lambda: dm.consumed_samples,
        )
        return self._loader(dm, sampler, persistent_workers=dm.cfg.num_workers > 0, loader=_TrainLoader)

    def val_loader(self, dm: LMDataModule) -> DataLoader:
        rank, world = dm._dist()
        total = min(len(self.dataset), dm.cfg.val_samples)
        total = max(total, min(len(self.dataset), dm.micro_batch_size * world))
        sampler = MegatronSampler(total, dm.micro_batch_size, rank, world)
        return self._loader(dm, sampler)

    def _loader(
        self, dm: LMDataModule, sampler: MegatronSampler, persistent_workers: bool = False, loader=None
    ) -> DataLoader:
        """Micro-batches of this split's samples in `sampler`'s order (incomplete last batch dropped);
        `loader=_TrainLoader` for the training split."""
        extra = () if loader is None else (dm,)
        return (loader or DataLoader)(
            *extra,
            self.dataset,
            batch_size=dm.micro_batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=dm.cfg.num_workers,
            collate_fn=collate_samples,
            persistent_workers=persistent_workers,
            pin_memory=dm._pin_memory(),
        )


class _StreamSplit:
    """A split of a streaming source (files or hub): where its documents come from (`PackedStream`'s
    `source`) and which of them it keeps (`doc_filter`, None for all); a fresh stream per DataLoader."""

    def __init__(self, source: dict[str, Any], doc_filter: tuple[int, int, bool] | None) -> None:
        self.source, self.doc_filter = source, doc_filter

    def stream(self, dm: LMDataModule, limit: int | None = None) -> PackedStream:
        rank, world = dm._dist()
        return PackedStream(
            self.source,
            dm._tokenizer_path,
            dm._eos,
            dm.cfg.seq_len,
            rank,
            world,
            dm.micro_batch_size,
            self.doc_filter,
            limit,
        )

    def train_loader(self, dm: LMDataModule) -> DataLoader:
        return _ResumingLoader(
            dm,
            self.stream(dm),
            batch_size=dm.micro_batch_size,
            num_workers=dm.cfg.num_workers,
            collate_fn=collate_samples,
            drop_last=True,
            pin_memory=dm._pin_memory(),
        )

    def val_loader(self, dm: LMDataModule) -> DataLoader:
        _, world = dm._dist()
        stream = self.stream(dm, limit=max(1, dm.cfg.val_samples // world))
        return DataLoader(stream, batch_size=dm.micro_batch_size, collate_fn=collate_samples,
                          pin_memory=dm._pin_memory())


class LMDataModule(L.LightningDataModule):
    """Train/val dataloaders for a `DataConfig`, with exact resume and Megatron-style rank assignment.

    `tokenizer` is the path of the tokenizer.json (None for an indexed source without one); `vocab_size`
    is the tokenizer's vocabulary size (None when unknown). Both are known after `setup()`.
    """

    def __init__(
        self,
        cfg: DataConfig,
        micro_batch_size: int,
        model_vocab_size: int,
        model_block_size: int,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(cfg, dict):
            cfg = DataConfig(**cfg)
        if cfg.seq_len > model_block_size:
            raise ConfigError(
                f"data.seq_len={cfg.seq_len} is larger than the model's context model.block_size="
                f"{model_block_size}; lower data.seq_len or raise model.block_size."
            )
        if micro_batch_size <= 0:
            raise ConfigError(f"micro_batch_size={micro_batch_size} must be a positive integer.")
        self.cfg, self.micro_batch_size = cfg, micro_batch_size
        self.model_vocab_size, self.model_block_size = model_vocab_size, model_block_size
        self.seed = cfg.seed if seed is None else seed
        self.consumed_samples = 0
        self._stream_origin = 0  # consumed_samples when the current pass over a stream began
        self._stream_iters = 0
        self._tokenizer_path: str | None = None
        self._vocab_size: int | None = None
        self._eos: int | None = None
        # the training and validation splits (`_IndexedSplit` or `_StreamSplit`), known after `setup()`
        self._train: _IndexedSplit | _StreamSplit | None = None
        self._val: _IndexedSplit | _StreamSplit | None = None

    # ------------------------------------------------------------------ environment
    def _pin_memory(self) -> bool:
        """Page-locked batches when training on CUDA, so the host-to-device copy can run asynchronously
        (`non_blocking`); off elsewhere, where pinning costs time and buys nothing."""
        trainer = getattr(self, "trainer", None)
        root = getattr(getattr(trainer, "strategy", None), "root_device", None)
        return root is not None and root.type == "cuda"

    def _dist(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _train_samples_wanted(self) -> int | None:
        if self.cfg.num_samples is not None:
            return self.cfg.num_samples
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.max_steps and trainer.max_steps > 0:
            _, world = self._dist()
            return trainer.max_steps * trainer.accumulate_grad_batches * self.micro_batch_size * world
        return None

    # ------------------------------------------------------------------ tokenizer
    @property
    def tokenizer(self) -> str | None:
        """Path of the tokenizer.json this data was tokenized with (after `setup()`)."""
        return self._tokenizer_path

    @property
    def vocab_size(self) -> int | None:
        """Vocabulary size of the tokenizer (after `setup()`)."""
        return self._vocab_size

    def _load_tokenizer(self, path: str | None) -> None:
        if path is None:
            return
        self._tokenizer_path = resolve_tokenizer_path(path)
        tok = load_tokenizer(self._tokenizer_path)
        self._vocab_size = tok.get_vocab_size()
        check_vocab_fits(self._vocab_size, self.model_vocab_size, self._tokenizer_path)
        if self.cfg.append_eos:
            self._eos = eos_id(tok, self.cfg.eos_token, self._tokenizer_path)

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Build the sample corpus once per node (local rank 0); everything else happens in `setup`."""
        if self.cfg.source == "sample":
            self._sample_corpus()

    def _sample_corpus(self):
        c = self.cfg
        return build_sample_corpus(c.cache_dir, c.sample_max_bytes, c.sample_vocab_size, c.sample_val_every)

    def setup(self, stage: str | None = None) -> None:
        """Open the data and build (or load cached) index mappings."""
        if self._train is not None:
            return
        c = self.cfg
        if c.source == "sample":
            corpus = self._sample_corpus()
            self._load_tokenizer(corpus.tokenizer)
            self._setup_indexed([corpus.train_prefix], [1.0], [corpus.val_prefix])
        elif c.source == "indexed":
            self._load_tokenizer(c.tokenizer)
            self._setup_indexed(c.paths, c.weights, c.val_paths)
        else:
            self._load_tokenizer(c.tokenizer)
            self._setup_stream()

    def _open(self, prefix: str) -> MMapIndexedDataset:
        ds = MMapIndexedDataset(strip_extension(os.path.expanduser(prefix)))
        if self._vocab_size is None and len(ds):
            # no tokenizer: fail at once if the first documents already overflow the embedding (every
            # sample is checked again as it is read, see MMapIndexedDataset.check_ids)
            for i in range(min(len(ds), 64)):
                ds.check_ids(ds[i], self.model_vocab_size, i)
        return ds

    def _samples(self, ds: MMapIndexedDataset, num_samples: int | None, docs, name: str):
        c = self.cfg
        if c.index_mapping == "preshuffled":
            return PreshuffledDataset(ds, c.seq_len, docs, vocab_size=self.model_vocab_size)
        if num_samples is None:
            tokens = int(ds.sizes[docs].sum(dtype=np.int64)) if docs is not None else ds.num_tokens
            num_samples = max(1, (tokens - 1) // c.seq_len)
        return GPTSampleDataset(
            ds, c.seq_len, num_samples, self.seed, c.cache_dir, docs, name, vocab_size=self.model_vocab_size
        )

    def _setup_indexed(self, paths: list[str], weights: list[float], val_paths: list[str]) -> None:
        c = self.cfg
        train_sets = [self._open(p) for p in paths]
        split_docs = []
        for ds in train_sets:
            n_val = 0 if val_paths or c.val_fraction == 0 else max(1, round(len(ds) * c.val_fraction))
            if n_val >= len(ds):
                raise ConfigError(
                    f"data.val_fraction={c.val_fraction} leaves no training documents in {ds.prefix}."
                )
            split_docs.append(
                (
                    np.arange(len(ds) - n_val, dtype=np.int32),
                    np.arange(len(ds) - n_val, len(ds), dtype=np.int32),
                )
            )
        wanted = self._train_samples_wanted()
        if len(train_sets) == 1:
            self._train = _IndexedSplit(self._samples(train_sets[0], wanted, split_docs[0][0], "train"))
        else:
            weights = list(weights) or [
                float(ds.sizes[d].sum()) for ds, (d, _) in zip(train_sets, split_docs, strict=True)
            ]
            if wanted is None:
                wanted = sum(
                    len(self._samples(ds, None, d, "train"))
                    for ds, (d, _) in zip(train_sets, split_docs, strict=True)
                )
            sizes = blend_sizes(weights, wanted)
            parts = [
                self._samples(ds, n, d, "train")
                for ds, n, (d, _) in zip(train_sets, sizes, split_docs, strict=True)
            ]
            self._train = _IndexedSplit(BlendedDataset(parts, weights, wanted))
        if val_paths:
            self._val = _IndexedSplit(
                self._concat([self._samples(self._open(p), None, None, "valid") for p in val_paths])
            )
        elif c.val_fraction > 0:
            self._val = _IndexedSplit(
                self._concat(
                    [
                        self._samples(ds, None, d, "valid")
                        for ds, (_, d) in zip(train_sets, split_docs, strict=True)
                    ]
                )
            )
        self._check_val_batch(len(self._val) if self._val is not None else None, paths + val_paths)

    def _check_val_batch(self, samples: int | None, where: list[str]) -> None:
        """Refuse a validation split too small for one batch: it would silently never validate."""
        _, world = self._dist()
        need = self.micro_batch_size * world
        if samples is not None and self.cfg.val_samples > 0 and samples < need:
            raise DataError(
                f"the validation split of {', '.join(where)} has {samples} sample(s) of "
                f"data.seq_len + 1 = {self.cfg.seq_len + 1} tokens, fewer than one validation batch of "
                f"{need}; add validation data, raise data.val_fraction, or set data.val_samples=0."
            )

    @staticmethod
    def _concat(parts: list):
        return parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)

    def _setup_stream(self) -> None:
        c = self.cfg
        if c.source == "files":
            train_src = dict(files=expand_globs(c.files), text_field=c.text_field, on_bad_line=c.on_bad_line)
            val_src = (
                dict(
                    files=expand_globs(c.val_files, "data.val_files"),
                    text_field=c.text_field,
                    on_bad_line=c.on_bad_line,
                )
                if c.val_files
                else None
            )
        else:
            train_src = dict(
                hf_name=c.hf_name, hf_config=c.hf_config, hf_split=c.hf_split, text_field=c.text_field
            )
            val_src = (
                dict(
                    hf_name=c.hf_name, hf_config=c.hf_config, hf_split=c.hf_val_split, text_field=c.text_field
                )
                if c.hf_val_split
                else None
            )
        every = round(1 / c.val_fraction) if c.val_fraction > 0 else None
        train_filter = (every, every - 1, False) if val_src is None and every else None
        self._train = _StreamSplit(train_src, train_filter)
        if val_src is not None:
            self._val = _StreamSplit(val_src, None)
        elif every:
            self._val = _StreamSplit(train_src, (every, every - 1, True))
        self._probe_stream()

    def _probe_stream(self) -> None:
        """Fail at start, naming the files, when the stream cannot fill one training batch or one validation
        sample; otherwise Lightning would wait forever for a first batch that never comes.

        Reads the first documents of this rank's first DataLoader worker only (a few documents on a
        corpus of any size). An empty validation stream is fine when `val_samples=0`.
        """
        c = self.cfg
        what = ", ".join(c.files) if c.source == "files" else f"data.hf_name={c.hf_name}"
        need = self.micro_batch_size
        got = self._train.stream(self).count_samples(need)
        if got < need:
            raise DataError(
                f"{what} gave {got} training sample(s) of data.seq_len + 1 = {c.seq_len + 1} tokens, fewer "
                f"than one micro-batch of {need}; add data, or lower data.seq_len or global_batch_size."
            )
        if self._val is not None and c.val_samples > 0 and self._val.stream(self).count_samples(1) < 1:
            vwhat = ", ".join(c.val_files) if c.val_files else what
            raise DataError(
                f"{vwhat} gave no validation sample of data.seq_len + 1 = {c.seq_len + 1} tokens; give "
                f"data.val_files, raise data.val_fraction, or set data.val_samples=0."
            )

    def _stream_skip_batches(self) -> int:
        # first pass of this process: resume where the checkpoint left off; later passes start over
        if self._stream_iters > 0:
            self._stream_origin = self.consumed_samples
        self._stream_iters += 1
        _, world = self._dist()
        return (self.consumed_samples - self._stream_origin) // (self.micro_batch_size * world)

    def train_dataloader(self) -> DataLoader:
        """Training batches from `consumed_samples` on, this rank's share only."""
        self.setup()
        return self._train.train_loader(self)

    def val_dataloader(self) -> DataLoader | list:
        """The first `val_samples` validation samples, split over ranks; `[]` without validation data."""
        self.setup()
        c = self.cfg
        if self._val is None or c.val_samples == 0:
            return []
        return self._val.val_loader(self)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            self.consumed_samples += self.micro_batch_size * self._dist()[1]
        return batch

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume at the exact next sample."""
        _, world = self._dist()
        return {
            "consumed_samples": self.consumed_samples,
            "stream_origin": self._stream_origin,
            "micro_batch_size": self.micro_batch_size,
            "world_size": world,
            "num_workers": self.cfg.num_workers,
            "source": self.cfg.source,
            "seq_len": self.cfg.seq_len,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the consumed-samples position (warns when the data layout changed since the checkpoint)."""
        self.consumed_samples = int(state_dict["consumed_samples"])
        self._stream_origin = int(state_dict.get("stream_origin", 0))
        for key, now in (("seq_len", self.cfg.seq_len), ("source", self.cfg.source)):
            if key in state_dict and state_dict[key] != now:
                log.warning(
                    "data.%s was %r in the checkpoint and is %r now; resumed order is not exact.",
                    key,
                    state_dict[key],
                    now,
                )
        _, world = self._dist()
        saved_world = state_dict.get("world_size", world)
        if self.cfg.source in ("files", "hf") and saved_world != world:
            # index-backed sources assign whole global batches, so their order does not depend on the ranks
            log.warning(
                "the run had %s processes in the checkpoint and %s now: a stream's document shards follow "
                "the ranks, so the resumed order is not exact (index-backed sources keep it).",
                saved_world,
                world,
            )
        if self.cfg.source in ("files", "hf") and state_dict.get("num_workers") != self.cfg.num_workers:
            log.warning(
                "data.num_workers changed from %s to %s: the stream's document shards differ, so the "
                "resumed order is not exact.",
                state_dict.get("num_workers"),
                self.cfg.num_workers,
            )
