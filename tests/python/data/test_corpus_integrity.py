"""The token cache and local corpora against bad input (issue R1, items 13, 16, 17): a cache file
rewritten behind the record's back, records of two tokenizers of one file, garbage metadata,
corpora that are not UTF-8 and corpora of empty documents."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stackwise.data.corpus import tokenized_corpus
from stackwise.data.tokenizers import ByteTokenizer
from stackwise.exceptions import ConfigurationError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STACKWISE_CACHE_DIR", str(tmp_path / "cache"))


class _OtherTokenizer(ByteTokenizer):
    """A second tokenizer of the same vocabulary size: ids shifted by one."""

    name = "bytes-shifted"

    def encode(self, text):
        return [(i + 1) % 256 for i in super().encode(text)]


def _corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return path


def test_same_length_rewrite_of_the_ids_is_detected(tmp_path):
    path = _corpus(tmp_path)
    first = tokenized_corpus(str(path), ByteTokenizer(), 0.1)
    expected = np.array(first.train)
    (train_bin,) = (tmp_path / "cache").glob("*.train.bin")
    train_bin.write_bytes(b"A" * train_bin.stat().st_size)  # same length, all 'A'
    with pytest.warns(UserWarning, match="does not match its SHA-256"):
        again = tokenized_corpus(str(path), ByteTokenizer(), 0.1)
    assert np.array_equal(np.asarray(again.train), expected)
    assert np.array_equal(
        np.asarray(tokenized_corpus(str(path), ByteTokenizer(), 0.1).train), expected
    )


def test_two_tokenizers_of_one_file_keep_their_own_records(tmp_path):
    path = _corpus(tmp_path)
    a = tokenized_corpus(str(path), ByteTokenizer(), 0.1)
    b = tokenized_corpus(str(path), _OtherTokenizer(), 0.1)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2
    again_a = tokenized_corpus(str(path), ByteTokenizer(), 0.1)
    again_b = tokenized_corpus(str(path), _OtherTokenizer(), 0.1)
    assert isinstance(again_a.train, np.memmap) and isinstance(again_b.train, np.memmap)
    assert np.array_equal(again_a.train, a.train) and np.array_equal(again_b.train, b.train)
    assert not np.array_equal(a.train, b.train)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff\xfe not json",
        b"[1, 2, 3]",
        b'{"format": 2}',
        b"null",
        json.dumps({"format": 2, "digest": "x", "dtype": "object"}).encode(),
    ],
)
def test_garbage_metadata_is_reported_and_rebuilt(tmp_path, garbage):
    path = _corpus(tmp_path)
    expected = np.array(tokenized_corpus(str(path), ByteTokenizer(), 0.1).train)
    (meta,) = (tmp_path / "cache").glob("*.json")
    meta.write_bytes(garbage)
    with pytest.warns(UserWarning, match="token cache .* is unusable"):
        rebuilt = tokenized_corpus(str(path), ByteTokenizer(), 0.1)
    assert np.array_equal(np.asarray(rebuilt.train), expected)
    assert json.loads(meta.read_text())["format"] == 2


def test_truncated_cache_file_is_rebuilt(tmp_path):
    path = _corpus(tmp_path)
    expected = np.array(tokenized_corpus(str(path), ByteTokenizer(), 0.1).train)
    (train_bin,) = (tmp_path / "cache").glob("*.train.bin")
    train_bin.write_bytes(train_bin.read_bytes()[:-3])
    with pytest.warns(UserWarning, match="not .* tokens long"):
        rebuilt = tokenized_corpus(str(path), ByteTokenizer(), 0.1)
    assert np.array_equal(np.asarray(rebuilt.train), expected)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_non_utf8_corpus_names_the_file(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    text = "caf\xe9 " * 50
    body = json.dumps({"text": text}, ensure_ascii=False) if suffix == ".jsonl" else text
    path.write_bytes(body.encode("latin-1"))
    with pytest.raises(ConfigurationError, match=r"latin1.* is not UTF-8 text \(byte \d+"):
        tokenized_corpus(str(path), ByteTokenizer(), 0.1)


def test_non_utf8_file_in_a_folder_names_the_file(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "good.txt").write_text("fine text " * 20)
    (folder / "bad.txt").write_bytes(b"bad \xff\xfe text")
    with pytest.raises(ConfigurationError, match="bad.txt is not UTF-8"):
        tokenized_corpus(str(folder), ByteTokenizer(), 0.1)


def test_jsonl_of_empty_texts_is_refused(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n".join(json.dumps({"text": ""}) for _ in range(20)))
    with pytest.raises(ConfigurationError, match="holds no text: all 20 document"):
        tokenized_corpus(str(path), ByteTokenizer(), 0.1)


def test_jsonl_with_some_empty_texts_still_loads(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [{"text": ""}] * 3 + [{"text": f"document {i} " * 20} for i in range(6)]
    path.write_text("\n".join(json.dumps(r) for r in lines))
    assert tokenized_corpus(str(path), ByteTokenizer(), 0.2).record["train_tokens"] > 0
