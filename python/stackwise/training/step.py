"""One training step's data path, once for every trainer: a batch becomes a loss.

    step = BatchStep(config, device, tokenizer_ids)
    micro = step.micro_batch((batch_idx, batch), ratio)          # parse -> corrupt
    loss = step.loss(rack, modules, micro)                       # embed -> modules -> head

A model is seen as ``embed(ids, t) -> modules[0] -> ... -> modules[n-1] -> token_loss(h, y)``
(the head and the cross entropy in one native op, :func:`stackwise.ops.linear_cross_entropy`,
which never forms the logits in full): the modules are a rack's stacks (progressive training)
or its blocks (hierarchical and fusion training), each called as
``module(h [B, S, D], key_padding_mask [B, S] | None)``.

*Boundary b* is the activation entering ``modules[b]`` (b = 0: the embeddings), the convention of
``Rack.forward(..., return_hidden=True)``. When everything before boundary b is frozen, the
trainer stores boundary b of each batch once (:meth:`BatchStep.fill_cache`, in eval mode and
without gradients, so no dropout mask and no random draw is baked in) under cache key b, with the
batch's labels and attention mask as companions; a micro-batch read back from the cache starts
its forward pass at module b. Otherwise the micro-batch carries the corrupted ids and the forward
pass starts at the embeddings.

Objectives (``training.progressive.training_objective``): ``clm`` (next-token labels), ``mlm``
(80/10/10 corruption at the ratio) and ``diffusion`` (absorbing mask at the ratio); with
``time_interpretation: input`` each sample draws its own noise level t (which replaces the
ratio) and the rack's time embedding is told t. Masks and t are pure functions of (sample id,
ratio, seed): see :mod:`stackwise.training.strategies.masking`.

Compute precision (``training.dtype``; ``training.autocast: true`` is shorthand for bf16): the
forward pass runs under ``torch.autocast`` in bf16 or fp16, master weights stay fp32.

Shapes: ids and labels [B, S] (labels -100 where there is no loss), masks [B, S] bool, noise
levels t [B] float32, boundary activations [B, S, d_model].
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from stackwise import precision
from stackwise.exceptions import ConfigurationError, TrainingError
from stackwise.training.batches import parse_batch
from stackwise.training.strategies.caching import CacheManager
from stackwise.training.strategies.masking import (
    IGNORE_INDEX,
    corrupt_batch,
    sample_noise_levels,
)

_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(training, device_type: str = "cpu") -> torch.dtype | None:
    """The autocast dtype of ``training`` on ``device_type`` (None: plain fp32):
    ``training.dtype``, with ``training.autocast: true`` meaning bf16. ``auto`` (the default) is
    bf16 on CUDA, the norm of LLM training and what the CUDA attention kernel takes (bf16/fp16
    only), and fp32 on the CPU."""
    name = training.dtype
    if name == "auto":
        name = "bf16" if device_type == "cuda" else "fp32"
    if name not in _AUTOCAST_DTYPES:
        raise ConfigurationError(
            f"{name!r} is not one of {list(_AUTOCAST_DTYPES)}", "training.dtype"
        )
    if training.autocast:
        if name == "fp16":
            raise ConfigurationError(
                "training.autocast is shorthand for training.dtype: bf16; it contradicts 'fp16'",
                "training.autocast",
            )
        return torch.bfloat16
    return None if name == "fp32" else precision.dtype_of(name)


def resolve_device(name: str) -> torch.device:
    """``training.device``: "auto" picks CUDA when available."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@dataclass
class MicroBatch:
    """One micro-batch ready for the forward pass: either ``ids`` (and noise levels ``time``)
    entering at the embeddings, or a cached ``hidden`` boundary entering at module ``start``."""

    labels: Tensor
    mask: Tensor | None
    start: int = 0
    ids: Tensor | None = None
    time: Tensor | None = None
    hidden: Tensor | None = None
    n_tok: int = field(init=False)  # positions that carry a target (counted once: a sync)

    def __post_init__(self) -> None:
        self.n_tok = int((self.labels != IGNORE_INDEX).sum())


def run_modules(
    modules: Sequence[nn.Module], h: Tensor, start: int, end: int, mask: Tensor | None
) -> Tensor:
    """``modules[start:end]`` applied in order to ``h``."""
    for m in modules[start:end]:
        h = m(h, mask)
    return h


class BatchStep:
    """Parsing, corruption, the cache boundary and the forward loss (module docstring).

    Args:
        config: a :class:`~stackwise.config.base.StackWiseConfig`.
        device: where the forward pass runs.
        tokenizer_ids: ``{"mask": id, "pad": id, ...}``; the mask id defaults to vocab_size - 1,
            every id given is a special token that is never masked.
    """

    def __init__(self, config, device: torch.device, tokenizer_ids: dict[str, int] | None = None):
        self.config = config
        self.device = device
        t = config.training
        self.objective = t.progressive.training_objective
        self.input_time = t.progressive.time_interpretation == "input"
        if self.input_time and self.objective == "clm":
            raise ConfigurationError(
                "'input' masks each sample at its own noise level: use the 'diffusion' or "
                "'mlm' objective",
                "training.progressive.time_interpretation",
            )
        self.masking = t.masking
        self.seed = t.seed
        self.dtype = compute_dtype(t, device.type)
        self.set_tokenizer_ids(tokenizer_ids)

    def set_tokenizer_ids(self, tokenizer_ids: dict[str, int] | None) -> None:
        ids = tokenizer_ids or {}
        self.mask_token_id = ids.get("mask", self.config.model.vocab_size - 1)
        self.special_ids = tuple(v for v in ids.values() if v is not None)

    # -- batches --------------------------------------------------------------------------------

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def parse(self, batch: Any, batch_idx: int) -> dict[str, Tensor | None]:
        """The checked parts of one batch (:func:`~stackwise.training.batches.parse_batch`)."""
        m = self.config.model
        return parse_batch(batch, batch_idx, m.vocab_size, m.max_seq_len)

    def corrupt(
        self, parsed: dict[str, Tensor | None], ratio: float | tuple[float, float]
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(inputs, labels, t)`` for the objective at mask ratio ``ratio``; ``t`` is the
        per-sample noise level [B] with ``time_interpretation: input`` (it replaces
        ``ratio``), else None. A ``(lo, hi)`` ratio draws each sample's ratio in that range
        (``training.progressive.noise_ranges``; it is also ``t`` with an ``input`` time)."""
        t = None
        if isinstance(ratio, tuple):  # a range: one ratio per sample drawn in it
            ratio = sample_noise_levels(parsed["sample_id"], self.seed, *ratio)
            t = ratio if self.input_time else None
        elif self.input_time:
            t = sample_noise_levels(
                parsed["sample_id"], self.seed, self.masking.min_fraction, self.masking.max_fraction
            )
            ratio = t
        inputs, labels = corrupt_batch(
            parsed,
            ratio,
            self.objective,
            seed=self.seed,
            mask_token_id=self.mask_token_id,
            special_ids=self.special_ids,
            vocab_size=self.config.model.vocab_size,
            masking=self.masking,
        )
        return inputs, labels, t

    def micro_batch(self, item: tuple[int, Any], ratio: float | tuple[float, float]) -> MicroBatch:
        """``(batch_idx, batch)`` from a loader, parsed and corrupted, on the device."""
        batch_idx, batch = item
        parsed = self.parse(batch, batch_idx)
        inputs, labels, t = self.corrupt(parsed, ratio)
        mask = parsed["attention_mask"]
        dev = self.device
        return MicroBatch(
            labels=labels.to(dev),
            mask=None if mask is None else mask.to(dev),
            ids=inputs.to(dev),
            time=None if t is None else t.to(dev),
        )

    def cached_micro_batch(self, cache: CacheManager, boundary: int, batch_id: int) -> MicroBatch:
        """A micro-batch read back from ``cache`` (boundary ``boundary``, batch ``batch_id``)."""
        h, comp = cache.get_batch(boundary, batch_id, release=True)
        dev = self.device
        attn = comp[1].bool().to(dev)
        return MicroBatch(
            labels=comp[0].to(dev),
            mask=None if bool(attn.all()) else attn,
            start=boundary,
            hidden=h.to(dev),
        )

    # -- the frozen prefix ----------------------------------------------------------------------

    @torch.no_grad()
    def fill_cache(
        self,
        cache: CacheManager,
        model: nn.Module,
        modules: Sequence[nn.Module],
        boundary: int,
        dataloader,
        ratio: float | tuple[float, float],
        limit: int,
    ) -> list[int]:
        """Store boundary ``boundary`` of the first ``limit`` batches of ``dataloader`` (the
        frozen ``modules[:boundary]`` run once per batch, in eval mode); returns the batch ids.
        What the cache held before is dropped."""
        cache.clear()
        ids: list[int] = []
        was_training = model.training
        model.eval()
        try:
            with self.autocast():
                for batch_idx, batch in enumerate(dataloader):
                    if batch_idx >= limit:
                        break
                    m = self.micro_batch((batch_idx, batch), ratio)
                    h = run_modules(modules, model.embed(m.ids, m.time), 0, boundary, m.mask)
                    attn = (
                        m.mask
                        if m.mask is not None
                        else torch.ones_like(m.labels, dtype=torch.bool)
                    )
                    companions = torch.stack([m.labels.cpu(), attn.long().cpu()])
                    ids.append(cache.store_activations(boundary, h.detach().cpu(), companions))
        finally:
            model.train(was_training)
        if not ids:
            raise TrainingError("the dataloader yielded no batches")
        return ids

    # -- the loss -------------------------------------------------------------------------------

    def hidden(self, model: nn.Module, modules: Sequence[nn.Module], m: MicroBatch, end=None):
        """The activation leaving ``modules[end - 1]`` (default: the last module) for ``m``."""
        end = len(modules) if end is None else end
        h = m.hidden if m.hidden is not None else model.embed(m.ids, m.time)
        return run_modules(modules, h, m.start, end, m.mask)

    def loss(
        self, model: nn.Module, modules: Sequence[nn.Module], m: MicroBatch, end: int | None = None
    ) -> Tensor:
        """Mean token loss of ``m`` through ``modules[m.start:end]`` and the head, under the
        configured autocast. A micro-batch without any target is an error (callers skip them)."""
        if m.n_tok == 0:
            raise TrainingError(
                "no position has a target (every label is -100): there is no loss to train on"
            )
        with self.autocast():
            return model.token_loss(self.hidden(model, modules, m, end), m.labels)

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        modules: Sequence[nn.Module],
        loader,
        ratio: float | tuple[float, float],
        max_batches: int = 50,
        max_tokens: int | None = None,
    ) -> float:
        """Mean loss per target token of the whole model on the first ``max_batches`` batches of
        ``loader`` at mask ratio ``ratio``, stopping before a batch once ``max_tokens`` window
        positions have been scored (``training.eval_max_tokens``). Leaves the RNG states and the
        train/eval mode as it found them, so evaluating does not change the training that
        follows."""
        was_training = model.training
        model.eval()
        total, count, seen = 0.0, 0, 0
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                for batch_idx, batch in enumerate(loader):
                    if batch_idx >= max_batches or (max_tokens is not None and seen >= max_tokens):
                        break
                    m = self.micro_batch((batch_idx, batch), ratio)
                    seen += m.labels.numel()
                    n = m.n_tok
                    if n == 0:
                        continue
                    total += float(self.loss(model, modules, m)) * n
                    count += n
        finally:
            model.train(was_training)
        if count == 0:
            raise TrainingError(
                "the evaluation batches hold no target token (empty loader, or nothing masked)"
            )
        return total / count


__all__ = ["BatchStep", "MicroBatch", "compute_dtype", "resolve_device", "run_modules"]
