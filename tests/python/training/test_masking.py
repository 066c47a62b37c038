"""MaskScheduler shapes and endpoints; mlm/diffusion corruption statistics, exclusions and
determinism; per-sample noise levels; clm labels and the masked loss."""

from __future__ import annotations

import pytest
import torch

from stackwise.exceptions import ConfigurationError, TrainingError
from stackwise.training.strategies.masking import (
    IGNORE_INDEX,
    MaskScheduler,
    clm_labels,
    diffusion_corrupt,
    hash_uniform,
    mlm_corrupt,
    sample_noise_levels,
    token_loss,
)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "exponential"])
def test_schedules_exact_endpoints_and_monotone(schedule):
    s = MaskScheduler(0.1, 0.9, schedule)
    vals = [s.get_mask_fraction(i, 7) for i in range(7)]
    assert vals[0] == 0.1 and vals[-1] == 0.9
    assert all(a <= b for a, b in zip(vals, vals[1:], strict=False))
    r = MaskScheduler(0.1, 0.9, schedule, reverse=True)
    assert [r.get_mask_fraction(i, 7) for i in range(7)] == vals[::-1]


def test_documented_snippet_and_constant():
    scheduler = MaskScheduler(min_fraction=0.1, max_fraction=0.9, schedule_type="linear")
    assert scheduler.get_mask_fraction(2, 5) == pytest.approx(0.5)
    assert MaskScheduler(0.15, 0.15, "constant").get_mask_fraction(3, 4) == 0.15
    assert MaskScheduler(0.2, 0.6, "linear").get_mask_fraction(0, 1) == 0.6


def test_scheduler_errors():
    with pytest.raises(ConfigurationError, match="'zigzag' is not one of"):
        MaskScheduler(schedule_type="zigzag")
    with pytest.raises(ConfigurationError, match="min_fraction <= max_fraction"):
        MaskScheduler(0.9, 0.1)
    with pytest.raises(ConfigurationError, match="outside"):
        MaskScheduler().get_mask_fraction(5, 5)


def test_mlm_80_10_10_and_exclusions():
    torch.manual_seed(0)
    b, s, vocab, mask_id, pad_id = 64, 512, 1000, 1000, 1001
    ids = torch.randint(5, vocab, (b, s))
    ids[:, -20:] = pad_id
    ids[:, 0] = 2  # a special (BOS-like) token
    attn = ids != pad_id
    sample_ids = torch.arange(b) + 1000
    out, labels = mlm_corrupt(
        ids,
        sample_ids,
        0.3,
        seed=7,
        mask_token_id=mask_id,
        vocab_size=vocab,
        special_ids=(2, pad_id),
        attention_mask=attn,
    )
    sel = labels != IGNORE_INDEX
    maskable = attn & (ids != 2)
    assert not bool((sel & ~maskable).any())  # padding and specials never selected
    assert abs(sel.sum().item() / maskable.sum().item() - 0.3) < 0.01
    n = sel.sum().item()
    masked = (out == mask_id) & sel
    unchanged = (out == ids) & sel
    randomised = sel & ~masked & ~unchanged
    assert abs(masked.sum().item() / n - 0.8) < 0.015
    assert abs(unchanged.sum().item() / n - 0.1) < 0.015 + 0.001  # random can hit the same id
    assert abs(randomised.sum().item() / n - 0.1) < 0.015
    assert torch.equal(out[~sel], ids[~sel]) and torch.equal(labels[sel], ids[sel])
    assert not bool((out[randomised] == 2).any())


def test_masks_depend_only_on_sample_id_position_seed():
    ids = torch.randint(0, 50, (6, 40))
    sid = torch.tensor([10, 11, 12, 13, 14, 15])
    a, la = mlm_corrupt(ids, sid, 0.5, seed=3, mask_token_id=50, vocab_size=50)
    perm = torch.tensor([5, 3, 1, 0, 2, 4])
    b, lb = mlm_corrupt(ids[perm], sid[perm], 0.5, seed=3, mask_token_id=50, vocab_size=50)
    assert torch.equal(a[perm], b) and torch.equal(la[perm], lb)
    c, _ = mlm_corrupt(ids, sid, 0.5, seed=4, mask_token_id=50, vocab_size=50)
    assert not torch.equal(a, c)
    u = hash_uniform(torch.tensor([2**40 + 5]), 1000, 1, 0)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0 and abs(float(u.mean()) - 0.5) < 0.05


def test_diffusion_masks_all_selected_and_monotone_in_ratio():
    ids = torch.randint(0, 100, (8, 256))
    sid = torch.arange(8)
    lo, l_lo = diffusion_corrupt(ids, sid, 0.2, seed=1, mask_token_id=100)
    hi, l_hi = diffusion_corrupt(ids, sid, 0.7, seed=1, mask_token_id=100)
    assert torch.equal(lo == 100, l_lo != IGNORE_INDEX)
    # Same hash draws: everything masked at 0.2 is masked at 0.7 (nested noise levels).
    assert bool(((lo == 100) <= (hi == 100)).all())


def test_clm_labels_and_loss():
    ids = torch.tensor([[5, 6, 7, 0, 0]])
    attn = torch.tensor([[True, True, True, False, False]])
    labels = clm_labels(ids, attn)
    assert labels.tolist() == [[6, 7, -100, -100, -100]]
    logits = torch.zeros(1, 5, 10)
    assert token_loss(logits, labels).item() == pytest.approx(torch.log(torch.tensor(10.0)).item())
    with pytest.raises(TrainingError, match="no position has a target"):
        token_loss(logits, torch.full_like(labels, -100))


def test_per_sample_noise_levels_and_ratios():
    sid = torch.arange(4000)
    t = sample_noise_levels(sid, seed=5, min_fraction=0.2, max_fraction=0.6)
    assert t.shape == (4000,) and t.dtype == torch.float32
    assert 0.2 <= float(t.min()) and float(t.max()) < 0.6 and abs(float(t.mean()) - 0.4) < 0.01
    assert torch.equal(t[[7, 3]], sample_noise_levels(sid[[7, 3]], 5, 0.2, 0.6))  # per sample
    assert not torch.equal(t, sample_noise_levels(sid, 6, 0.2, 0.6))
    # Each row is masked at its own ratio; a uniform tensor equals the scalar ratio.
    ids = torch.randint(0, 100, (3, 2000))
    ratios = torch.tensor([0.1, 0.5, 0.9])
    out, labels = diffusion_corrupt(ids, torch.arange(3), ratios, seed=1, mask_token_id=100)
    frac = (labels != IGNORE_INDEX).float().mean(dim=1)
    torch.testing.assert_close(frac, ratios, atol=0.03, rtol=0)
    same, _ = diffusion_corrupt(
        ids, torch.arange(3), torch.full((3,), 0.5), seed=1, mask_token_id=100
    )
    scalar, _ = diffusion_corrupt(ids, torch.arange(3), 0.5, seed=1, mask_token_id=100)
    assert torch.equal(same, scalar)
    with pytest.raises(ConfigurationError, match=r"per-sample mask ratio must have shape \[3\]"):
        mlm_corrupt(ids, torch.arange(3), torch.ones(2), seed=0, mask_token_id=100, vocab_size=100)
    with pytest.raises(ConfigurationError, match=r"must be in \[0, 1\]"):
        diffusion_corrupt(
            ids, torch.arange(3), torch.tensor([0.1, 1.5, 0.2]), seed=0, mask_token_id=100
        )
