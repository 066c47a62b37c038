"""Data: tokenizers (corpora and loaders arrive with the product)."""

from __future__ import annotations

from stackwise.data.tokenizers import get_tokenizer

__all__ = ["get_tokenizer"]
