"""How a progressive rack grows (training/growth.py): identity-initialised stacks leave the rack's
output unchanged, copied stacks start as the stack they join, stage budgets split the steps as
documented, and the trainer applies both options from the configuration."""

from __future__ import annotations

import pytest
import torch

from stackwise.config.base import StackWiseConfig
from stackwise.exceptions import ConfigurationError, TrainingError
from stackwise.training import ProgressiveRackBuilder, ProgressiveTrainer
from stackwise.training.growth import init_new_stack, stage_steps_share
from utils import tiny_model

VOCAB = 24


def _config(**progressive):
    return StackWiseConfig.from_dict(
        {
            "model": tiny_model(VOCAB, use_rope=True, tie_embeddings=False),
            "training": {
                "learning_rate": 3e-3,
                "batch_size": 4,
                "seq_len": 16,
                "max_steps": 0,
                "qlora_enabled": False,
                "time_step_masking": False,
                "checkpointing": {"enabled": False},
                "progressive": {"target_stacks": 2, "steps_per_stack": 3, **progressive},
            },
        }
    ).validate()


def _ids(seed=0):
    return torch.randint(0, VOCAB - 1, (4, 16), generator=torch.Generator().manual_seed(seed))


def _perturb(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("mode", ["append", "prepend"])
def test_identity_stack_leaves_the_output_unchanged(mode):
    torch.manual_seed(0)
    builder = ProgressiveRackBuilder(_config(), mode)
    builder.add_stack()
    rack = builder.rack.eval()
    _perturb(rack)  # trained-looking weights, not the initial ones
    before = rack(_ids())
    builder.add_stack()
    new_idx = 1 if mode == "append" else 0
    after_random = rack(_ids())
    assert not torch.allclose(before, after_random, atol=1e-4)
    init_new_stack(builder, new_idx, "identity")
    torch.testing.assert_close(rack(_ids()), before, rtol=1e-5, atol=1e-5)
    blocks = rack.stacks[new_idx].blocks
    assert all(float(b.ffn.down_proj.weight.detach().abs().sum()) == 0.0 for b in blocks)
    assert all(float(b.attn.o_proj.weight.detach().abs().sum()) == 0.0 for b in blocks)


@pytest.mark.parametrize("mode", ["append", "prepend"])
def test_copy_starts_as_the_stack_it_joins(mode):
    torch.manual_seed(0)
    builder = ProgressiveRackBuilder(_config(), mode)
    builder.add_stack()
    _perturb(builder.rack.stacks[0])
    builder.add_stack()
    new_idx, src_idx = (1, 0) if mode == "append" else (0, 1)
    init_new_stack(builder, new_idx, "copy")
    src = builder.rack.stacks[src_idx].state_dict()
    new = builder.rack.stacks[new_idx].state_dict()
    assert src.keys() == new.keys()
    for k in src:
        torch.testing.assert_close(new[k], src[k], rtol=0, atol=0)
        assert new[k].data_ptr() != src[k].data_ptr()  # a copy, not shared storage


def test_copy_refuses_a_converted_source_and_random_changes_nothing():
    torch.manual_seed(0)
    builder = ProgressiveRackBuilder(_config(), "append")
    builder.add_stack(precision="half")
    builder.freeze_stack(0, "frozen")
    builder.add_stack()
    state = {k: v.clone() for k, v in builder.rack.stacks[1].state_dict().items()}
    init_new_stack(builder, 1, "random")
    for k, v in builder.rack.stacks[1].state_dict().items():
        assert torch.equal(v, state[k])
    with pytest.raises(TrainingError, match="already converted"):
        init_new_stack(builder, 1, "copy")
    with pytest.raises(ConfigurationError, match="new_stack_init"):
        init_new_stack(builder, 1, "zeros")


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        ("uniform", [100, 100, 100, 100]),
        ("front_loaded", [160, 120, 80, 40]),
        ("back_loaded", [40, 80, 120, 160]),
    ],
)
def test_stage_budgets(budget, expected):
    assert [stage_steps_share(400, 4, k, budget) for k in range(4)] == expected
    for total in (7, 401, 3199):
        shares = [stage_steps_share(total, 3, k, budget) for k in range(3)]
        assert sum(shares) == total


def test_uniform_budget_matches_the_even_split():
    for total, plan in ((10, 3), (7, 4), (601, 2)):
        even = [total * (k + 1) // plan - total * k // plan for k in range(plan)]
        assert [stage_steps_share(total, plan, k, "uniform") for k in range(plan)] == even


@pytest.mark.parametrize(
    ("key", "value"),
    [("new_stack_init", "zeros"), ("stage_budget", "random")],
)
def test_config_rejects_unknown_values(key, value):
    with pytest.raises(ConfigurationError, match=f"training.progressive.{key}"):
        _config(**{key: value})


def test_trainer_applies_init_and_budget():
    torch.manual_seed(0)
    cfg = _config(new_stack_init="copy", stage_budget="front_loaded", steps_per_stack=None)
    cfg.training.max_steps = 9
    builder = ProgressiveRackBuilder(cfg, "append")
    seen = []

    class Snap:
        def on_stage_start(self, info):
            stacks = builder.rack.stacks
            if info["stage"] == 1:
                a, b = stacks[0].state_dict(), stacks[1].state_dict()
                seen.append(all(torch.equal(a[k], b[k]) for k in a))

    trainer = ProgressiveTrainer(cfg, callbacks=[Snap()])
    data = [{"input_ids": _ids(i)} for i in range(3)]
    res = trainer.train_rack(builder, data)
    assert [h["steps"] for h in res["history"]] == [6, 3]
    assert seen == [True]


def test_validation_knows_the_same_choices():
    from stackwise.config._schema import config_choices
    from stackwise.config.base import ProgressiveConfig
    from stackwise.training import growth

    assert config_choices(ProgressiveConfig, "new_stack_init") == growth.NEW_STACK_INITS
    assert config_choices(ProgressiveConfig, "stage_budget") == growth.STAGE_BUDGETS
