"""Train a MemoryFormer or Pythia model: `python train.py [group=option ...] [key=value ...]`.

Examples:
    python train.py experiment=nano_cpu                     # make train: nano model, bundled corpus, CPU
    python train.py experiment=mf_tiny trainer=deepspeed_zero2 trainer.devices=8
    python train.py -m experiment=table4_lr                 # the paper's Table 4 lr ablation (multirun)
    python train.py experiment=nano_cpu ckpt_path=last       # resume the newest run of that name
    python train.py experiment=nano_cpu ckpt_path=auto       # resume if a checkpoint loads, else start fresh

The composed config (conf/config.yaml) is printed, saved beside the checkpoints and checked before anything
is built; Hydra's output folder (outputs/<name>/<time>/) holds the run. The return value (final validation
loss) is what Hydra sweepers such as Optuna minimise.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from memoryformer.conf_schema import register_configs
from memoryformer.errors import exit_on_user_error, reports_user_errors

register_configs()


# reports_user_errors: a bad config, data file or checkpoint ends in one sentence and exit status 2
@reports_user_errors
@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point: run `memoryformer.training.run.train` and return the final validation loss."""
    from memoryformer.training.run import log_lightning_once, train

    log_lightning_once()  # Hydra has configured logging by now: one handler per line
    with exit_on_user_error():
        return train(cfg).get("val_loss")


if __name__ == "__main__":
    main()
