"""The memory planner against what a real (CPU) progressive run holds: per stage, the trainable
weights, gradients and optimizer moments exactly (read from the optimizer after each step), the
frozen weights exactly (NF4 / int8 trunks included), and the saved activations of one
micro-batch within 10% (measured with saved-tensor hooks around the run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from stackwise.config.base import StackWiseConfig
from stackwise.exceptions import ConfigurationError
from stackwise.run.plan import parse_bytes, plan_memory
from stackwise.training import ProgressiveRackBuilder, ProgressiveTrainer
from utils import tiny_model

VOCAB = 64


def _config(training=None, **model):
    training = dict(training or {})
    progressive = {"target_stacks": 2, "steps_per_stack": 2, **training.pop("progressive", {})}
    return StackWiseConfig.from_dict(
        {
            "model": tiny_model(VOCAB, d_model=64, d_ff=128, max_seq_len=64, **model),
            "training": {
                "batch_size": 4,
                "seq_len": 48,
                "device": "cpu",  # the plan's compute dtype is the CPU run's
                "max_steps": 0,
                "qlora_enabled": False,
                "time_step_masking": False,
                "progressive": progressive,
                **training,
            },
        }
    ).validate()


def _data(n=2, b=4, s=48):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, VOCAB - 1, (b, s), generator=g)} for _ in range(n)]


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _measure(config):
    """Per stage (one optimizer per stage): trainable, grad, moment and frozen bytes at the
    first step, and the largest saved-activation bytes of one step."""
    builder = ProgressiveRackBuilder(config)
    stages: dict[int, dict] = {}
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def post_step(opt, args, kwargs):
        rack = builder.rack
        weights = {t.untyped_storage().data_ptr() for t in [*rack.parameters(), *rack.buffers()]}
        rec = stages.setdefault(id(opt), {"acts": 0})
        acts = sum(n for key, n in saved.items() if key not in weights)
        rec["acts"] = max(rec["acts"], acts)
        saved.clear()
        if "trainable" in rec:
            return
        params = [p for g in opt.param_groups for p in g["params"]]
        ids = {id(p) for p in params}
        rec["trainable"] = sum(_nbytes(p) for p in params)
        rec["grads"] = sum(_nbytes(p.grad) for p in params if p.grad is not None)
        rec["moments"] = sum(
            _nbytes(v) for st in opt.state.values() for k, v in st.items() if k != "step"
        )
        seen, frozen = set(), 0
        for t in list(builder.rack.parameters()) + list(builder.rack.buffers()):
            if id(t) not in ids and id(t) not in seen:
                seen.add(id(t))
                frozen += _nbytes(t)
        rec["frozen"] = frozen

    handle = register_optimizer_step_post_hook(post_step)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ProgressiveTrainer(config).train_rack(builder, _data(), target_stacks=2)
    finally:
        handle.remove()
    return list(stages.values())


CASES = {
    "fp32 gqa": ({}, {"n_kv_heads": 2, "attention_type": "gqa", "use_rope": True}),
    "bf16 autocast": ({"autocast": True}, {"use_rope": True}),
    "nf4 trunk, untied head": (
        {"quantization_enabled": True, "quantization_type": "nf4"},
        {"tie_embeddings": False},
    ),
    "int8 trunk, no cache": (
        {
            "quantization_enabled": True,
            "quantization_type": "int8",
            "progressive": {"cache_activations": False},
        },
        {},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_plan_matches_a_real_run(name):
    training, model = CASES[name]
    config = _config(training, **model)
    plan = plan_memory(config)
    measured = _measure(config)
    assert len(measured) == len(plan.stages) == 2
    for st, got in zip(plan.stages, measured, strict=True):
        assert st.trainable == got["trainable"], (name, st.stage)
        assert st.gradients == got["grads"], (name, st.stage)
        assert st.optimizer == got["moments"], (name, st.stage)
        assert sum(st.frozen.values()) == got["frozen"], (name, st.stage, st.frozen)
        assert abs(st.activations - got["acts"]) <= 0.1 * got["acts"], (name, st.stage, got)
        assert st.activations_checkpointed <= st.activations
    if training.get("quantization_type") == "nf4":
        # 4 bits per weight + one float32 absmax per 64 weights in every trunk linear
        assert plan.stages[1].frozen["nf4"] > 0 and "nf4" not in plan.stages[0].frozen


def test_fit_and_cache_budget():
    config = _config({"caching": {"max_memory_mb": 1, "max_cache_size": 1}})
    plan = plan_memory(config, device_memory=parse_bytes("64MB"))
    first, second = plan.stages
    assert first.cache_entry == 0 and second.cache_entry > 0
    assert second.cache_entries == 2 and second.cache_disk == second.cache_entry
    assert any("spill_dir is not set" in n for n in second.notes)
    assert first.fits == (first.total <= 64 * 2**20)
    assert "stage" in plan.table() and "MiB" in plan.table()


@pytest.mark.parametrize(
    "text,value",
    [("80GB", 80 * 2**30), ("141GiB", 141 * 2**30), ("512M", 512 * 2**20), ("1000", 1000)],
)
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["eighty", "-1GB", "0", "GB"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ConfigurationError, match="device-memory"):
        parse_bytes(text)


def test_plan_command(capsys):
    from stackwise.cli import main

    cfg = str(Path(__file__).resolve().parents[3] / "configs" / "shakespeare-tiny.yaml")
    assert main(["plan", "--config", cfg, "--device-memory", "1GB", "training.batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert (
        "micro-batch 2 x 128 tokens" in out and out.count("  yes  ") == 4
    )  # two stages, fits with and without checkpointing
    assert main(["plan", "--config", cfg, "--end-to-end", "--json"]) == 0
    (stage,) = json.loads(capsys.readouterr().out)["stages"]
    assert stage["trained_blocks"] == stage["total_blocks"] == 4 and not stage["frozen"]
    assert main(["plan", "--config", cfg, "--device-memory", "lots"]) == 2
    assert "--device-memory" in capsys.readouterr().err


def test_first_stage_skips_a_pretrained_trunk():
    config = _config()
    full = plan_memory(config)
    (last,) = plan_memory(config, first_stage=1).stages
    assert last.stage == 1 and last.total == full.stages[1].total


def test_documented_70b_table_is_current():
    """docs/memory-planner.md and the README show ``stackwise plan --config
    configs/llama-70b-shaped.yaml --device-memory 80GB``; every line they show must be a line the
    planner prints today."""
    import re

    from stackwise.run.plan import plan_run

    root = Path(__file__).resolve().parents[3]
    config = StackWiseConfig.from_yaml(root / "configs" / "llama-70b-shaped.yaml").validate()
    printed = plan_run(config, parse_bytes("80GB")).table().splitlines()
    for name in ("docs/memory-planner.md", "README.md"):
        doc = (root / name).read_text()
        block = re.search(r"```\n(micro-batch 1 x 4096 tokens.*?)```", doc, re.S)
        assert block, f"{name} lost the 70B-shaped table"
        shown = [line for line in block.group(1).splitlines() if line.strip() != "..."]
        assert len(shown) >= 4, name
        assert [line for line in shown if line not in printed] == [], name
