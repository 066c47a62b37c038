"""The consolidation phase and trunk recomputation (training/consolidation.py): a recomputed stack
gives the same output and gradients; the trunk stacks that run with gradients are the ones that
recompute; the consolidation phase trains every stack through NF4 + LoRA after the last stage,
within training.max_steps, once; bad settings are refused."""

from __future__ import annotations

import pytest
import torch

from stackwise.config.base import StackWiseConfig
from stackwise.exceptions import ConfigurationError
from stackwise.model.architecture import Stack
from stackwise.model.mlgka import MLGKALayer
from stackwise.training import ProgressiveRackBuilder, ProgressiveTrainer
from stackwise.training.consolidation import set_trunk_recompute
from stackwise.training.core.qlora import QLoRAAdapter, adapter_parameters
from utils import tiny_model

VOCAB = 24


def _config(max_steps=9, **progressive):
    return StackWiseConfig.from_dict(
        {
            "model": tiny_model(VOCAB, use_rope=True, tie_embeddings=False),
            "training": {
                "learning_rate": 3e-3,
                "batch_size": 4,
                "seq_len": 16,
                "max_steps": max_steps,
                "eval_every": 100,
                "qlora_enabled": False,
                "time_step_masking": False,
                "checkpointing": {"enabled": False},
                "qlora": {"rank": 4, "alpha": 8.0, "dropout": 0.0, "lr": 3e-3},
                "progressive": {"target_stacks": 2, "stage_budget": "uniform", **progressive},
            },
        }
    ).validate()


def _data(n=4):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, VOCAB - 1, (4, 16), generator=g)} for _ in range(n)]


def test_recomputed_stack_matches_plain_forward_and_gradients():
    torch.manual_seed(0)
    blocks = [MLGKALayer(d_model=32, n_heads=4, d_ff=64, use_rope=True, seed=i) for i in range(2)]
    stack = Stack(blocks)
    x = torch.randn(2, 8, 32, requires_grad=True)
    out = stack(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in stack.parameters()]
    gx = x.grad.clone()
    stack.zero_grad()
    x.grad = None
    stack.recompute = True
    out2 = stack(x)
    torch.testing.assert_close(out2, out)
    out2.square().sum().backward()
    torch.testing.assert_close(x.grad, gx)
    for p, g in zip(stack.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_only_stacks_running_with_gradients_recompute():
    torch.manual_seed(0)
    cfg = _config()
    builder = ProgressiveRackBuilder(cfg, "append")
    for _ in range(3):
        builder.add_stack()
    rack = builder.rack
    builder.freeze_stack(0, "qlora", cfg.training.qlora)
    builder.freeze_stack(1, "frozen")
    # stack 0's adapters train; stack 1 passes their gradients back; stack 2 is the new one
    assert all(p.requires_grad for p in adapter_parameters(rack.stacks[0]))
    set_trunk_recompute(rack, {2}, True)
    assert [s.recompute for s in rack.stacks] == [True, True, False]
    set_trunk_recompute(rack, {2}, False)
    assert [s.recompute for s in rack.stacks] == [False, False, False]
    for p in adapter_parameters(rack.stacks[0]):
        p.requires_grad_(False)
    set_trunk_recompute(rack, {2}, True)
    assert [s.recompute for s in rack.stacks] == [False, False, False]  # nothing to backprop
    # prepend: the frozen suffix after the trained stack passes gradients back to it
    set_trunk_recompute(rack, {0}, True)
    assert [s.recompute for s in rack.stacks] == [False, True, True]


def test_consolidation_trains_every_stack_through_lora_once():
    torch.manual_seed(0)
    cfg = _config(max_steps=9, consolidation_steps=3, trunk_checkpointing=True)
    builder = ProgressiveRackBuilder(cfg, "append")
    trainer = ProgressiveTrainer(cfg)
    phases = []

    class Watch:
        def on_stage_start(self, info):
            phases.append(info.get("phase", "stage"))

    trainer.callbacks = [Watch()]
    data = _data()
    res = trainer.train_rack(builder, data, eval_loader=data[:1])
    hist = res["history"]
    assert [h["steps"] for h in hist] == [3, 3, 3]
    assert [h.get("phase") for h in hist] == [None, None, "consolidation"]
    assert phases == ["stage", "stage", "consolidation"]
    assert all(torch.isfinite(torch.tensor(h["losses"])).all() for h in hist)
    assert "eval_loss" in hist[-1]
    rack = res["rack"]
    for stack in rack.stacks:
        for block in stack.blocks:
            assert isinstance(block.ffn.down_proj, QLoRAAdapter)
            assert isinstance(block.attn.o_proj, QLoRAAdapter)
    # LoRA B starts at zero; after consolidation every stack's adapters have moved.
    for stack in rack.stacks:
        b = [m.lora_B for m in stack.modules() if isinstance(m, QLoRAAdapter)]
        assert any(float(t.detach().abs().sum()) > 0 for t in b)
    emb = rack.lexical.get_embeddings().table.weight.detach().clone()
    trainer.train_rack(builder, data)  # already grown and consolidated: nothing more
    assert len(trainer.history) == 3
    assert torch.equal(rack.lexical.get_embeddings().table.weight, emb)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"consolidation_steps": 9}, "leaves no step"),
        ({"consolidation_steps": -1}, "must be >= 0"),
        ({"consolidation_steps": 2, "building_mode": "prepend"}, "append"),
    ],
)
def test_bad_consolidation_settings(overrides, message):
    with pytest.raises(ConfigurationError, match=message):
        _config(max_steps=9, **overrides)
