"""Inputs: text corpora (text.py), language models and their hooked layers
(language_models.py), activation collection and caching (activations.py), and synthetic
ground-truth activations (synthetic.py)."""
