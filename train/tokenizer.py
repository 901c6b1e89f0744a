"""A byte-level BPE tokenizer trained on the corpus, carrying DeepSeek-V4's special tokens (ids 0..5)."""

from __future__ import annotations

import json
from pathlib import Path

from dsv4.engine.runtime.tokenizer import BOS, EOS, SPECIALS


def train_bpe(texts, vocab_size: int = 4096):
    """texts: iterable of str -> a ``tokenizers.Tokenizer`` (byte-level BPE, specials first)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer)
    for i, s in enumerate(SPECIALS):
        assert tk.token_to_id(s) == i, (s, tk.token_to_id(s))
    return tk


def save(tk, out: Path, max_len: int) -> None:
    tk.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "model_max_length": max_len, "tokenizer_class": "PreTrainedTokenizerFast"}))
