"""Data: tokenizers, corpora (tokenized once, cached) and packed-window loaders."""

from __future__ import annotations

from stackwise.data.loaders import PackedTokenDataset, create_data_loaders
from stackwise.data.tokenizers import get_tokenizer

__all__ = ["PackedTokenDataset", "create_data_loaders", "get_tokenizer"]
