"""Evaluation of a trained run: loss, perplexity, bits per byte, masked-token accuracy, and the
unigram baseline a model must beat.

- **loss**: mean cross entropy (nats) per predicted token over the split's windows (the first
  ``training.eval_max_tokens`` tokens' worth of them when that is set; ``tokens`` and
  ``split_tokens`` in the result say how many were scored of how many): next tokens
  for causal racks; for mlm / diffusion racks the masked positions at the mask ratio of the last
  stage trained (``training.masking.max_fraction`` for both building modes), masks drawn from
  the sample ids as in training. A rack with ``time_interpretation: input`` is evaluated as it
  was trained: each sample at its own noise level t ~ U(min_fraction, max_fraction) (a pure
  function of its id and ``training.seed``), given to the rack as its time input;
  ``mask_ratio`` then reports the mean level.
- **perplexity**: exp(loss).
- **bits per byte**: what it measures depends on the objective and is named in
  ``bits_per_byte_quantity`` (:mod:`stackwise.run.likelihood`): next-token cross entropy for
  causal racks, the masked-diffusion ELBO bound for diffusion racks, none for mlm racks. Bytes
  are the UTF-8 bytes of the scored windows' tokens (special tokens count no bytes).
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

    @property
    def input_time(self) -> bool:
        """The rack takes the noise level as input (``time_interpretation: input``)."""
        return getattr(self.rack, "time_embedding", None) is not None

    @property
    def mask_id(self) -> int:
        """The mask token: the tokenizer's, else the last id (as the trainer does)."""
        i = self.tokenizer.mask_token_id
        return int(i) if i is not None else self.config.model.vocab_size - 1


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


def _eval_inputs(run: LoadedRun, ids, sample_ids, ratio: float):
    """``(inputs, labels, time)`` of one batch of a masked rack: the training objective's masks
    at ``ratio`` or, with
    ``time_interpretation: input``, at each sample's noise level t drawn as in training
    (:func:`sample_noise_levels`), t then also being the rack's time input."""
    from stackwise.training.strategies.masking import corrupt_batch, sample_noise_levels

    config = run.config
    objective = config.training.progressive.training_objective
    time = None
    if run.input_time:
        m = config.training.masking
        time = sample_noise_levels(sample_ids, config.training.seed, m.min_fraction, m.max_fraction)
        ratio = time
    parsed = {"input_ids": ids, "attention_mask": None, "labels": None, "sample_id": sample_ids}
    inputs, labels = corrupt_batch(
        parsed,
        ratio,
        objective,
        seed=config.training.seed,
        mask_token_id=run.mask_id,
        special_ids=special_ids(run.tokenizer),
        vocab_size=config.model.vocab_size,
        masking=config.training.masking,
    )
    return inputs, labels, None if time is None else time.to(run.device)


def _rank_share() -> tuple[int, int, object]:
    """``(rank, world_size, context)`` of a data-parallel job (torchrun), ``(0, 1, None)``
    for one process."""
    from stackwise.training.distributed import active_context

    ctx = active_context()
    return (ctx.rank, ctx.world_size, ctx) if ctx is not None else (0, 1, None)


def _batch_bytes(tok, tokens, first: int, start_window: int, n_windows: int, seq: int) -> int:
    """UTF-8 bytes of the scored tokens of ``n_windows`` windows from ``start_window`` (decoded
    per batch, so a data-parallel evaluation counts exactly what one process counts)."""
    lo = first + start_window * seq
    return text_bytes(tok, np.asarray(tokens[lo : lo + n_windows * seq]))


@torch.inference_mode()
def evaluate_run(
    run: LoadedRun,
    split: str = "val",
    max_batches: int | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Loss, perplexity, bits per byte (and what it measures), masked accuracy and unigram
    baseline on ``split``.

    The head and the loss run as one native op (:func:`stackwise.ops.linear_cross_entropy`,
    per-token losses and argmax), so the ``tokens x vocab`` logits never exist. Under torchrun
    rank r evaluates batches r, r + W, ...; the sums (nats, scored tokens, correct predictions,
    bytes, and a diffusion rack's bound) are all-reduced, so every rank returns the figures of
    one process."""
    from torch.utils.data import DataLoader, Subset

    from stackwise.data import create_data_loaders
    from stackwise.ops import linear_cross_entropy_with_predictions
    from stackwise.run import likelihood
    from stackwise.training.strategies.masking import IGNORE_INDEX

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
    split_tokens = len(dataset) * dataset.seq_len
    cap = config.training.eval_max_tokens
    windows = dataset
    if cap is not None and cap < split_tokens:
        # the first windows holding at most `cap` tokens (at least one window)
        windows = Subset(dataset, range(max(1, cap // dataset.seq_len)))
    loader = DataLoader(windows, batch_size=bs, shuffle=False)
    objective = config.training.progressive.training_objective
    m = config.training.masking
    ratio = 0.0
    if run.masked:
        ratio = (
            0.5 * (m.min_fraction + m.max_fraction)  # the mean of the per-sample noise levels
            if run.input_time
            else eval_mask_ratio(config, len(rack.stacks))
        )
    rank, world, ctx = _rank_share()
    seq = dataset.seq_len
    # the tokens scored: next tokens of causal racks, the windows' own tokens of masked ones
    first = 0 if run.masked else 1
    total_nats, n_scored, n_correct, n_windows, n_bytes = 0.0, 0, 0, 0, 0
    batches = []  # (ids, sample ids) of this rank's batches, for the bound of a diffusion rack
    rack.eval()
    for batch_idx, batch in enumerate(loader):
        if max_batches is not None and batch_idx >= max_batches:
            break
        ids, sample_ids = batch["input_ids"], torch.as_tensor(batch["sample_id"])
        start, n_windows = n_windows, n_windows + ids.shape[0]
        if batch_idx % world != rank:
            continue
        if run.masked:
            inputs, labels, time = _eval_inputs(run, ids, sample_ids, ratio)
        else:
            inputs, labels, time = ids, batch["labels"], None
        hidden = rack.forward_from(rack.embed(inputs.to(dev), time), 0)
        h, weight, bias = rack.head_inputs(hidden)
        labels = labels.to(dev)
        losses, preds = linear_cross_entropy_with_predictions(
            h, weight, labels, bias, ignore_index=IGNORE_INDEX
        )
        scored = labels != IGNORE_INDEX
        total_nats += float(losses.double().sum())
        n_scored += int(scored.sum())
        n_correct += int(((preds == labels) & scored).sum())
        n_bytes += _batch_bytes(tok, dataset.tokens, first, start, ids.shape[0], seq)
        if objective == "diffusion":
            batches.append((ids, sample_ids))
    bound = None
    if objective == "diffusion":
        bound = likelihood.diffusion_nll_bound_nats(
            rack,
            batches,
            seed=config.training.seed,
            mask_token_id=run.mask_id,
            special_ids=special_ids(tok),
            device=dev,
        )
    if ctx is not None:
        total_nats = ctx.all_reduce_sum(total_nats)
        n_scored = round(ctx.all_reduce_sum(n_scored))
        n_correct = round(ctx.all_reduce_sum(n_correct))
        n_bytes = round(ctx.all_reduce_sum(n_bytes))
        if bound is not None:
            bound = ctx.all_reduce_sum(bound)
    if n_scored == 0:
        raise TrainingError(f"nothing to score on the {split} split (no masked or target token)")
    loss = total_nats / n_scored
    targets = np.asarray(dataset.tokens[first : first + n_windows * seq])
    quantity = likelihood.bits_per_byte_quantity(objective)
    bpb = None
    if objective == "clm":
        bpb = likelihood.bits_per_byte(total_nats, n_bytes)
    elif objective == "diffusion":
        bpb = likelihood.bits_per_byte(bound, n_bytes)
    train_tokens = train_loader.dataset.tokens
    return {
        "split": split,
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "bits_per_byte": bpb,
        "bits_per_byte_quantity": quantity if bpb is not None else None,
        "masked_accuracy": n_correct / n_scored if run.masked else None,
        "mask_ratio": ratio if run.masked else None,
        "unigram_loss": unigram_loss(train_tokens, targets, config.model.vocab_size),
        "tokens": int(len(targets)),
        "scored_tokens": n_scored,
        "bytes": n_bytes,
        "windows": n_windows,
        "split_tokens": split_tokens,
    }
