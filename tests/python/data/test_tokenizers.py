"""Tokenizers: exact GPT-2 ids offline, byte-level round trips, local tokenizers files."""

from __future__ import annotations

import pytest

from stackwise.data.tokenizers import ByteTokenizer, get_tokenizer
from stackwise.exceptions import ConfigurationError


def test_gpt2_exact_ids():
    tok = get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    text = "To be, or not to be: that is the question.\nWhether 'tis nobler..."
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 50259 and tok.eos_token_id == 50256
    assert (tok.mask_token_id, tok.pad_token_id) == (50257, 50258)
    assert tok.decode([15496, tok.mask_token_id, 995]) == "Hello<|mask|> world"
    # Special-token text is ordinary text, never the control id.
    assert 50256 not in tok.encode("a <|endoftext|> b")


def test_bytes_round_trip():
    tok = ByteTokenizer()
    s = "Thou art — más ñ 日本"
    assert tok.decode(tok.encode(s)) == s
    assert max(tok.encode(s)) < 256 and tok.vocab_size == 259


def test_bert_wordpiece_from_local_vocab(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "##s", "the"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = get_tokenizer(str(tmp_path))
    assert tok.encode("Hello worlds") == [5, 6, 7]
    assert (tok.mask_token_id, tok.pad_token_id, tok.eos_token_id) == (4, 0, 3)
    assert tok.vocab_size == len(vocab)


def test_tokenizer_json_from_local_file(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=60, special_tokens=["<unk>", "<pad>", "<mask>", "</s>"]
    )
    t.train_from_iterator(["the quick brown fox", "the lazy dog"] * 10, trainer)
    t.save(str(tmp_path / "tokenizer.json"))
    tok = get_tokenizer(str(tmp_path / "tokenizer.json"))
    ids = tok.encode("the quick dog")
    assert ids and all(isinstance(i, int) for i in ids)
    assert (tok.pad_token_id, tok.mask_token_id, tok.eos_token_id) == (1, 2, 3)


def test_unknown_tokenizer_is_a_config_error(tmp_path):
    with pytest.raises(ConfigurationError, match="unknown tokenizer 'gpt5'"):
        get_tokenizer("gpt5")
    with pytest.raises(ConfigurationError, match="neither tokenizer.json nor vocab.txt"):
        get_tokenizer(str(tmp_path))
