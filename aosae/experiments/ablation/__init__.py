"""The penalty ablation on the trainer's own loop (see arms.py for the arms, runner.py for a
run, report.py for the L0-matched comparison, the tables and plots)."""
from aosae.experiments.ablation.arms import ARMS, Arm, parse_arms
from aosae.experiments.ablation.datasets import DATASETS
from aosae.experiments.ablation.datasets import load as load_dataset
from aosae.experiments.ablation.runner import Sweep, run_sweep, train_run

__all__ = ["ARMS", "Arm", "DATASETS", "Sweep", "load_dataset", "parse_arms", "run_sweep", "train_run"]
