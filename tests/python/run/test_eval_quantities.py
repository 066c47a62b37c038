"""What evaluation reports and how the samplers drive a time-conditioned rack: a
``time_interpretation: input`` run trains, evaluates and generates; bits per byte is the
next-token cross entropy (clm), the masked-diffusion ELBO bound (diffusion) or nothing (mlm),
and says which."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from stackwise.cli import main
from stackwise.config.base import StackWiseConfig
from stackwise.model.architecture import Rack
from stackwise.ops import linear_cross_entropy
from stackwise.run import likelihood
from stackwise.run.generate import _level, generate_depth, generate_diffusion
from utils import tiny_model

INPUT_TIME = "training.progressive.time_interpretation=input"


def test_input_time_run_trains_evaluates_and_generates(tmp_path, make_tiny, capsys):
    cfg = make_tiny(tmp_path, objective="diffusion", building="prepend")
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--run-dir", str(run), INPUT_TIME]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_loss"] is not None and summary["bits_per_byte"] > 0
    assert summary["bits_per_byte_quantity"] == likelihood.DIFFUSION_ELBO
    capsys.readouterr()
    assert main(["eval", "--run-dir", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    assert result["mask_ratio"] == pytest.approx(0.5)  # mean of U(0.1, 0.9) noise levels
    for sampler in ("depth", "diffusion"):
        args = ["generate", "--run-dir", str(run), "--prompt", "Line", "--sampler", sampler]
        assert main([*args, "--max-new-tokens", "10", "--json"]) == 0
        ids = json.loads(capsys.readouterr().out)["ids"]
        assert len(ids) == 14 and 258 not in ids


def test_mlm_reports_no_bits_per_byte_and_says_so(tmp_path, make_tiny, capsys):
    cfg = make_tiny(tmp_path, objective="mlm", building="append")
    run = tmp_path / "run"
    one = "training.progressive.target_stacks=1"
    assert main(["train", "--config", str(cfg), "--run-dir", str(run), one]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["bits_per_byte"] is None and summary["bits_per_byte_quantity"] is None
    assert "bits per byte: not reported" in (run / "summary.md").read_text()
    final = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["type"] == "final" and final["bits_per_byte"] is None
    capsys.readouterr()
    assert main(["eval", "--run-dir", str(run)]) == 0
    assert "not reported" in capsys.readouterr().out


def test_quadrature_integrates_polynomials_on_the_unit_interval():
    nodes = likelihood.quadrature()
    assert all(0 < t < 1 for t, _ in nodes) and sum(w for _, w in nodes) == pytest.approx(1.0)
    for k in range(2 * len(nodes)):  # Gauss-Legendre is exact up to degree 2n - 1
        assert sum(w * t**k for t, w in nodes) == pytest.approx(1 / (k + 1), rel=1e-9)


class _Uniform(nn.Module):
    """A rack predicting every token with probability 1/V: a zero hidden state and a zero head,
    through the same entry points as a Rack (embed, forward_from, token_loss)."""

    time_embedding = None

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def embed(self, ids, time=None):
        return torch.zeros(*ids.shape, 1)

    def forward_from(self, hidden, start_stack):
        return hidden

    def token_loss(self, hidden, labels, reduction="mean", ignore_index=-100):
        head = torch.zeros(self.vocab, 1)
        return linear_cross_entropy(
            hidden, head, labels, reduction=reduction, ignore_index=ignore_index
        )


def test_the_elbo_bound_of_a_uniform_model_is_log_v_per_token():
    """With p = 1/V everywhere the integrand (1/t) E[masked] ln V is L ln V at every t, so the
    bound is N ln V for N tokens (the 1/t weighting undoes the masked share)."""
    vocab, n_windows, seq = 50, 256, 32
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab - 1, (n_windows, seq), generator=g)
    batches = [(ids[i : i + 16], torch.arange(i, i + 16)) for i in range(0, n_windows, 16)]
    nats = likelihood.diffusion_nll_bound_nats(
        _Uniform(vocab),
        batches,
        seed=0,
        mask_token_id=vocab - 1,
        special_ids=(),
        device=torch.device("cpu"),
    )
    assert nats == pytest.approx(n_windows * seq * math.log(vocab), rel=0.03)


def _input_time_config(building="prepend"):
    return StackWiseConfig.from_dict(
        {
            "model": tiny_model(61, attention_mode="bidirectional", use_rope=True),
            "training": {
                "seq_len": 24,
                "time_step_masking": True,
                "progressive": {
                    "training_objective": "diffusion",
                    "building_mode": building,
                    "time_interpretation": "input",
                },
            },
        }
    ).validate()


def _recording_rack(config) -> tuple[Rack, list[float]]:
    torch.manual_seed(0)
    rack = Rack.from_config(config.model, time_embedding=True).eval()
    seen: list[float] = []
    rack.time_embedding.register_forward_hook(lambda m, args, out: seen.append(float(args[0][0])))
    return rack, seen


def test_samplers_give_a_time_conditioned_rack_their_noise_schedule():
    config = _input_time_config()
    rack, seen = _recording_rack(config)
    out = generate_diffusion(rack, [1, 2], 20, mask_id=60, steps=4, seed=0, banned=(60,))
    assert 60 not in out
    assert seen == pytest.approx([1.0, 0.75, 0.5, 0.25][: len(seen)]) and len(seen) >= 2
    seen.clear()
    out = generate_depth(rack, config, [1, 2], 20, mask_id=60, seed=0, banned=(60,))
    n = len(rack.stacks)
    assert 60 not in out
    assert seen == pytest.approx([_level(config, i, n) for i in range(n)])
    assert seen[0] == pytest.approx(0.9) and np.all(np.diff(seen) < 0)
