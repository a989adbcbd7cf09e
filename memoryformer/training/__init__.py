"""Training: the LightningModule, optimizer/schedule, strategy builder, callbacks and the run driver."""

from memoryformer.training.module import LMTrainingModule, NonFiniteLossError
from memoryformer.training.optim import build_optimizer, build_scheduler, lr_multiplier, parameter_groups
from memoryformer.training.strategy import build_strategy, deepspeed_config

__all__ = [
    "LMTrainingModule",
    "NonFiniteLossError",
    "build_optimizer",
    "build_scheduler",
    "build_strategy",
    "deepspeed_config",
    "lr_multiplier",
    "parameter_groups",
]
