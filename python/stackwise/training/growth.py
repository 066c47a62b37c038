"""How a progressive rack grows: the initial weights of each new stack and how the total steps
are split over the stages. The progressive trainer calls these two functions; they hold no state.

- ``training.progressive.new_stack_init`` (:func:`init_new_stack`): ``auto`` (the default:
  ``identity`` when the trunk is a pretrained model, ``training.init_from``, else ``copy``, the
  best of the three in ``bench/quality.py``),
  ``random`` (the blocks' own initialisation), ``identity`` (every block's attention output
  projection and FFN down projection zeroed, so each block adds nothing to its input's residual
  stream and the new stack starts as the identity: adding it does not change the rack's
  output, as in LLaMA Pro's block expansion), or ``copy`` (the trained weights of the stack the
  new one joins: the previous last stack in append mode, the previous first stack in prepend
  mode; a stack-level growth operator in the manner of G_stack). The first stack always starts
  random.
- ``training.progressive.stage_budget`` (:func:`stage_steps_share`): how ``training.max_steps``
  is split over the planned stages when ``steps_per_stack`` is not set: ``front_loaded`` (the
  default, the best split in ``bench/quality.py``: stage k of n gets a share proportional to
  n - k, so the stage that trains the embeddings gets the most), ``uniform`` (equal shares) or
  ``back_loaded`` (proportional to k + 1).
- ``training.progressive.noise_ranges`` (:func:`stage_noise_range`, mlm/diffusion objectives):
  ``none`` (each stage masks at one ratio of the ``training.masking`` schedule), or each stage
  gets its own range of mask ratios, one ratio drawn per sample (as DiffusionBlocks gives each
  block its own noise range): ``linear`` splits [min_fraction, max_fraction] into equal-width
  ranges, ``equal_mass`` into ranges of equal mass of 1/t, the weight of noise level t in the
  masked-diffusion ELBO (geometric edges: more, narrower ranges at low noise, where the weight
  is large). Stage k gets the k-th range from the low end, as the point schedule gives stage k
  its k-th ratio (prepend: the newest, leftmost stack denoises the most).
- ``training.progressive.stage_lr_scale``: the learning rate of the new stack and the head in
  every stage after the first is ``learning_rate`` times this factor (a single stack over a
  frozen, cached trunk is a shallow network that takes a larger step).
"""

from __future__ import annotations

import torch
from torch import nn

from stackwise.config._schema import config_choices
from stackwise.config.base import ProgressiveConfig
from stackwise.exceptions import ConfigurationError, TrainingError

NEW_STACK_INITS = config_choices(ProgressiveConfig, "new_stack_init")
STAGE_BUDGETS = config_choices(ProgressiveConfig, "stage_budget")


def _zero_output_projections(stack: nn.Module) -> int:
    """Zero the residual-branch outputs (attention ``o_proj``, FFN ``down_proj``) of every block;
    returns how many projections were zeroed."""
    n = 0
    for block in stack.blocks:
        for owner, name in ((getattr(block, "attn", None), "o_proj"), (block.ffn, "down_proj")):
            proj = getattr(owner, name, None) if owner is not None else None
            # A dual-LoRA wrapper keeps the layer it adapts in ``base_layer``.
            weight = getattr(getattr(proj, "base_layer", proj), "weight", None)
            if not isinstance(weight, torch.Tensor):
                raise TrainingError(
                    f"new_stack_init 'identity' needs a linear {name} in every block; "
                    f"{type(block).__name__} has {type(proj).__name__}"
                )
            with torch.no_grad():
                weight.zero_()
            n += 1
    return n


def init_new_stack(builder, new_idx: int, mode: str) -> None:
    """Initialise stack ``new_idx`` of ``builder.rack`` (just added) following ``mode``."""
    if mode not in NEW_STACK_INITS:
        raise ConfigurationError(
            f"{mode!r} is not one of {list(NEW_STACK_INITS)}",
            "training.progressive.new_stack_init",
        )
    if mode == "auto":  # identity on a pretrained trunk (training.init_from), else copy
        mode = "identity" if getattr(builder.config.training, "init_from", None) else "copy"
    stacks = builder.rack.stacks
    if mode == "random" or len(stacks) == 1:
        return
    new = stacks[new_idx]
    if mode == "identity":
        _zero_output_projections(new)
        return
    src_idx = new_idx - 1 if builder.building_mode == "append" else new_idx + 1
    if builder.converted[src_idx]:
        raise TrainingError(
            f"new_stack_init 'copy': stack {src_idx} was already converted for the trunk "
            f"({builder.strategies[src_idx] or builder.precisions[src_idx]}); a copy is taken "
            "from a stack before it is frozen"
        )
    src = stacks[src_idx].state_dict()
    try:
        new.load_state_dict(src, strict=True)
    except RuntimeError as exc:
        raise TrainingError(
            f"new_stack_init 'copy': stack {src_idx} and the new stack {new_idx} differ in "
            f"shape (blocks or layers): {exc}"
        ) from exc


def stage_noise_range(lo: float, hi: float, mode: str, stage: int, plan: int) -> tuple:
    """The mask-ratio range ``(a, b)`` of ``stage`` of ``plan`` under ``noise_ranges`` ``mode``
    (``linear`` or ``equal_mass``, module docstring) within [lo, hi]."""
    if not 0 <= stage < plan:
        raise TrainingError(f"stage {stage} is outside the plan of {plan} stages")
    if mode == "linear":
        edges = [lo + (hi - lo) * k / plan for k in range(plan + 1)]
    elif mode == "equal_mass":
        if lo <= 0.0:
            raise ConfigurationError(
                "'equal_mass' needs training.masking.min_fraction > 0 (1/t has infinite mass at 0)",
                "training.progressive.noise_ranges",
            )
        edges = [lo * (hi / lo) ** (k / plan) for k in range(plan + 1)]
    else:
        raise ConfigurationError(
            f"{mode!r} names no range split: use 'linear' or 'equal_mass'",
            "training.progressive.noise_ranges",
        )
    return (float(edges[stage]), float(edges[stage + 1]))


def stage_weights(plan: int, budget: str) -> list[int]:
    """Relative step shares of the ``plan`` stages under ``budget``."""
    if budget == "uniform":
        return [1] * plan
    if budget == "front_loaded":
        return [plan - k for k in range(plan)]
    if budget == "back_loaded":
        return [k + 1 for k in range(plan)]
    raise ConfigurationError(
        f"{budget!r} is not one of {list(STAGE_BUDGETS)}", "training.progressive.stage_budget"
    )


def stage_steps_share(total: int, plan: int, stage: int, budget: str) -> int:
    """Steps of ``stage`` when ``total`` steps are split over ``plan`` stages under ``budget``
    (cumulative, rounded down, so the shares of all stages add up to ``total``; at least 1)."""
    if not 0 <= stage < plan:
        raise TrainingError(f"stage {stage} is outside the plan of {plan} stages")
    w = stage_weights(plan, budget)
    whole = sum(w)
    before = sum(w[:stage])
    return max(1, total * (before + w[stage]) // whole - total * before // whole)


__all__ = [
    "NEW_STACK_INITS",
    "STAGE_BUDGETS",
    "init_new_stack",
    "stage_noise_range",
    "stage_steps_share",
    "stage_weights",
]
