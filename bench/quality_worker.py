"""One arm of ``bench/quality.py``, trained in the calling process: the arm's configuration run
by :class:`ProgressiveTrainer` on a shared batch order, with its memory accounted.

Batch order: :class:`GlobalOrder` replays the training loader's shuffled batches as one stream;
each pass a stage opens starts after the batches of the stages already trained, so stage k of a
progressive run reads what an end-to-end run reads at the same global steps.

Accelerator-side memory per stage: parameters and buffers of the rack (a frozen trunk in its
storage precision), gradients of the trainable parameters, the optimizer's state tensors, and the
largest set of tensors autograd saved for one backward pass (distinct storages that are not
parameters, seen by ``saved_tensors_hooks``). Host side: what the activation cache holds in
memory and on disk after the stage's fill.

Score: held-out next-token bits per byte; for diffusion arms, the masked-diffusion ELBO bound in
bits per byte over the same windows (``stackwise.run.likelihood``), after every stage.
"""

from __future__ import annotations

import math
import resource
import statistics
from typing import Any

import torch

from quality_arms import arm_config


class GlobalOrder:
    """The training batches as one stream; a new pass starts at ``start()``."""

    def __init__(self, loader, start) -> None:
        self.loader = loader
        self.start = start
        self.batches: list = []
        self._it = None

    def __len__(self) -> int:
        return 10**9  # a stage never wraps around: every pass continues the stream

    def _get(self, i: int):
        while len(self.batches) <= i:
            if self._it is None:
                self._it = iter(self.loader)
            try:
                self.batches.append(next(self._it))
            except StopIteration:
                self._it = None
        return self.batches[i]

    def __iter__(self):
        i = self.start()
        while True:
            yield self._get(i)
            i += 1


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Meter:
    """Callbacks and a saved-tensor counter for one run."""

    def __init__(self, trainer, to_bpb, elbo_bpb=None) -> None:
        self.trainer = trainer
        self.to_bpb = to_bpb
        self.elbo_bpb = elbo_bpb  # diffusion arms: rack -> ELBO bound in bits per byte
        self.train_s = 0.0
        self.curve: list[dict] = []
        self.stages: list[dict] = []
        self.saved_peak = 0
        self.optimizer = None
        self._param_ptrs: set[int] = set()
        self._cache_bytes = 0

    def on_stage_start(self, info: dict) -> None:
        rack = self.trainer._rack
        self._param_ptrs = {
            t.untyped_storage().data_ptr() for t in [*rack.parameters(), *rack.buffers()]
        }
        self.saved_peak = 0
        self.recompute_bytes = self._recompute_bytes(rack)
        self.train_s += info["cache_fill_s"]
        cache = self.trainer.cache
        self._cache_bytes = 0
        if info["stage"] > 0 and cache is not None:
            s = cache.memory_stats()
            self._cache_bytes = int(s["bytes_in_memory"] + s["bytes_on_disk"])

    def _recompute_bytes(self, rack) -> int:
        """What checkpointed stacks hold that the saved-tensor hooks do not see: each one's
        input (kept for the backward pass) plus, while one is recomputed, its saved tensors
        (measured by running the first such stack once with gradients)."""
        stacks = [s for s in rack.stacks if getattr(s, "recompute", False)]
        if not stacks:
            return 0
        cfg = self.trainer.config
        shape = (cfg.training.batch_size, cfg.training.seq_len, cfg.model.d_model)
        x = torch.randn(shape, requires_grad=True)
        seen: dict[int, int] = {}
        with torch.autograd.graph.saved_tensors_hooks(self.pack(seen), lambda t: t):
            stacks[0]._run(x, None)
        return len(stacks) * x.numel() * x.element_size() + sum(seen.values())

    def on_step(self, info: dict) -> None:
        self.train_s += info["step_ms"] / 1e3

    def on_eval(self, info: dict) -> None:
        if self.elbo_bpb is not None:
            return  # the masked loss at the stage's ratio is no likelihood; see on_stage_end
        self.curve.append(
            {
                "global_step": info["global_step"],
                "train_s": self.train_s,
                "eval_bpb": self.to_bpb(info["eval_loss"]),
            }
        )

    def on_stage_end(self, record: dict) -> None:
        rack = self.trainer._rack
        params = _nbytes([*rack.parameters(), *rack.buffers()])
        trainable = [p for p in rack.parameters() if p.requires_grad]
        state = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        row = {
            "stage": record["stage"],
            "steps": record["steps"],
            "tokens": record["tokens"],
            "wall_s": record["wall_s"],
            "cache_fill_s": record["cache_fill_s"],
            "step_ms": statistics.median(record["step_ms"]),
            "param_bytes": params,
            "grad_bytes": _nbytes(trainable),
            "optimizer_bytes": _nbytes(state),
            "saved_activation_bytes": self.saved_peak + self.recompute_bytes,
            "recompute_bytes": self.recompute_bytes,
            "cache_bytes": self._cache_bytes,
        }
        row["accel_bytes"] = (
            params + row["grad_bytes"] + row["optimizer_bytes"] + row["saved_activation_bytes"]
        )
        if self.elbo_bpb is not None:
            row["elbo_bpb"] = self.elbo_bpb(rack)
            self.curve.append(
                {
                    "global_step": self.trainer.global_step + record["steps"],
                    "train_s": self.train_s,
                    "eval_bpb": row["elbo_bpb"],
                }
            )
        self.stages.append(row)

    def pack(self, seen: dict):
        def hook(t):
            st = t.untyped_storage()
            key = st.data_ptr()
            if key not in self._param_ptrs and key not in seen:
                seen[key] = st.nbytes()
            return t

        return hook


def run_arm(name: str, steps: int, args, shallow: int, eval_every: int) -> dict[str, Any]:
    import stackwise.training.loop as loop
    from stackwise.data import create_data_loaders
    from stackwise.data.tokenizers import get_tokenizer
    from stackwise.run.evaluate import text_bytes
    from stackwise.run.train import _tokenizer_ids
    from stackwise.training import ProgressiveRackBuilder, ProgressiveTrainer

    cfg = arm_config(name, steps, args.tokenizer, shallow)
    cfg.training.eval_every = eval_every
    tok = get_tokenizer(cfg.data.tokenizer)
    train, val = create_data_loaders(cfg, tokenizer=tok)
    held_out = [b for _, b in zip(range(args.eval_batches), val, strict=False)]
    labels = torch.cat([b["labels"].reshape(-1) for b in held_out])
    tokens_per_byte = len(labels) / text_bytes(tok, labels.numpy())

    def to_bpb(loss: float) -> float:
        return loss * tokens_per_byte / math.log(2)

    elbo_bpb = None
    if cfg.training.progressive.training_objective == "diffusion":
        from stackwise.run.evaluate import special_ids
        from stackwise.run.likelihood import bits_per_byte, diffusion_nll_bound_nats

        windows = [(b["input_ids"], torch.as_tensor(b["sample_id"])) for b in held_out]
        ids = torch.cat([w for w, _ in windows]).reshape(-1).numpy()
        n_bytes = text_bytes(tok, ids)  # a masked rack predicts the windows' own tokens

        def elbo_bpb(rack) -> float:
            was = rack.training
            rack.eval()
            nats = diffusion_nll_bound_nats(
                rack,
                windows,
                seed=cfg.training.seed,
                mask_token_id=tok.mask_token_id,
                special_ids=special_ids(tok),
                device=torch.device("cpu"),
            )
            rack.train(was)
            return bits_per_byte(nats, n_bytes)

    meter: Meter | None = None

    build = loop.build_optimizer

    def capture(*a, **k):
        meter.optimizer = build(*a, **k)
        return meter.optimizer

    loop.build_optimizer = capture  # the one training loop builds every optimizer
    torch.manual_seed(cfg.training.seed)
    builder = ProgressiveRackBuilder(cfg, cfg.training.progressive.building_mode)
    trainer = ProgressiveTrainer(cfg, tokenizer_ids=_tokenizer_ids(tok))
    trainer._rack = builder.rack
    step_loss = trainer.step.loss

    def metered_loss(model, modules, m, end=None):
        """The step's loss with the tensors saved for backward counted (activation memory)."""
        trainer._rack = model
        seen: dict[int, int] = {}
        with torch.autograd.graph.saved_tensors_hooks(meter.pack(seen), lambda t: t):
            loss = step_loss(model, modules, m, end)
        meter.saved_peak = max(meter.saved_peak, sum(seen.values()))
        return loss

    trainer.step.loss = metered_loss
    meter = Meter(trainer, to_bpb, elbo_bpb)
    trainer.callbacks = [meter]
    accum = cfg.training.optimizer.grad_accumulation
    order = GlobalOrder(train, lambda: trainer.global_step * accum)
    res = trainer.train_rack(builder, order, eval_loader=held_out)
    for row, h in zip(meter.stages, res["history"], strict=True):
        row["eval_loss"] = h["eval_loss"]
        row["eval_bpb"] = row.get("elbo_bpb", to_bpb(h["eval_loss"]))
    return {
        "arm": name,
        "steps": sum(h["steps"] for h in res["history"]),
        "tokens": sum(h["tokens"] for h in res["history"]),
        "eval_bpb": meter.stages[-1]["eval_bpb"],
        "train_s": meter.train_s,
        "accel_peak_bytes": max(s["accel_bytes"] for s in meter.stages),
        "cache_peak_bytes": max(s["cache_bytes"] for s in meter.stages),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "parameters": res["rack"].num_parameters(),
        "stages": meter.stages,
        "phases": [h.get("phase", "stage") for h in res["history"]],
        "curve": meter.curve,
    }
