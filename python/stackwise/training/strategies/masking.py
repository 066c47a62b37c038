"""Mask schedules and training objectives: mlm, clm and diffusion (depth as time).

    scheduler = MaskScheduler(min_fraction=0.1, max_fraction=0.9, schedule_type="linear")
    fraction = scheduler.get_mask_fraction(layer_idx, total_layers)

Schedules map t = layer_idx / (total_layers - 1) in [0, 1] to a fraction in
[min_fraction, max_fraction], exactly min at t=0 and max at t=1, monotone non-decreasing:
linear (min + (max-min) t), cosine (min + (max-min) (1 - cos(pi t)) / 2), exponential
(min + (max-min) (e^{3t} - 1) / (e^3 - 1)), constant (max everywhere). ``reverse=True`` gives
depth-as-time order: the highest fraction on the left (layer 0), the lowest on the right.

Masks are a pure function of (sample id, position, ratio, seed) through a counter-based 32-bit
integer hash, so a resumed or distributed run, or a batch in another order, draws the same masks.
The ratio may be one number for the batch or one per sample (a [B] tensor): with
``time_interpretation="input"`` each sample draws its own noise level t ~ U(min, max) from
:func:`sample_noise_levels`, again a pure function of (sample id, seed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from stackwise.exceptions import ConfigurationError, TrainingError

SCHEDULES = ("linear", "cosine", "exponential", "constant")
IGNORE_INDEX = -100
_MASK32 = 0xFFFFFFFF
# hash streams: 0-2 are mlm_corrupt's selection / kind / random-id draws; 3 the noise level.
_TIME_STREAM = 3


class MaskScheduler:
    """Mask fraction per layer (or stack) index; see the module docstring for the schedules."""

    def __init__(
        self,
        min_fraction: float = 0.1,
        max_fraction: float = 0.9,
        schedule_type: str = "linear",
        reverse: bool = False,
    ) -> None:
        if schedule_type not in SCHEDULES:
            raise ConfigurationError(
                f"{schedule_type!r} is not one of {list(SCHEDULES)}", "training.masking.schedule"
            )
        if not 0.0 <= min_fraction <= max_fraction <= 1.0:
            raise ConfigurationError(
                f"need 0 <= min_fraction <= max_fraction <= 1, got {min_fraction}, {max_fraction}",
                "training.masking.min_fraction",
            )
        self.min_fraction, self.max_fraction = float(min_fraction), float(max_fraction)
        self.schedule_type, self.reverse = schedule_type, reverse

    def fraction_at(self, t: float) -> float:
        """The schedule at t in [0, 1] (before ``reverse``)."""
        lo, hi = self.min_fraction, self.max_fraction
        if self.schedule_type == "constant":
            return hi
        if t <= 0.0:
            return lo
        if t >= 1.0:
            return hi
        if self.schedule_type == "linear":
            return lo + (hi - lo) * t
        if self.schedule_type == "cosine":
            return lo + (hi - lo) * (1.0 - math.cos(math.pi * t)) / 2.0
        return lo + (hi - lo) * math.expm1(3.0 * t) / math.expm1(3.0)

    def get_mask_fraction(self, layer_idx: int, total_layers: int) -> float:
        if total_layers < 1:
            raise ConfigurationError(f"total_layers must be >= 1, got {total_layers}")
        if not 0 <= layer_idx < total_layers:
            raise ConfigurationError(f"layer_idx {layer_idx} is outside [0, {total_layers})")
        if total_layers == 1:
            return self.fraction_at(1.0)
        k = total_layers - 1 - layer_idx if self.reverse else layer_idx
        return self.fraction_at(k / (total_layers - 1))


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (the "lowbias32" finaliser) on int64 tensors holding uint32."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def hash_uniform(sample_ids: Tensor, seq_len: int, seed: int, stream: int) -> Tensor:
    """Uniform [0, 1) floats of shape [B, seq_len], a pure function of (sample id, position,
    seed, stream)."""
    sid = sample_ids.to(torch.int64).reshape(-1, 1)
    pos = torch.arange(seq_len, dtype=torch.int64, device=sample_ids.device).reshape(1, -1)
    h = _mix32(pos + (stream & 0xFFFF) * 0x10001)
    h = _mix32(h ^ _mix32(sid ^ ((sid >> 32) * 0x9E3779B9)))
    h = _mix32(h ^ (seed & _MASK32))
    return h.to(torch.float64).div_(2.0**32).to(torch.float32)


def _check_ratio(ratio: float | Tensor, batch: int) -> Tensor | float:
    """``ratio`` as a float, or as a [B, 1] float tensor (one ratio per sample)."""
    if isinstance(ratio, Tensor):
        if ratio.dim() != 1 or ratio.shape[0] != batch:
            raise ConfigurationError(
                f"a per-sample mask ratio must have shape [{batch}], got {tuple(ratio.shape)}"
            )
        r = ratio.detach().to(torch.float32)
        if bool(((r < 0) | (r > 1) | r.isnan()).any()):
            raise ConfigurationError("per-sample mask ratios must be in [0, 1]")
        return r.reshape(-1, 1)
    if not 0.0 <= ratio <= 1.0:
        raise ConfigurationError(f"mask ratio must be in [0, 1], got {ratio}")
    return ratio


def sample_noise_levels(
    sample_ids: Tensor, seed: int, min_fraction: float, max_fraction: float
) -> Tensor:
    """One noise level per sample, t ~ U(min_fraction, max_fraction) as float32 [B], a pure
    function of (sample id, seed) (its own hash stream, independent of the mask draws)."""
    u = hash_uniform(sample_ids.reshape(-1), 1, seed, _TIME_STREAM)[:, 0]
    return min_fraction + (max_fraction - min_fraction) * u


def mlm_corrupt(
    input_ids: Tensor,
    sample_ids: Tensor,
    ratio: float | Tensor,
    *,
    seed: int,
    mask_token_id: int,
    vocab_size: int,
    special_ids: tuple[int, ...] = (),
    attention_mask: Tensor | None = None,
    mask_prob: float = 0.8,
    random_prob: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """Select ``ratio`` (a float, or a [B] tensor of per-sample ratios) of the maskable
    positions; of those, ``mask_prob`` become the mask token,
    ``random_prob`` a random token (never a special one), the rest stay. Padding
    (``attention_mask`` False) and ``special_ids`` are never selected.

    Returns ``(corrupted_ids, labels)``, labels holding the original id at selected positions
    and -100 elsewhere (the loss is taken on selected positions only).
    """
    b, s = input_ids.shape
    ratio = _check_ratio(ratio, b)
    if isinstance(ratio, Tensor):
        ratio = ratio.to(input_ids.device)
    if mask_prob < 0 or random_prob < 0 or mask_prob + random_prob > 1:
        raise ConfigurationError(
            f"mask_prob {mask_prob} + random_prob {random_prob} must be in [0, 1]",
            "training.masking.mask_token_prob",
        )
    maskable = torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask is not None:
        maskable &= attention_mask.bool()
    for sid in special_ids:
        maskable &= input_ids != sid
    selected = (hash_uniform(sample_ids, s, seed, 0).to(input_ids.device) < ratio) & maskable
    u = hash_uniform(sample_ids, s, seed, 1).to(input_ids.device)
    to_mask = selected & (u < mask_prob)
    to_random = selected & (u >= mask_prob) & (u < mask_prob + random_prob)
    r = hash_uniform(sample_ids, s, seed, 2).to(input_ids.device)
    random_ids = (r * vocab_size).long().clamp_(max=vocab_size - 1)
    for sid in special_ids:  # a special id drawn at random becomes the next ordinary id
        random_ids = torch.where(random_ids == sid, (random_ids + 1) % vocab_size, random_ids)
    corrupted = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    corrupted = torch.where(to_random, random_ids, corrupted)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return corrupted, labels


def diffusion_corrupt(
    input_ids: Tensor,
    sample_ids: Tensor,
    ratio: float | Tensor,
    *,
    seed: int,
    mask_token_id: int,
    special_ids: tuple[int, ...] = (),
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Masked diffusion at noise level ``ratio``: every selected position becomes the mask token
    (absorbing state); labels as in :func:`mlm_corrupt`."""
    return mlm_corrupt(
        input_ids,
        sample_ids,
        ratio,
        seed=seed,
        mask_token_id=mask_token_id,
        vocab_size=mask_token_id + 1,
        special_ids=special_ids,
        attention_mask=attention_mask,
        mask_prob=1.0,
        random_prob=0.0,
    )


def clm_labels(input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Next-token labels for [B, S] ids: labels[:, t] = ids[:, t+1], -100 at the last position
    and wherever the target is padding."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        pad_target = torch.zeros_like(input_ids, dtype=torch.bool)
        pad_target[:, :-1] = ~attention_mask[:, 1:].bool()
        labels = labels.masked_fill(pad_target, IGNORE_INDEX)
    return labels


def corrupt_batch(
    parsed: dict[str, Tensor | None],
    ratio: float | Tensor,
    objective: str,
    *,
    seed: int,
    mask_token_id: int,
    special_ids: tuple[int, ...],
    vocab_size: int,
    masking,
) -> tuple[Tensor, Tensor]:
    """``(model inputs, labels)`` of a parsed batch (``input_ids``, ``attention_mask``,
    ``labels``, ``sample_id``) for ``objective``: "clm" (the ids and their next-token labels,
    or the batch's own labels), "mlm" (:func:`mlm_corrupt` with ``masking``'s token
    probabilities) or "diffusion" (:func:`diffusion_corrupt`), at mask ratio ``ratio`` (a float,
    or one noise level per sample)."""
    ids, attn = parsed["input_ids"], parsed["attention_mask"]
    if objective == "clm":
        labels = parsed["labels"] if parsed["labels"] is not None else clm_labels(ids, attn)
        return ids, labels.long()
    kwargs = dict(
        seed=seed, mask_token_id=mask_token_id, special_ids=special_ids, attention_mask=attn
    )
    if objective == "mlm":
        return mlm_corrupt(
            ids,
            parsed["sample_id"],
            ratio,
            vocab_size=vocab_size,
            mask_prob=masking.mask_token_prob,
            random_prob=masking.random_token_prob,
            **kwargs,
        )
    return diffusion_corrupt(ids, parsed["sample_id"], ratio, **kwargs)


def token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross entropy over positions whose label is not -100. A batch without any such
    position has no loss to train on: :class:`TrainingError` (the trainers skip such
    micro-batches, and refuse a step that has none with a target)."""
    flat = labels.reshape(-1)
    if not bool((flat != IGNORE_INDEX).any()):
        raise TrainingError(
            "no position has a target (every label is -100): there is no loss to train on"
        )
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), flat, ignore_index=IGNORE_INDEX
    )


__all__ = [
    "MaskScheduler",
    "clm_labels",
    "corrupt_batch",
    "diffusion_corrupt",
    "hash_uniform",
    "mlm_corrupt",
    "sample_noise_levels",
    "token_loss",
]
