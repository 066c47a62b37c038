"""Data loaders: token streams packed into fixed windows.

    train_loader, val_loader = create_data_loaders(config)

Each item is ``{"input_ids": [seq_len], "labels": [seq_len], "sample_id": int}`` where labels
are the next tokens (input shifted by one) and ``sample_id`` is the window's index, from which the
trainers derive per-sample masks deterministically. Windows do not overlap; the training loader
shuffles with a generator seeded from ``training.seed``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from stackwise.data.corpus import tokenized_corpus
from stackwise.data.tokenizers import get_tokenizer
from stackwise.exceptions import ConfigurationError


class PackedTokenDataset(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` tokens over a 1-D id array."""

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        if seq_len <= 0:
            raise ConfigurationError(f"seq_len must be > 0, got {seq_len}", "training.seq_len")
        self.tokens = tokens
        self.seq_len = seq_len
        self.n = max(0, (len(tokens) - 1) // seq_len)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(f"window {i} out of range [0, {self.n})")
        s = i * self.seq_len
        window = torch.from_numpy(np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64))
        return {"input_ids": window[:-1], "labels": window[1:], "sample_id": i}


def create_data_loaders(
    config, data_config=None, tokenizer=None, num_workers: int = 0, distributed=None
):
    """``(train_loader, val_loader)`` for a :class:`StackWiseConfig` or a
    :class:`TrainingConfig` (then ``data_config`` or the default data section is used).

    ``distributed`` (anything with ``rank`` and ``world_size``, e.g. a
    :class:`~stackwise.training.distributed.DistributedContext`): the training loader reads this
    rank's share of each global batch of ``training.batch_size`` through a
    :class:`~stackwise.data.sharding.RankShardSampler` (``DistributedSampler`` semantics,
    deterministic by seed and pass); with ``world_size`` 1 it reads the same global batches.
    The validation loader is not sharded (every rank evaluates the same batches)."""
    from stackwise.config.base import DataConfig, StackWiseConfig

    if isinstance(config, StackWiseConfig):
        training, data = config.training, config.data
    else:
        training, data = config, data_config or DataConfig()
    tok = tokenizer or get_tokenizer(data.tokenizer)
    corpus = tokenized_corpus(data.corpus, tok, data.val_fraction, data.text_field)
    seq_len = data.seq_len or training.seq_len
    train_ds = PackedTokenDataset(corpus.train, seq_len)
    val_ds = PackedTokenDataset(corpus.val, seq_len)
    if len(train_ds) == 0:
        raise ConfigurationError(
            f"corpus {data.corpus!r} has {len(corpus.train)} training tokens, fewer than one "
            f"window of {seq_len + 1}",
            "data.corpus",
        )
    if distributed is not None:
        from stackwise.data.sharding import RankShardSampler

        world = distributed.world_size
        sampler = RankShardSampler(
            len(train_ds), distributed.rank, world, training.batch_size, seed=training.seed
        )
        train = DataLoader(
            train_ds,
            batch_size=training.batch_size // world,
            sampler=sampler,
            num_workers=num_workers,
        )
        val = DataLoader(
            val_ds, batch_size=training.batch_size, shuffle=False, num_workers=num_workers
        )
        return train, val
    gen = torch.Generator().manual_seed(training.seed)
    train = DataLoader(
        train_ds,
        batch_size=training.batch_size,
        shuffle=True,
        generator=gen,
        drop_last=len(train_ds) >= training.batch_size,
        num_workers=num_workers,
    )
    val = DataLoader(val_ds, batch_size=training.batch_size, shuffle=False, num_workers=num_workers)
    return train, val
