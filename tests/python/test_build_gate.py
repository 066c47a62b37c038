"""The CUDA gate of the CMake configure step (cmake/StackwiseCUDA.cmake), run against a fake
toolkit whose nvcc reports another major version than torch's CUDA: ``auto`` says why CUDA is
off and goes on, ``1`` fails with a message naming what is missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _cmake() -> str:
    try:
        import cmake

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        found = shutil.which("cmake")
        if not found:
            pytest.skip("cmake is not installed")
        return found


@pytest.mark.skipif(not torch.version.cuda, reason="torch is not a CUDA build")
@pytest.mark.parametrize("gate", ["auto", "1"])
def test_cuda_gate_with_mismatched_toolkit(tmp_path, gate):
    fake = tmp_path / "toolkit"
    (fake / "bin").mkdir(parents=True)
    (fake / "include").mkdir()
    (fake / "include" / "cuda_runtime.h").touch()
    nvcc = fake / "bin" / "nvcc"
    other = int(torch.version.cuda.split(".")[0]) - 1
    nvcc.write_text(f'#!/bin/sh\necho "Cuda compilation tools, release {other}.9, V{other}.9.1"\n')
    nvcc.chmod(0o755)
    env = {**os.environ, "STACKWISE_BUILD_CUDA": gate, "CUDAToolkit_ROOT": str(fake)}
    env.pop("CUDA_HOME", None)
    res = subprocess.run(
        [
            _cmake(),
            "-S",
            str(ROOT),
            "-B",
            str(tmp_path / "build"),
            f"-DPython3_EXECUTABLE={sys.executable}",
            "-DSTACKWISE_BUILD_TESTS=OFF",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    out = res.stdout + res.stderr
    expected = f"nvcc {other}.9 at {fake} does not"
    if gate == "auto":
        assert res.returncode == 0, out
        assert "CUDA kernels off: " + expected in out
    else:
        assert res.returncode != 0
        assert "STACKWISE_BUILD_CUDA=1 but" in out and expected in " ".join(out.split())
