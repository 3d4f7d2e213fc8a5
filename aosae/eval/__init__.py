"""Evaluation: the field's metrics (metrics.py), a saved SAE against its LM (evaluate.py),
feature absorption (absorption.py), the penalty ablation (ablation.py) and run reports
(report.py); SAEBench's sparse probing (sparse_probing.py) and SCR / TPP (scr_tpp.py) on task
sets (tasks.py; SAEBench's own in saebench_tasks.py) whose LM activations are cached (text_activations.py), run over seeds by
probing.py."""
