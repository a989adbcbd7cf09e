"""Training, one concept per module:

- `settings`: the composed config checked and resolved once into a `RunPlan`;
- `run`: `train(cfg)`, the trainer with its callbacks and loggers, the fit, stopping on a signal, export;
- `module`: the training loop (`LMTrainingModule`) and the callbacks that watch it;
- `optim`: `OptimConfig`, parameter groups and the lr schedule;
- `parallel`: strategies (DDP, DeepSpeed ZeRO), activation checkpointing, compile, ZeRO-3 init;
- `sizing`: batch arithmetic and the memory plan;
- `resume`: run fingerprints, the checkpoint search, and the callbacks that save what a resume needs.
"""
