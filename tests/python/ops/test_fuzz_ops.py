"""The native-op fuzz test: every op family of torch.ops.stackwise on generated good and bad
inputs (tests/python/ops/fuzz_ops.py), each family in its own process so that a crash fails the
test naming the input that caused it instead of taking pytest down.

Every call must end in a clear error naming the op and an argument, or in a result equal to the
plain-PyTorch reference; the fake (meta) kernel must agree with the CPU kernel on which inputs
fail. Examples are derandomized: each run makes the same calls. STACKWISE_FUZZ_EXAMPLES sets
the examples per family (default 100: about 90 s for all families on 2 CPU cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FUZZER = Path(__file__).with_name("fuzz_ops.py")
FAMILIES = [
    "swiglu",
    "rms_norm",
    "rope",
    "linear_attention",
    "attention",
    "quant",
    "quantized_linear",
    "linear_cross_entropy",
]
EXAMPLES = int(os.environ.get("STACKWISE_FUZZ_EXAMPLES", "100"))


@pytest.mark.parametrize("family", FAMILIES)
def test_fuzz_native_ops(family):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, str(FUZZER), family, str(EXAMPLES)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    lines = r.stdout.splitlines()
    if r.returncode < 0:  # killed by a signal: the last call printed is the one that crashed
        last = lines[-1] if lines else "(nothing printed)"
        pytest.fail(f"{family}: the process died with signal {-r.returncode} during: {last}")
    assert r.returncode == 0, f"{family} fuzzing failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    summary = json.loads(lines[-1].removeprefix("SUMMARY "))
    assert summary["probes"] >= EXAMPLES // 2  # hypothesis may stop early on a small space
    assert summary["clear_errors"] > 0 and summary["results_checked"] > 0, summary
    print(json.dumps(summary))
