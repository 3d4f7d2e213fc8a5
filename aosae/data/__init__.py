"""Inputs: text corpora (text.py), language models and their hooked layers
(language_models.py), activation collection (activations.py) into the on-disk store (store.py),
the step-addressed shuffling buffer over it (mixing.py), activation sources for training
(sources.py: store, in-memory tensor, streaming), and synthetic ground-truth activations
(synthetic.py)."""
