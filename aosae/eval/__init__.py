"""Evaluation: the field's metrics (metrics.py), a saved SAE against its LM (evaluate.py),
feature absorption (absorption.py), the penalty ablation (ablation.py) and run reports
(report.py)."""
