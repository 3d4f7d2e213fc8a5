"""A tiny random GPT-2 and a byte-level BPE tokenizer trained on the fly: offline test models."""
from __future__ import annotations

import inspect
from pathlib import Path


def corpus_text() -> str:
    """A few kB of real text (this repo's sources) for tokenizer training and test datasets."""
    import aosae.nn.loss
    import aosae.nn.tau
    import aosae.ops.gram_topk

    return "".join(inspect.getsource(m) for m in (aosae.nn.loss, aosae.nn.tau, aosae.ops.gram_topk))


def make_tiny_lm(directory: Path, n_layer: int = 2, n_embd: int = 32, seed: int = 0) -> Path:
    """Save a random 2-layer GPT-2 (d_model 32) + tokenizer (BOS/EOS/pad) into `directory`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus_text()], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=fast.vocab_size, n_positions=128, n_embd=n_embd, n_layer=n_layer, n_head=2,
                        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory
