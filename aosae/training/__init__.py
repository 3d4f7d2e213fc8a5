"""Training: TrainConfig (config.py), one optimiser step (step.py), the training loop
(trainer.py), checkpoints with pruning and corrupt-checkpoint fallback (checkpoints.py),
torchrun / DDP helpers (distributed.py) and optional wandb / tensorboard logging (logging.py)."""
