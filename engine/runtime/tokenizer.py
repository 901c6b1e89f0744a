"""Tokenizer (the ``tokenizers`` library over tokenizer.json), V4 special tokens, streaming decode."""

from __future__ import annotations

import json
from pathlib import Path

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
SPECIALS = (BOS, EOS, USER, ASSISTANT, THINK, END_THINK)


class TokenizerError(ValueError):
    pass


class Tokenizer:
    def __init__(self, tk):
        self.tk = tk
        missing = [s for s in SPECIALS if tk.token_to_id(s) is None]
        if missing:
            raise TokenizerError(f"tokenizer lacks DeepSeek-V4 special tokens: {', '.join(missing)}")
        self.ids = {s: tk.token_to_id(s) for s in SPECIALS}
        self.bos_id, self.eos_id = self.ids[BOS], self.ids[EOS]

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        f = Path(path) / "tokenizer.json"
        if not f.exists():
            raise TokenizerError(f"{f}: no tokenizer.json in the model folder")
        try:
            return cls(HFTokenizer.from_file(str(f)))
        except TokenizerError:
            raise
        except Exception as e:
            raise TokenizerError(f"{f}: cannot load tokenizer ({str(e).splitlines()[0][:120]})") from None

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Text (special tokens written literally are recognised) -> ids, no bos added."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns ids arriving one at a time into text, never emitting half a UTF-8 character.

    Text is decoded from a window of recent ids; a trailing U+FFFD (an incomplete byte sequence)
    is held back until the next id completes it.
    """

    def __init__(self, tok: Tokenizer):
        self.tok, self.ids, self.prefix, self.read = tok, [], 0, 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
        new_text = self.tok.decode(self.ids[self.prefix:])
        if new_text.endswith("\ufffd") or len(new_text) <= len(prefix_text):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """Whatever is held back at the end (may contain U+FFFD for a truly broken sequence)."""
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
        rest = self.tok.decode(self.ids[self.prefix:])[len(prefix_text):]
        self.prefix = self.read = len(self.ids)
        return rest


def build_byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + the V4 special tokens (ids 0..5)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(list(SPECIALS))
    return tk


def write_byte_tokenizer(out) -> None:
    out = Path(out)
    build_byte_tokenizer().save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "model_max_length": 1048576, "tokenizer_class": "PreTrainedTokenizerFast"}))
