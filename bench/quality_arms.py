"""The arms of ``bench/quality.py``: one shared configuration (Shakespeare, d_model 128, GQA 4/2,
d_ff 512, seq 128, batch 16, AdamW 1e-3 with a cosine schedule) and each arm's overrides.

Every arm is a plain ``stackwise train`` configuration: ``arm_config(name, ...).to_yaml(path)``
writes one that ``stackwise train --config path`` runs as it is. An end-to-end arm is a rack of
one stack holding every block, so its one stage trains embeddings, blocks, final norm and head
together (``training.progressive.enabled: false`` with ``training.mode: rackwise`` trains the same
model through the hierarchical trainer; ``--write-configs`` writes both forms).

The diffusion arms (``*diffusion*``, ``prog_diff_*``) train masked diffusion (prepend building,
bidirectional attention, mask ratios in [0.02, 1]) and are scored by the masked-diffusion ELBO
bound in bits per byte (``stackwise.run.likelihood``), not by a next-token loss.
"""

from __future__ import annotations

import copy
from typing import Any

# Progressive arms grow 4 stacks of 2 blocks; end-to-end arms train FULL_DEPTH or the shallow
# depth (the memory of one progressive stage) in one stack.
N_STACKS, BLOCKS_PER_STACK = 4, 2
FULL_DEPTH = N_STACKS * BLOCKS_PER_STACK

UNTIED = {"model": {"tie_embeddings": False}}
QLORA_TRUNK = {
    "training": {
        "progressive": {"trunk_strategy": "qlora", "trunk_checkpointing": True},
        "qlora": {"rank": 8, "alpha": 16.0, "dropout": 0.0, "lr": 1e-3},
    }
}

# consolidation_steps is set to a fifth of the run's steps by arm_config.
CONSOLIDATE = {
    "training": {
        "progressive": {"consolidation_steps": 0.2, "trunk_checkpointing": True},
        "qlora": {"rank": 8, "alpha": 16.0, "dropout": 0.0, "lr": 1e-3},
    }
}


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def _prog(*parts: dict) -> dict:
    out: dict = {}
    for part in parts:
        out = _merge(out, part)
    return out


def _init(mode: str) -> dict:
    return {"training": {"progressive": {"new_stack_init": mode}}}


def _budget(name: str) -> dict:
    return {"training": {"progressive": {"stage_budget": name}}}


def _prog_opt(**kw) -> dict:
    return {"training": {"progressive": kw}}


# Masked diffusion: ratios over (0, 1] as the ELBO integrates them; bidirectional attention.
DIFFUSION = {
    "model": {"attention_mode": "bidirectional", "tie_embeddings": False},
    "training": {
        "time_step_masking": True,
        "masking": {"min_fraction": 0.02, "max_fraction": 1.0, "schedule": "linear"},
        "progressive": {"training_objective": "diffusion", "building_mode": "prepend"},
    },
}
COPY_FRONT = _prog(UNTIED, _init("copy"), _budget("front_loaded"))

# name -> (what it is, overrides); "e2e_*" arms are handled by arm_config (one stack).
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "e2e_full": ("end-to-end, 8 blocks", {}),
    "e2e_shallow": ("end-to-end, the memory of one stage", {}),
    "prog_tied": ("progressive 4x2, frozen trunk, tied head", {}),
    "prog_untied": ("+ untied head and final norm training every stage", UNTIED),
    "prog_untied_identity": ("+ identity-initialised new stacks", _prog(UNTIED, _init("identity"))),
    "prog_untied_copy": ("+ new stack copied from the previous one", _prog(UNTIED, _init("copy"))),
    "prog_copy_front": (
        "copy init, front-loaded stage budget",
        _prog(UNTIED, _init("copy"), _budget("front_loaded")),
    ),
    "prog_copy_back": (
        "copy init, back-loaded stage budget",
        _prog(UNTIED, _init("copy"), _budget("back_loaded")),
    ),
    "prog_copy_consolidate": (
        "copy init, then 20% of the steps on all stacks through LoRA on NF4",
        _prog(UNTIED, _init("copy"), CONSOLIDATE),
    ),
    "prog_copy_qlora": (
        "copy init, NF4 trunk with LoRA adapters",
        _prog(UNTIED, _init("copy"), QLORA_TRUNK),
    ),
    "prog_copy_front_lr2": (
        "copy init, front-loaded, stages after the first at twice the learning rate",
        _prog(COPY_FRONT, _prog_opt(stage_lr_scale=2.0)),
    ),
    "prog_copy_front_lr3": (
        "copy init, front-loaded, stages after the first at three times the learning rate",
        _prog(COPY_FRONT, _prog_opt(stage_lr_scale=3.0)),
    ),
    "prog_copy_front_warmup": (
        "copy init, front-loaded, each stage warms up over 5% of the run's steps",
        _prog(COPY_FRONT, {"training": {"optimizer": {"warmup_steps": 0.05}}}),
    ),
    "e2e_diffusion": ("end-to-end masked diffusion, 8 blocks, ratio ~ U(0.02, 1)", DIFFUSION),
    "prog_diff_points": (
        "prepend diffusion 4x2, one ratio per stage (linear MaskScheduler)",
        _prog(DIFFUSION, _init("copy")),
    ),
    "prog_diff_linear": (
        "prepend diffusion 4x2, equal-width ratio ranges per stage",
        _prog(DIFFUSION, _init("copy"), _prog_opt(noise_ranges="linear")),
    ),
    "prog_diff_equal_mass": (
        "prepend diffusion 4x2, ranges of equal ELBO-weight (1/t) mass per stage",
        _prog(DIFFUSION, _init("copy"), _prog_opt(noise_ranges="equal_mass")),
    ),
}


def base_dict(steps: int, tokenizer: str) -> dict[str, Any]:
    vocab = 259 if tokenizer == "bytes" else 50259
    return {
        "model": {
            "vocab_size": vocab,
            "d_model": 128,
            "n_heads": 4,
            "n_kv_heads": 2,
            "d_ff": 512,
            "n_layers": FULL_DEPTH,
            "attention_type": "gqa",
            "attention_mode": "causal",
            "use_rope": True,
            "max_seq_len": 128,
            "tie_embeddings": True,
            "architecture": {"n_stacks": N_STACKS, "blocks_per_stack": BLOCKS_PER_STACK},
        },
        "training": {
            "learning_rate": 1e-3,
            "batch_size": 16,
            "seq_len": 128,
            "max_steps": steps,
            "eval_every": max(1, steps // 16),
            "qlora_enabled": False,
            "time_step_masking": False,
            "optimizer": {"name": "adamw", "schedule": "cosine", "warmup_steps": 0},
            "progressive": {
                "building_mode": "append",
                "target_stacks": N_STACKS,
                "trunk_strategy": "frozen",
                "training_objective": "clm",
                "new_stack_init": "random",  # arms name what they change
                "stage_budget": "uniform",
            },
            "caching": {"max_memory_mb": 8192, "max_cache_size": 100000},
            "checkpointing": {"enabled": False},
        },
        "data": {"corpus": "shakespeare", "tokenizer": tokenizer, "val_fraction": 0.1},
    }


def arm_config(name: str, steps: int, tokenizer: str = "bytes", shallow_depth: int = 2):
    """The validated :class:`StackWiseConfig` of arm ``name`` at ``steps`` total steps."""
    from stackwise.config.base import StackWiseConfig

    if name not in ARMS:
        raise KeyError(f"unknown arm {name!r}; arms: {list(ARMS)}")
    raw = base_dict(steps, tokenizer)
    raw = _merge(raw, ARMS[name][1])
    if name.startswith("e2e"):
        depth = shallow_depth if name == "e2e_shallow" else FULL_DEPTH
        raw = _merge(
            raw,
            {
                "model": {
                    "n_layers": depth,
                    "architecture": {"n_stacks": 1, "blocks_per_stack": depth},
                },
                "training": {"progressive": {"target_stacks": 1}},
            },
        )
        if name == "e2e_diffusion":  # one stage: a ratio per sample over the whole range
            raw["training"]["progressive"]["noise_ranges"] = "linear"
    prog = raw["training"]["progressive"]
    if isinstance(prog.get("consolidation_steps"), float):
        prog["consolidation_steps"] = max(1, int(steps * prog["consolidation_steps"]))
    opt = raw["training"]["optimizer"]
    if isinstance(opt.get("warmup_steps"), float):  # a share of the run's steps
        opt["warmup_steps"] = max(1, int(steps * opt["warmup_steps"]))
    return StackWiseConfig.from_dict(raw).validate()


__all__ = ["ARMS", "BLOCKS_PER_STACK", "FULL_DEPTH", "N_STACKS", "arm_config", "base_dict"]
