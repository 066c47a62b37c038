"""What trains in a unit: the parameter sets every trainer freezes or unfreezes the same way.

- :func:`trainable_parameters`: the parameters of a module that may train, made trainable. A
  SwiGLU FFN built with ``freeze_up_proj`` keeps its up projection fixed (a random feature map,
  ``model.freeze_up_proj``), whatever the unit.
- :func:`embedding_parameters`: token (and learned position) embeddings; a table built with
  ``model.tokenizer_embedding.freeze_embeddings`` (learned or pretrained) never trains.
- :func:`head_parameters`: the final norm and an untied LM head (a tied head is the embedding
  table, which trains, if at all, as an embedding).
"""

from __future__ import annotations

from torch import nn


def _fixed_parameter_ids(module: nn.Module) -> set[int]:
    fixed: set[int] = set()
    for m in module.modules():
        if getattr(m, "freeze_up_proj", False) and isinstance(
            getattr(m, "up_proj", None), nn.Module
        ):
            fixed.update(id(p) for p in m.up_proj.parameters())
    return fixed


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Make every parameter of ``module`` trainable except the fixed ones; returns them."""
    fixed = _fixed_parameter_ids(module)
    out = []
    for p in module.parameters():
        trains = id(p) not in fixed
        p.requires_grad_(trains)
        if trains:
            out.append(p)
    return out


def embedding_parameters(rack, trains: bool) -> list[nn.Parameter]:
    """Set the embeddings' ``requires_grad`` to ``trains`` (a frozen pretrained table stays
    frozen); returns the ones that train."""
    table = rack.lexical.get_embeddings().table.weight
    fixed_table = getattr(rack.lexical, "freeze_embeddings", False)
    params = list(rack.lexical.get_embeddings().parameters())
    if rack.position is not None:
        params.append(rack.position.weight)
    out = []
    for p in params:
        on = trains and not (fixed_table and p is table)
        p.requires_grad_(on)
        if on:
            out.append(p)
    return out


def head_parameters(rack, trains: bool) -> list[nn.Parameter]:
    """Set the final norm's and an untied head's ``requires_grad`` to ``trains``; returns
    them (empty when they do not train)."""
    table = rack.lexical.get_embeddings().table.weight
    params = list(rack.final_norm.parameters())
    params += [p for p in rack.lexical.get_lm_head().parameters() if p is not table]
    for p in params:
        p.requires_grad_(trains)
    return params if trains else []


__all__ = ["embedding_parameters", "head_parameters", "trainable_parameters"]
