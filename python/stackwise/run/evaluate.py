"""Evaluation of a trained run: loss, perplexity, bits per byte, masked-token accuracy, and the
unigram baseline a model must beat.

- **loss**: mean cross entropy (nats) per predicted token over the split's windows: next tokens
  for causal racks; for mlm / diffusion racks the masked positions at the mask ratio of the last
  stage trained (``training.masking.max_fraction`` for both building modes), masks drawn from
  the sample ids as in training.
- **perplexity**: exp(loss).
- **bits per byte**: loss x tokens / bytes / ln 2, where tokens are the split's evaluated target
  tokens and bytes the UTF-8 bytes of their text (special tokens count no bytes). Comparable
  across tokenizers.
- **masked accuracy** (mlm / diffusion racks): share of masked positions whose most likely token
  is the original one.
- **unigram baseline**: cross entropy of the split's tokens under the training split's token
  frequencies (add-one smoothed over the vocabulary): what a model that ignores context scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stackwise.exceptions import ConfigurationError, RackLayoutError, TrainingError
from stackwise.run.rundir import RunDirectory

MASKED_OBJECTIVES = ("mlm", "diffusion")


@dataclass
class LoadedRun:
    """A trained run: its configuration, rack (in eval mode), tokenizer and folder."""

    run_dir: RunDirectory
    config: Any
    rack: Any
    tokenizer: Any
    device: torch.device
    notes: list[str] = field(default_factory=list)  # where the rack came from, when not rack/

    @property
    def masked(self) -> bool:
        return self.config.training.progressive.training_objective in MASKED_OBJECTIVES


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError("device 'cuda' asked for but no GPU is visible", "training.device")
    return torch.device(name)


def load_run(path, device: str | None = None) -> LoadedRun:
    """Load the configuration, tokenizer and final rack of the run in ``path``.

    The rack comes from ``rack/``; every failure there (a missing or unverifiable manifest
    entry, a checksum mismatch, weights that do not fit) is raised. Only a rack whose stacks
    were converted (quantized or adapted trunk, :class:`RackLayoutError`) is rebuilt from the
    checkpoint ``checkpoints/latest`` names, and ``LoadedRun.notes`` says so; without a
    ``rack/`` the run is unfinished and the checkpoint is used the same way."""
    from stackwise.config.base import StackWiseConfig
    from stackwise.data.tokenizers import get_tokenizer
    from stackwise.model.architecture import load_rack
    from stackwise.run.resume import resume_checkpoint

    run = RunDirectory(path).require_run()
    config = StackWiseConfig.from_yaml(run.config)
    tokenizer = get_tokenizer(run.read_run_json().get("tokenizer", config.data.tokenizer))
    dev = resolve_device(device or config.training.device)
    rack, notes = None, []
    why = f"{run.rack} holds no saved rack (the run has not finished)"
    if run.rack.is_dir():
        why = f"{run.rack} has no manifest.json (its save did not complete)"
    if (run.rack / "manifest.json").is_file():
        try:
            rack = load_rack(run.rack)
        except RackLayoutError as exc:
            why = str(exc)
    if rack is None:
        folder = resume_checkpoint(run.checkpoints, [], repair=False)
        if folder is None:
            raise TrainingError(
                f"{run.root} has no trained rack yet (no rack/ and no checkpoint); finish it "
                f"with: stackwise train --resume --run-dir {run.root}"
            )
        from stackwise.training.progressive import ProgressiveTrainer

        _, builder = ProgressiveTrainer.resume(str(run.checkpoints), config)
        rack = builder.rack
        notes.append(f"{why}; using checkpoint {folder.name}")
    rack.to(dev).eval()
    return LoadedRun(run, config, rack, tokenizer, dev, notes)


def eval_mask_ratio(config, n_stacks: int) -> float:
    """Mask ratio of the last stage trained (the one the whole rack was trained for)."""
    from stackwise.training.strategies.masking import MaskScheduler

    m = config.training.masking
    prepend = config.training.progressive.building_mode == "prepend"
    target = max(n_stacks, 1)
    stage = target - 1
    position = target - 1 - stage if prepend else stage
    return MaskScheduler(
        m.min_fraction, m.max_fraction, m.schedule, reverse=prepend
    ).get_mask_fraction(position, target)


def special_ids(tokenizer) -> tuple[int, ...]:
    ids = (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id)
    return tuple(int(i) for i in ids if i is not None)


def text_bytes(tokenizer, ids: np.ndarray) -> int:
    """UTF-8 bytes of the text of ``ids``, special tokens excluded."""
    arr = np.asarray(ids, dtype=np.int64)
    keep = ~np.isin(arr, np.asarray(special_ids(tokenizer), dtype=np.int64))
    total = 0
    chunk = 1 << 16  # decode in pieces (a multi-byte character split at a cut costs a few bytes)
    kept = arr[keep]
    for s in range(0, len(kept), chunk):
        total += len(tokenizer.decode(kept[s : s + chunk].tolist()).encode("utf-8"))
    return total


def unigram_loss(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross entropy (nats) of ``eval_tokens`` under add-one smoothed train frequencies."""
    if len(eval_tokens) == 0:
        return float("nan")
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size)
    counts = counts[:vocab_size].astype(np.float64) + 1.0
    logp = np.log(counts) - np.log(counts.sum())
    return float(-logp[np.asarray(eval_tokens, dtype=np.int64)].mean())


@torch.no_grad()
def evaluate_run(
    run: LoadedRun,
    split: str = "val",
    max_batches: int | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Loss, perplexity, bits per byte, masked accuracy and unigram baseline on ``split``."""
    from torch.utils.data import DataLoader

    from stackwise.data import create_data_loaders
    from stackwise.training.strategies.masking import (
        IGNORE_INDEX,
        diffusion_corrupt,
        mlm_corrupt,
    )

    if split not in ("train", "val"):
        raise ConfigurationError(f"split {split!r} is not 'train' or 'val'", "--split")
    config, tok, rack, dev = run.config, run.tokenizer, run.rack, run.device
    train_loader, val_loader = create_data_loaders(config, tokenizer=tok)
    dataset = (train_loader if split == "train" else val_loader).dataset
    if len(dataset) == 0:
        raise TrainingError(
            f"the {split} split of corpus {config.data.corpus!r} is shorter than one window of "
            f"{dataset.seq_len + 1} tokens"
        )
    bs = batch_size or config.training.batch_size
    loader = DataLoader(dataset, batch_size=bs, shuffle=False)
    ratio = eval_mask_ratio(config, len(rack.stacks)) if run.masked else 0.0
    objective = config.training.progressive.training_objective
    specials = special_ids(tok)
    mask_id = tok.mask_token_id if tok.mask_token_id is not None else config.model.vocab_size - 1
    total_nats, n_scored, n_correct, n_windows = 0.0, 0, 0, 0
    rack.eval()
    for batch_idx, batch in enumerate(loader):
        if max_batches is not None and batch_idx >= max_batches:
            break
        ids = batch["input_ids"]
        if run.masked:
            corrupt = mlm_corrupt if objective == "mlm" else diffusion_corrupt
            kwargs = {"vocab_size": config.model.vocab_size} if objective == "mlm" else {}
            if objective == "mlm":
                kwargs.update(
                    mask_prob=config.training.masking.mask_token_prob,
                    random_prob=config.training.masking.random_token_prob,
                )
            inputs, labels = corrupt(
                ids,
                torch.as_tensor(batch["sample_id"]),
                ratio,
                seed=config.training.seed,
                mask_token_id=mask_id,
                special_ids=specials,
                **kwargs,
            )
        else:
            inputs, labels = ids, batch["labels"]
        logits = rack(inputs.to(dev)).float()
        labels = labels.to(dev)
        scored = labels != IGNORE_INDEX
        total_nats += float(
            F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
        )
        n_scored += int(scored.sum())
        n_correct += int(((logits.argmax(-1) == labels) & scored).sum())
        n_windows += ids.shape[0]
    if n_scored == 0:
        raise TrainingError(f"nothing to score on the {split} split (no masked or target token)")
    loss = total_nats / n_scored
    seq = dataset.seq_len
    targets = np.asarray(dataset.tokens[1 : n_windows * seq + 1])
    n_bytes = text_bytes(tok, targets)
    train_tokens = train_loader.dataset.tokens
    return {
        "split": split,
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "bits_per_byte": loss * len(targets) / n_bytes / math.log(2) if n_bytes else None,
        "masked_accuracy": n_correct / n_scored if run.masked else None,
        "mask_ratio": ratio if run.masked else None,
        "unigram_loss": unigram_loss(train_tokens, targets, config.model.vocab_size),
        "tokens": int(len(targets)),
        "scored_tokens": n_scored,
        "bytes": n_bytes,
        "windows": n_windows,
    }
