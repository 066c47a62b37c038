"""Where C++ headers live (docs/DESIGN.md §2, §3): ``cpp/include/stackwise/`` holds torch-free
headers only — the core and its tests build without torch, and the CUDA kernels share the math
there with the CPU tests — so no header in it may include a torch, ATen, c10 or pybind11 header,
directly or through a quoted include that leaves the folder. The ATen check headers live in
``cpp/ops/``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PUBLIC = ROOT / "cpp" / "include" / "stackwise"
HEADERS = sorted(p for p in PUBLIC.rglob("*") if p.suffix in {".h", ".hpp", ".cuh", ".inl"})

_INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.M)
_TORCH_PREFIXES = ("torch/", "ATen/", "c10/", "caffe2/", "pybind11/", "Python.h")


def torch_includes(header: Path, folder: Path = PUBLIC) -> list[str]:
    """The includes of ``header`` that bring in torch, or leave the torch-free ``folder``."""
    bad = []
    for kind, name in _INCLUDE.findall(header.read_text()):
        if name.startswith(_TORCH_PREFIXES):
            bad.append(name)
        elif kind == '"':
            # Quoted includes must name a header of this folder, as "stackwise/<name>".
            target = folder.parent / name
            if not name.startswith("stackwise/") or not target.is_file():
                bad.append(name)
    return bad


def test_the_folder_has_headers():
    assert len(HEADERS) >= 5, HEADERS


@pytest.mark.parametrize("header", HEADERS, ids=[p.name for p in HEADERS])
def test_public_header_is_torch_free(header):
    assert torch_includes(header) == [], (
        f"{header.relative_to(ROOT)} includes torch headers; ATen headers (checks) go in cpp/ops/"
    )


def test_the_check_finds_torch_includes(tmp_path):
    fake = tmp_path / "stackwise"
    fake.mkdir()
    (fake / "ok.h").write_text('#include <cstdint>\n#include "stackwise/ok.h"\n')
    (fake / "bad.h").write_text(
        '#include <ATen/core/Tensor.h>\n#  include <c10/util/Half.h>\n#include "checks.h"\n'
    )
    assert torch_includes(fake / "ok.h", fake) == []
    want = ["ATen/core/Tensor.h", "c10/util/Half.h", "checks.h"]
    assert torch_includes(fake / "bad.h", fake) == want
