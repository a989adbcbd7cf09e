"""A resumed run reads the batches the uninterrupted run reads, on the same or another number of processes,
and Lightning sees the training loader as resumable (no "dataloader is not resumable" warning).

The reference is the sample order of `LMDataModule` itself for one process (`_train[i]`, i = 0, 1, ...), as
in tests/test_data_ddp.py; the runs are real Lightning fits of a one-parameter module that records its
batches, checkpointed by Lightning's `ModelCheckpoint` in the middle of an epoch.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from memoryformer.data.config import DataConfig
from memoryformer.data.datamodule import LMDataModule

STOP, TOTAL = 3, 6  # checkpoint after 3 optimizer steps, resume to 6
NOT_RESUMABLE = "dataloader is not resumable"


class Recorder(L.LightningModule):
    """Writes every training batch it sees to `<out>/rank<r>.pt` at the end of the fit."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out, self.w, self.seen = out, torch.nn.Parameter(torch.zeros(1)), []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].clone())
        return self.w * batch["input_ids"].float().mean()

    def on_train_end(self):
        torch.save(torch.cat(self.seen), f"{self.out}/rank{self.global_rank}.pt")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data_cfg(tmp_path: Path) -> DataConfig:
    # 64 samples: 16 global batches of 4 per epoch, so step 3 is in the middle of the first epoch
    return DataConfig(
        source="sample",
        cache_dir=str(tmp_path / "cache"),
        seq_len=16,
        sample_max_bytes=300_000,
        sample_vocab_size=300,
        num_samples=64,
        val_samples=0,
        val_fraction=0.0,
    )


def _datamodule(cfg: DataConfig, micro: int) -> LMDataModule:
    return LMDataModule(cfg, micro_batch_size=micro, model_vocab_size=300, model_block_size=32)


def _trainer(max_steps: int, ckpt_dir: Path | None = None, **kwargs) -> L.Trainer:
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, filename="stop", every_n_train_steps=STOP, save_top_k=-1)]
    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=ckpt_dir is not None,
        callbacks=callbacks if ckpt_dir is not None else None,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def _expected(cfg: DataConfig, steps: range, global_batch: int = 4) -> torch.Tensor:
    """Inputs of the one-process order for optimizer steps `steps` (global batches of `global_batch`)."""
    single = _datamodule(cfg, global_batch)
    single.setup()
    ids = range(steps.start * global_batch, steps.stop * global_batch)
    return torch.stack([torch.as_tensor(single._train[i][:-1]) for i in ids])


def _resume_one_process(cfg: DataConfig, tmp_path: Path, ckpt: Path) -> tuple[torch.Tensor, list[str]]:
    """Fit one process from `ckpt` to step TOTAL; its batches and the warnings it raised."""
    out = tmp_path / "resumed"
    out.mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(TOTAL).fit(Recorder(str(out)), datamodule=_datamodule(cfg, 4), ckpt_path=ckpt)
    return torch.load(out / "rank0.pt"), [str(w.message) for w in caught]


def test_resumed_batches_equal_the_uninterrupted_run_without_a_resumability_warning(tmp_path: Path) -> None:
    cfg = _data_cfg(tmp_path)
    first = tmp_path / "first"
    first.mkdir()
    _trainer(STOP, first / "ckpt").fit(Recorder(str(first)), datamodule=_datamodule(cfg, 4))
    ckpt = first / "ckpt" / "stop.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    # Lightning stored the loader's position with its loop state: it treats the loader as resumable
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"consumed_samples": STOP * 4, "stream_origin": 0}
    ]
    resumed, messages = _resume_one_process(cfg, tmp_path, ckpt)
    assert torch.equal(torch.load(first / "rank0.pt"), _expected(cfg, range(0, STOP)))
    assert torch.equal(resumed, _expected(cfg, range(STOP, TOTAL)))
    assert not [m for m in messages if NOT_RESUMABLE in m], messages


@pytest.mark.slow
def test_two_processes_then_one_continue_the_same_sample_order(tmp_path: Path) -> None:
    """DDP on CPU with 2 processes (micro-batch 2) to step 3, then 1 process (micro-batch 4) to step 6: the
    same global batch of 4, and the batches of both parts are those of one uninterrupted process."""
    cfg = _data_cfg(tmp_path)
    _datamodule(cfg, 2).prepare_data()  # build the corpus once, before the processes start
    first = tmp_path / "ddp"
    first.mkdir()
    trainer = _trainer(STOP, first / "ckpt", strategy="ddp_spawn", devices=2)
    trainer.fit(Recorder(str(first)), datamodule=_datamodule(cfg, 2))
    r0, r1 = torch.load(first / "rank0.pt"), torch.load(first / "rank1.pt")
    merged = torch.cat([torch.cat([r0[2 * s : 2 * s + 2], r1[2 * s : 2 * s + 2]]) for s in range(STOP)])
    assert torch.equal(merged, _expected(cfg, range(0, STOP)))

    resumed, messages = _resume_one_process(cfg, tmp_path, first / "ckpt" / "stop.ckpt")
    assert torch.equal(resumed, _expected(cfg, range(STOP, TOTAL)))
    assert not [m for m in messages if NOT_RESUMABLE in m], messages
