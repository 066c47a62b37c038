"""Optimizers and learning-rate schedules from :class:`OptimizerConfig`: AdamW / Adam / SGD over
named parameter groups, linear warmup then cosine, linear or constant decay to
``min_lr_ratio`` of the peak; an optimizer's state as safetensors-ready tensors plus JSON (for
checkpoints that hold no pickled objects)."""

from __future__ import annotations

import math

import torch
from torch import nn

from stackwise.exceptions import TrainingError


def build_optimizer(groups: list[dict], opt_cfg) -> torch.optim.Optimizer:
    """``groups``: dicts with ``name``, ``params`` and ``lr``; empty groups are dropped. Every
    group keeps its ``name`` in ``optimizer.param_groups``."""
    groups = [g for g in groups if any(p.requires_grad for p in g["params"])]
    for g in groups:
        g["params"] = [p for p in g["params"] if p.requires_grad]
    if not groups:
        raise TrainingError("nothing to train: every parameter group is empty or frozen")
    name = opt_cfg.name
    if name in ("adamw", "adam"):
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        return cls(
            groups, betas=tuple(opt_cfg.betas), eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay
        )
    if name == "sgd":
        return torch.optim.SGD(groups, momentum=opt_cfg.momentum, weight_decay=opt_cfg.weight_decay)
    raise TrainingError(f"unknown optimizer {name!r}")


def effective_warmup(warmup: int, steps: int) -> int:
    """Warmup steps of a stage (or unit) of ``steps`` optimizer steps: ``warmup`` when it ends
    inside the stage; otherwise the learning rate would never reach its peak, so the warmup is
    shortened to a tenth of the stage's steps (0 below 10 steps). A smoke run
    (``training.max_steps=4``) of a configuration with a long warmup therefore runs; the
    trainers report the change in their stage-start event (``warmup_steps``,
    ``warmup_steps_configured``) and ``stackwise train`` prints it."""
    if warmup < steps:
        return warmup
    return max(0, steps) // 10


def lr_lambda(opt_cfg, total_steps: int):
    """Multiplier of the peak learning rate at a step: warmup (:func:`effective_warmup`), then
    the configured decay."""
    warmup = effective_warmup(opt_cfg.warmup_steps, total_steps)
    floor = opt_cfg.min_lr_ratio

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if opt_cfg.schedule == "constant" or total_steps <= warmup:
            return 1.0
        t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if opt_cfg.schedule == "linear":
            return floor + (1 - floor) * (1 - t)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def clip_gradients(params, max_norm: float) -> float:
    """Clip the global gradient norm when ``max_norm > 0``; returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        return float(nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.norm(torch.stack([p.grad.detach().norm() for p in params])))


def optimizer_state_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """An optimizer's ``state_dict`` as ``(tensors, meta)``: every state tensor under
    ``"state.<param index>.<key>"`` (for safetensors) and the rest (param groups, non-tensor
    state) as JSON-ready data. :func:`optimizer_state_from_tensors` inverts it exactly."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    meta = {"param_groups": sd["param_groups"], "scalars": scalars}
    return tensors, meta


def optimizer_state_from_tensors(tensors: dict, meta: dict) -> dict:
    """The ``state_dict`` saved by :func:`optimizer_state_to_tensors`."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}
