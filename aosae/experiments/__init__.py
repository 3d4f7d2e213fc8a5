"""Experiments built on the trainer: the penalty ablation (aosae.experiments.ablation, `aosae ablate`)."""
