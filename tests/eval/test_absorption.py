"""aosae.absorption: SAEBench's per-word scores on hand-made tensors, and the pipeline end to
end on a tiny random Llama with a toy word tokenizer."""
import string

import pytest
import torch

from aosae.eval import absorption as AB

transformers = pytest.importorskip("transformers")


def test_word_scores_hand_computed():
    cfg = AB.AbsorptionConfig()
    d = 4
    probe = torch.tensor([1.0, 0.0, 0.0, 0.0])
    cos = torch.tensor([0.9, 0.5, 0.05, 0.3])  # latent 0 is the main latent
    x = torch.tensor([[2.0, 0, 0, 0]] * 3)  # probe projection 2 for every word
    acts = torch.tensor([
        [2.0 / 0.9, 0.0, 0.0, 0.0],  # main latent carries everything: no absorption
        [0.0, 4.0, 0.0, 0.0],  # main silent, latent 1 projects 2.0 (100%): full absorption
        [1.0 / 0.9, 2.0, 0.0, 0.0],  # main carries 1, latent 1 projects 1.0: fraction 0.5
    ])
    frac, full = AB.word_scores(acts, x, probe, cos, [0], cfg)
    torch.testing.assert_close(frac, torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64))
    assert full.tolist() == [False, True, False]
    assert d == x.shape[1]


def test_word_scores_thresholds():
    cfg = AB.AbsorptionConfig()
    probe = torch.tensor([1.0, 0.0])
    cos = torch.tensor([0.9, 0.05])  # latent 1 below the 0.1 cosine threshold for the fraction
    x = torch.tensor([[1.0, 0.0]])
    acts = torch.tensor([[0.0, 20.0]])  # projects 1.0 but cos 0.05 < 0.1: no absorption fraction
    frac, full = AB.word_scores(acts, x, probe, cos, [0], cfg)
    assert float(frac[0]) == 0.0
    assert bool(full[0])  # full absorption only needs cos >= 0.025


class _WordTokenizer:
    """Whole words as tokens: ' cat' is one token; punctuation and letters too."""

    def __init__(self, words):
        extra = [" has", " the", " first", " letter", ":", "\n"] + [" " + c.upper() for c in string.ascii_lowercase]
        self.vocab = ["<bos>"] + [" " + w for w in words] + extra
        self.index = {t: i for i, t in enumerate(self.vocab)}
        self.bos_token_id = 0

    def __len__(self):
        return len(self.vocab)

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)

    def __call__(self, text, add_special_tokens=False):
        ids, rest = [], text
        while rest:
            match = max((t for t in self.vocab[1:] if rest.startswith(t)), key=len)
            ids.append(self.index[match])
            rest = rest[len(match):]
        return {"input_ids": ids}


def test_pipeline_on_tiny_model(seed):
    from aosae.nn.sae import SparseAutoencoder

    gen = torch.Generator().manual_seed(seed)
    words = sorted({c + "".join(string.ascii_lowercase[int(i)] for i in torch.randint(0, 26, (4,), generator=gen))
                    for c in string.ascii_lowercase for _ in range(5)})
    tok = _WordTokenizer(words)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    letter_dirs = torch.randn(26, 32, generator=gen)
    with torch.no_grad():  # plant the first letter in each word's embedding so a probe can find it
        for i, w in enumerate(words, start=1):
            emb = 2.0 * letter_dirs[ord(w[0]) - ord("a")] + 0.3 * torch.randn(32, generator=gen)
            model.model.embed_tokens.weight[i] = emb
    sae = SparseAutoencoder.from_dims(32, 64)
    res = AB.absorption_eval(sae, model, tok, layer=1,
                             cfg=AB.AbsorptionConfig(max_words=120, n_icl=2, probe_steps=50), log=lambda s: None)
    assert res["absorption_n_words"] == 120
    assert 0.0 <= res["mean_absorption_fraction_score"] <= 1.0
    assert 0.0 <= res["mean_full_absorption_score"] <= 1.0
    assert res["mean_num_split_features"] >= 1
    assert "16k" in res["absorption_caveat"]
    assert len(AB.alpha_tokens(tok)) == len(words) + 4  # " has the first letter" are words too
