"""The package around the ops: extension loading and its errors, build info, `stackwise.info`,
and the CRC-32C binding."""

from __future__ import annotations

import json
import subprocess
import sys
import types
import zlib

import pytest
import torch

import stackwise
from stackwise import _native


def test_build_info_matches_running_torch():
    info = stackwise._C.build_info()
    assert info["torch_version"] == torch.__version__
    assert info["cxx_standard"] == "20"
    if info["cuda_built"]:
        assert info["cuda_archs"] and info["cuda_off_reason"] == ""
    else:
        assert info["cuda_off_reason"]


def test_ops_registered_with_cpu_kernels():
    from stackwise.info import op_kernels

    ops = op_kernels()
    assert ops["swiglu"]["CPU"] and ops["swiglu_backward"]["CPU"]
    built = stackwise._C.build_info()["cuda_built"]
    assert ops["swiglu"]["CUDA"] == built


def test_missing_extension_says_how_to_build(monkeypatch):
    def fail(name):
        raise ImportError("No module named 'stackwise._C'")

    monkeypatch.setattr(_native.importlib, "import_module", fail)
    with pytest.raises(ImportError, match="pip install --no-build-isolation -e ."):
        _native.load_extension()


def test_extension_built_for_other_torch_is_refused(monkeypatch):
    fake = types.SimpleNamespace(build_info=lambda: {"torch_version": "1.0.0"})
    monkeypatch.setattr(_native.importlib, "import_module", lambda name: fake)
    with pytest.raises(ImportError, match=r"built against torch 1\.0\.0 but torch .* is installed"):
        _native.load_extension()


def test_info_module_runs():
    out = subprocess.run(
        [sys.executable, "-m", "stackwise.info", "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    info = json.loads(out)
    assert info["torch"] == torch.__version__
    assert info["ops"]["swiglu"]["CPU"] is True
    assert info["cpu_isa"] in ("DEFAULT", "AVX2", "AVX512")
    text = subprocess.run(
        [sys.executable, "-m", "stackwise.info"], capture_output=True, text=True, check=True
    ).stdout
    assert "swiglu" in text and "CUDA kernels" in text


def test_cpu_isa_follows_aten_cpu_capability():
    code = "import stackwise; print(stackwise._C.cpu_isa())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**__import__("os").environ, "ATEN_CPU_CAPABILITY": "default"},
    ).stdout.strip()
    assert out == "DEFAULT"


def test_default_isa_kernel_matches_vector_kernel():
    # The DEFAULT build (what a machine without AVX2 runs) must agree with the one in use here.
    code = (
        "import torch, stackwise\n"
        "g = torch.linspace(-20, 20, 1031, dtype=torch.bfloat16)\n"
        "u = torch.linspace(3, -3, 1031, dtype=torch.bfloat16)\n"
        "print(stackwise.ops.swiglu(g, u).float().tolist())\n"
    )
    env = dict(__import__("os").environ)
    outs = []
    for cap in ("default", None):
        if cap:
            env["ATEN_CPU_CAPABILITY"] = cap
        else:
            env.pop("ATEN_CPU_CAPABILITY", None)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr
        outs.append(torch.tensor(json.loads(res.stdout)))
    torch.testing.assert_close(outs[0], outs[1], rtol=8e-3, atol=1e-5)


def test_crc32c_binding():
    assert stackwise._C.crc32c(b"123456789") == 0xE3069283
    assert stackwise._C.crc32c(b"") == 0
    data = bytes(range(256)) * 40
    assert stackwise._C.crc32c(data[100:], stackwise._C.crc32c(data[:100])) == stackwise._C.crc32c(
        data
    )
    assert stackwise._C.crc32c(memoryview(bytearray(data))) == stackwise._C.crc32c(data)
    # Not CRC-32 (zlib's polynomial): a different checksum on the same bytes.
    assert stackwise._C.crc32c(data) != zlib.crc32(data)


def test_crc32c_rejects_non_contiguous_buffer():
    import numpy as np

    arr = np.arange(64, dtype=np.uint8)[::2]
    with pytest.raises((BufferError, ValueError), match="contiguous"):
        stackwise._C.crc32c(arr)
