"""Training: TrainConfig (config.py), the training loop with checkpoints and resume
(trainer.py), and torchrun / DDP helpers (distributed.py)."""
