"""The per-batch half of :class:`~stackwise.training.progressive.ProgressiveTrainer`: corrupting a
batch for the objective (clm labels; mlm / diffusion masks at the stage's ratio or, with
``time_interpretation: input``, at per-sample noise levels t), filling the activation cache,
preparing micro-batches, the forward loss under optional bf16 autocast, and evaluation.

Shapes: ids and labels [B, S] (labels -100 where there is no loss), attention masks [B, S]
bool, noise levels t [B] float32, boundary activations [B, S, d_model].
"""

from __future__ import annotations

import torch
from torch import Tensor

from stackwise.exceptions import TrainingError
from stackwise.training.batches import parse_batch
from stackwise.training.strategies.masking import (
    MaskScheduler,
    corrupt_batch,
    sample_noise_levels,
    token_loss,
)


class StageStepsMixin:
    """Needs ``config``, ``training``, ``progressive``, ``device``, ``seed``, ``mask_token_id``,
    ``special_ids``, ``cache`` and ``input_time`` from the trainer."""

    def _autocast(self):
        return torch.autocast(
            device_type=self.device.type, dtype=torch.bfloat16, enabled=self.training.autocast
        )

    # -- batches --------------------------------------------------------------------------------

    def _parse(self, batch, batch_idx: int) -> dict[str, Tensor]:
        m = self.config.model
        return parse_batch(batch, batch_idx, m.vocab_size, m.max_seq_len)

    def _corrupt(self, parsed: dict[str, Tensor], ratio: float):
        """``(inputs, labels, time)``; ``time`` is the per-sample noise level [B] with
        ``time_interpretation: input`` (which replaces ``ratio``), else None."""
        objective = self.progressive.training_objective
        masking = self.training.masking
        t = None
        if objective != "clm" and self.input_time:
            t = sample_noise_levels(
                parsed["sample_id"], self.seed, masking.min_fraction, masking.max_fraction
            )
            ratio = t
        inputs, labels = corrupt_batch(
            parsed,
            ratio,
            objective,
            seed=self.seed,
            mask_token_id=self.mask_token_id,
            special_ids=self.special_ids,
            vocab_size=self.config.model.vocab_size,
            masking=masking,
        )
        return inputs, labels, t

    def stage_ratio(self, stage: int, target: int) -> float:
        """Mask ratio of the stack trained at ``stage`` in a rack of ``target`` stacks (with
        ``time_interpretation: input``, the mean of the per-sample noise levels)."""
        m = self.training.masking
        if self.input_time:
            return 0.5 * (m.min_fraction + m.max_fraction)
        prepend = self.progressive.building_mode == "prepend"
        sched = MaskScheduler(m.min_fraction, m.max_fraction, m.schedule, reverse=prepend)
        position = target - 1 - stage if prepend else stage
        return sched.get_mask_fraction(position, target)

    # -- training -------------------------------------------------------------------------------

    def _fill_cache(self, rack, dataloader, ratio, cache_block, limit: int) -> list:
        """Run the frozen part once per batch (the first ``limit`` batches) and store its output;
        returns the batch ids. The frozen part runs in eval mode: it draws no random numbers,
        so a resumed run refills the cache with the same values."""
        self.cache.clear()
        ids = []
        was_training = rack.training
        rack.eval()
        with torch.no_grad(), self._autocast():
            for batch_idx, batch in enumerate(dataloader):
                if batch_idx >= limit:
                    break
                parsed = self._parse(batch, batch_idx)
                inputs, labels, t = self._corrupt(parsed, ratio)
                h = rack.embed(inputs.to(self.device), self._time(t))
                mask = parsed["attention_mask"]
                if cache_block > 0:
                    h = rack.forward_from(
                        h, 0, cache_block, None if mask is None else mask.to(self.device)
                    )
                attn = mask if mask is not None else torch.ones_like(labels, dtype=torch.bool)
                companions = torch.stack([labels.cpu(), attn.long().cpu()])
                ids.append(self.cache.store_activations(cache_block, h.detach().cpu(), companions))
        rack.train(was_training)
        if not ids:
            raise TrainingError("the dataloader yielded no batches")
        return ids

    def _time(self, t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(self.device)

    def _prepare(self, rack, item, ratio, use_cache, cache_block) -> dict:
        """One micro-batch, ready for the forward pass: its input (cached activations or ids),
        labels, mask, noise levels, and its number of target tokens."""
        dev = self.device
        if use_cache:
            h, comp = self.cache.get_batch(cache_block, item, release=True)
            h = h.to(dev)
            labels, attn = comp[0].to(dev), comp[1].bool().to(dev)
            m = {"hidden": h, "start": cache_block, "labels": labels}
            m["mask"] = None if bool(attn.all()) else attn
            m["time"] = None
        else:
            batch_idx, batch = item
            parsed = self._parse(batch, batch_idx)
            inputs, labels, t = self._corrupt(parsed, ratio)
            mask = parsed["attention_mask"]
            m = {"ids": inputs.to(dev), "start": 0, "labels": labels.to(dev)}
            m["mask"] = None if mask is None else mask.to(dev)
            m["time"] = self._time(t)
        m["n_tok"] = int((m["labels"] != -100).sum())
        return m

    def _forward_loss(self, rack, m: dict) -> Tensor:
        h = m["hidden"] if "hidden" in m else rack.embed(m["ids"], m["time"])
        h = rack.forward_from(h, m["start"], len(rack.stacks), m["mask"])
        return token_loss(rack.logits(h), m["labels"])

    @torch.no_grad()
    def evaluate(self, rack, loader, ratio: float, max_batches: int = 50) -> float:
        """Mean loss of the full rack on ``loader`` at mask ratio ``ratio`` (per-sample noise
        levels with ``time_interpretation: input``). Leaves the RNG states as it found them, so
        evaluating does not change the training that follows."""
        was_training = rack.training
        rack.eval()
        total, count = 0.0, 0
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self._autocast():
            for batch_idx, batch in enumerate(loader):
                if batch_idx >= max_batches:
                    break
                parsed = self._parse(batch, batch_idx)
                inputs, labels, t = self._corrupt(parsed, ratio)
                mask = parsed["attention_mask"]
                logits = rack(
                    inputs.to(self.device),
                    None if mask is None else mask.to(self.device),
                    time=self._time(t),
                )
                total += float(token_loss(logits, labels.to(self.device)))
                count += 1
        rack.train(was_training)
        if count == 0:
            raise TrainingError("the evaluation dataloader yielded no batches")
        return total / count
