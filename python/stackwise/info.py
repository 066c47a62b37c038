"""``python -m stackwise.info``: what this installation is and can do.

Prints versions, the native build record, the CPU kernel ISA in use, every ``torch.ops.stackwise``
op with whether it has CPU and CUDA kernels, and the visible GPUs. ``--json`` prints the same as
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Any

import torch

import stackwise


def op_kernels() -> dict[str, dict[str, bool]]:
    """``{"swiglu": {"CPU": True, "CUDA": True}, ...}`` for every registered stackwise op."""
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("stackwise::"))
    table: dict[str, dict[str, bool]] = {}
    for name in names:
        table[name.split("::", 1)[1]] = {
            key: bool(torch._C._dispatch_has_kernel_for_dispatch_key(name, key))
            for key in ("CPU", "CUDA")
        }
    return table


def collect_info() -> dict[str, Any]:
    """Everything ``stackwise info`` reports, as plain data."""
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(
                {
                    "index": i,
                    "name": p.name,
                    "capability": f"{p.major}.{p.minor}",
                    "memory_gib": round(p.total_memory / 2**30, 1),
                }
            )
    return {
        "stackwise_version": stackwise.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "build": dict(stackwise._C.build_info()),
        "cpu_isa": stackwise._C.cpu_isa(),
        "cpu_threads": torch.get_num_threads(),
        "ops": op_kernels(),
        "gpus": gpus,
    }


def format_info(info: dict[str, Any]) -> str:
    """Human-readable form of :func:`collect_info`."""
    b = info["build"]
    if b["cuda_built"]:
        cuda_line = f"built for {b['cuda_archs']} with {b['cuda_compiler']}"
    else:
        cuda_line = f"not built ({b['cuda_off_reason']})"
    lines = [
        f"stackwise {info['stackwise_version']}",
        f"  python            {info['python']}",
        f"  torch             {info['torch']} (CUDA {info['torch_cuda'] or 'none'})",
        f"  built against     torch {b['torch_version']}, {b['cxx_compiler']}, "
        f"C++{b['cxx_standard']}, {b['build_type']}",
        f"  CUDA kernels      {cuda_line}",
        f"  CPU kernels       {b['cpu_capabilities']} built; {info['cpu_isa']} in use, "
        f"{info['cpu_threads']} threads",
    ]
    if info["gpus"]:
        for g in info["gpus"]:
            lines.append(
                f"  GPU {g['index']}             {g['name']} (sm {g['capability']}, "
                f"{g['memory_gib']} GiB)"
            )
    else:
        lines.append("  GPU               none visible")
    lines.append("  ops               CPU  CUDA")
    for name, keys in info["ops"].items():
        cpu = "yes" if keys["CPU"] else "no"
        cuda = "yes" if keys["CUDA"] else "no"
        lines.append(f"    {name:<22}{cpu:<5}{cuda}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stackwise.info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    info = collect_info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
