"""CachedSource: the cycled order of cached batch ids and the read-ahead requests it makes."""

from __future__ import annotations

import pytest

from stackwise.training.batches import CachedSource


def test_order_cycles_and_resumes_at_start():
    src = CachedSource([4, 7, 1], start=2)
    assert [src.next() for _ in range(5)] == [1, 4, 7, 1, 4]


def test_read_ahead_requests_follow_the_cycle():
    asked: list[list[int]] = []
    src = CachedSource([4, 7, 1], start=1, prefetch=asked.append, depth=2)
    assert asked == [[7, 1]]  # at construction: the first micro-batches of the stage
    assert src.next() == 7
    assert asked[-1] == [1, 4]  # wraps around into the next pass
    assert src.next() == 1
    assert asked[-1] == [4, 7]
    assert src.upcoming(0, 5) == [4, 7, 1]  # distinct ids, never more than there are


def test_no_requests_at_depth_zero_and_bad_depth():
    asked: list[list[int]] = []
    src = CachedSource([0, 1], prefetch=asked.append, depth=0)
    src.next()
    assert asked == []
    with pytest.raises(ValueError, match="prefetch depth must be >= 0"):
        CachedSource([0], prefetch=asked.append, depth=-1)
