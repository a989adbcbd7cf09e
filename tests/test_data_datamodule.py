"""LMDataModule on the bundled sample corpus: batch layout, boundary errors, exact resume via Lightning."""

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from memoryformer.config import ConfigError
from memoryformer.data.config import DataConfig
from memoryformer.data.datamodule import LMDataModule
from memoryformer.data.indexed import MMapIndexedDataset
from memoryformer.data.sample import build_sample_corpus, stdlib_files


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def cfg(cache, **kw):
    return DataConfig(
        source="sample",
        cache_dir=cache,
        seq_len=32,
        sample_max_bytes=300_000,
        sample_vocab_size=512,
        val_samples=16,
        **kw,
    )


def test_sample_corpus_is_the_stdlib_and_cached(cache):
    c = build_sample_corpus(cache, 300_000, 512, 20)
    files = stdlib_files(300_000)
    assert files == sorted(files, key=lambda p: p.split("/lib/python3.11/")[-1])
    train, val = MMapIndexedDataset(c.train_prefix), MMapIndexedDataset(c.val_prefix)
    assert len(train) + len(val) == len(files) and len(val) == len(files) // 20
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(c.tokenizer)
    assert tok.get_vocab_size() == 512
    # document 0 decodes back to the first stdlib file, followed by one end-of-text token
    text = Path(files[0]).read_text(encoding="utf-8")
    assert tok.decode(train[0][:-1].tolist()) == text and train[0][-1] == tok.token_to_id("<|endoftext|>")
    mtime = __import__("os").path.getmtime(c.train_prefix + ".bin")
    assert build_sample_corpus(cache, 300_000, 512, 20).root == c.root  # second call: no rebuild
    assert __import__("os").path.getmtime(c.train_prefix + ".bin") == mtime


def test_batches_are_shifted_pairs(cache):
    dm = LMDataModule(cfg(cache), micro_batch_size=4, model_vocab_size=512, model_block_size=64)
    dm.prepare_data()
    dm.setup()
    assert dm.vocab_size == 512 and dm.tokenizer.endswith("tokenizer.json")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32) and batch["input_ids"].dtype == torch.int64
    sample0 = dm._train[0]
    np.testing.assert_array_equal(batch["input_ids"][0].numpy(), sample0[:-1])
    np.testing.assert_array_equal(batch["labels"][0].numpy(), sample0[1:])
    val = next(iter(dm.val_dataloader()))
    assert val["labels"].shape == (4, 32)


def test_tokenizer_larger_than_model_vocab(cache):
    dm = LMDataModule(cfg(cache), micro_batch_size=2, model_vocab_size=300, model_block_size=64)
    with pytest.raises(
        ConfigError, match=r"tokenizer .*tokenizer\.json has 512 tokens but model\.vocab_size=300"
    ):
        dm.setup()


def test_seq_len_larger_than_context(cache):
    with pytest.raises(ConfigError, match=r"data\.seq_len=32 is larger than .*model\.block_size=16"):
        LMDataModule(cfg(cache), micro_batch_size=2, model_vocab_size=512, model_block_size=16)


class Recorder(L.LightningModule):
    """Minimal module: records the samples of every training batch."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].clone())
        return self.w * batch["input_ids"].float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(cache, steps, ckpt_in=None, ckpt_out=None, num_workers=0):
    dm = LMDataModule(
        cfg(cache, num_samples=64, num_workers=num_workers),
        micro_batch_size=2,
        model_vocab_size=512,
        model_block_size=64,
    )
    model = Recorder()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_in)
    if ckpt_out:
        trainer.save_checkpoint(ckpt_out)
    return torch.cat(model.seen), dm


def test_exact_resume_through_lightning_checkpoint(cache, tmp_path):
    full, _ = fit(cache, 7)
    first, dm = fit(cache, 3, ckpt_out=str(tmp_path / "a.ckpt"))
    assert dm.consumed_samples == 6
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=False)
    assert ckpt["LMDataModule"]["consumed_samples"] == 6
    rest, _ = fit(cache, 7, ckpt_in=str(tmp_path / "a.ckpt"))
    assert torch.equal(first, full[:6])
    assert torch.equal(rest, full[6:])  # the resumed run sees exactly steps 3..6 of the uninterrupted one


def test_loaders_pin_memory_only_when_the_trainer_runs_on_cuda(cache):
    from types import SimpleNamespace

    dm = LMDataModule(cfg(cache), micro_batch_size=4, model_vocab_size=512, model_block_size=64)
    dm.prepare_data()
    dm.setup()
    assert not dm.train_dataloader().pin_memory  # no trainer: nothing to copy to
    for device, pinned in (("cpu", False), ("cuda", True)):
        # a stand-in trainer: the loaders read only its rank, world size and strategy's root device
        dm.trainer = SimpleNamespace(global_rank=0, world_size=1, max_steps=-1, accumulate_grad_batches=1,
                                     strategy=SimpleNamespace(root_device=torch.device(device)))
        assert dm.train_dataloader().pin_memory is pinned
        assert dm.val_dataloader().pin_memory is pinned
