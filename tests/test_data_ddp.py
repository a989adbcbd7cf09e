"""Lightning DDP on CPU with 2 processes: the ranks see disjoint samples whose union is the 1-rank order."""

import lightning as L
import pytest
import torch

from memoryformer.data.config import DataConfig
from memoryformer.data.datamodule import LMDataModule


class Recorder(L.LightningModule):
    """Writes every training batch it sees to `<out>/rank<r>.pt`."""

    def __init__(self, out):
        super().__init__()
        self.out, self.w, self.seen = out, torch.nn.Parameter(torch.zeros(1)), []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].clone())
        return self.w * batch["input_ids"].float().mean()

    def on_train_end(self):
        torch.save(torch.cat(self.seen), f"{self.out}/rank{self.global_rank}.pt")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    cfg = DataConfig(
        source="sample",
        cache_dir=str(tmp_path / "cache"),
        seq_len=16,
        sample_max_bytes=300_000,
        sample_vocab_size=300,
        num_samples=64,
        val_samples=0,
        val_fraction=0.0,
    )
    dm = LMDataModule(cfg, micro_batch_size=2, model_vocab_size=300, model_block_size=32)
    dm.prepare_data()  # build the corpus once, before the processes start
    trainer = L.Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        max_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Recorder(str(tmp_path)), datamodule=dm)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    single = LMDataModule(cfg, micro_batch_size=4, model_vocab_size=300, model_block_size=32)
    single.setup()
    expected = torch.stack([torch.as_tensor(single._train[i][:-1]) for i in range(20)])
    merged = torch.cat([torch.cat([r0[2 * s : 2 * s + 2], r1[2 * s : 2 * s + 2]]) for s in range(5)])
    assert torch.equal(merged, expected)  # disjoint, and interleaved they are the single-rank order
