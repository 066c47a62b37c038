"""Generation: the KV cache reproduces uncached decoding (logits and greedy tokens) for every
attention variant; masked samplers leave no mask token and are fixed by their seed; top-k/top-p
filtering."""

from __future__ import annotations

import pytest
import torch

from stackwise.config.base import StackWiseConfig
from stackwise.model.architecture import Rack
from stackwise.model.attention import KVCache
from stackwise.run.generate import (
    filter_logits,
    forward_cached,
    generate_causal,
    generate_depth,
    generate_diffusion,
)
from utils import tiny_model

VOCAB = 61
MASK = VOCAB - 1

VARIANTS = {
    "standard-learned-positions": {"attention_type": "standard", "n_kv_heads": 4},
    "gqa-rope": {"attention_type": "gqa", "n_kv_heads": 2, "use_rope": True},
    "mla": {"attention_type": "mla", "use_rope": True, "mla": {"kv_rank": 16, "rope_head_dim": 4}},
    "kernel": {"attention_type": "kernel", "n_kv_heads": 2},
    "mlgka": {"attention_type": "mlgka", "n_kv_heads": 2, "use_rope": True, "mla": {"kv_rank": 16}},
}


def _config(mode="causal", objective="clm", building="append", **model):
    return StackWiseConfig.from_dict(
        {
            "model": tiny_model(VOCAB, max_seq_len=48, attention_mode=mode, **model),
            "training": {
                "seq_len": 32,
                "time_step_masking": objective != "clm",
                "progressive": {"training_objective": objective, "building_mode": building},
            },
        }
    ).validate()


def _rack(config, seed=0):
    torch.manual_seed(seed)
    rack = Rack.from_config(config.model)
    with torch.no_grad():  # larger weights than the init, so the tokens vary along the sequence
        for p in rack.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return rack.eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_logits_match_full_forward(variant):
    rack = _rack(_config(**VARIANTS[variant]))
    ids = torch.randint(0, MASK, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = rack(ids)
        caches = [KVCache() for s in rack.stacks for _ in s.blocks]
        parts = [forward_cached(rack, ids[:, :7], caches)]
        parts += [forward_cached(rack, ids[:, t : t + 1], caches) for t in range(7, 12)]
        parts.append(forward_cached(rack, ids[:, 12:], caches))
    assert caches[0].length == 20
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_greedy_generation_equals_uncached(variant):
    rack = _rack(_config(**VARIANTS[variant]), seed=3)
    prompt = [5, 17, 3, 44, 9]
    kwargs = dict(temperature=0.0, banned=(MASK,))
    cached = generate_causal(rack, prompt, 30, use_cache=True, **kwargs)
    uncached = generate_causal(rack, prompt, 30, use_cache=False, **kwargs)
    assert cached == uncached
    assert len(set(cached[len(prompt) :])) > 1  # not a degenerate constant continuation


def test_sampling_with_cache_is_seeded_and_runs_past_the_window():
    rack = _rack(_config(attention_type="gqa", n_kv_heads=2, use_rope=True))
    a = generate_causal(rack, [1, 2, 3], 20, temperature=1.0, top_k=10, seed=5)
    b = generate_causal(rack, [1, 2, 3], 20, temperature=1.0, top_k=10, seed=5)
    c = generate_causal(rack, [1, 2, 3], 20, temperature=1.0, top_k=10, seed=6)
    assert a == b and a != c
    assert (
        generate_causal(rack, [1, 2, 3], 20, temperature=1.0, top_k=10, seed=5, use_cache=False)
        == a
    )
    long = generate_causal(rack, [1, 2, 3], 100, temperature=0.0)  # max_seq_len is 48
    assert len(long) == 103


@pytest.mark.parametrize("building", ["prepend", "append"])
def test_masked_samplers_fill_every_mask_and_follow_the_seed(building):
    config = _config("bidirectional", "diffusion", building, use_rope=True)
    rack = _rack(config)
    prompt = [4, 8, 15, 16]
    runs = {}
    for name, fn in (
        (
            "depth",
            lambda s, t: generate_depth(
                rack, config, prompt, 12, mask_id=MASK, seed=s, temperature=t, banned=(MASK,)
            ),
        ),
        (
            "diffusion",
            lambda s, t: generate_diffusion(
                rack, prompt, 12, mask_id=MASK, steps=5, seed=s, temperature=t, banned=(MASK,)
            ),
        ),
    ):
        out = fn(0, 1.0)
        assert len(out) == 16 and out[:4] == prompt and MASK not in out
        assert fn(0, 1.0) == out
        assert any(fn(s, 1.0) != out for s in (1, 2, 3))
        if name == "depth":  # greedy depth unmasking draws nothing at random
            assert fn(0, 0.0) == fn(9, 0.0)
        runs[name] = out


def test_masked_sampler_rejects_a_too_long_request():
    config = _config("bidirectional", "diffusion", "prepend")
    with pytest.raises(Exception, match="max_seq_len"):
        generate_depth(_rack(config), config, [1] * 40, 20, mask_id=MASK)


def test_filter_logits_top_k_top_p_and_banned():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    kept = ~torch.isinf(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = ~torch.isinf(filter_logits(logits, top_p=0.1))
    assert kept.tolist() == [[True, False, False, False]]  # the most likely token always stays
    assert torch.isinf(filter_logits(logits, banned=(0,)))[0, 0]
