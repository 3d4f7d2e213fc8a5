"""A tiny offline LM and a text file to train on, shared by the training tests."""
import pytest
from tiny_lm import corpus_text, make_tiny_lm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{"model": dir of a random 2-layer GPT-2, "dataset": a text file, "cache": an activation cache dir}."""
    root = tmp_path_factory.mktemp("tiny")
    model = make_tiny_lm(root / "model")
    text = root / "corpus.txt"
    text.write_text(corpus_text() * 2)
    return {"model": str(model), "dataset": str(text), "cache": str(root / "cache")}
