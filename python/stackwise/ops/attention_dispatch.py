"""Which CUDA attention kernel serves which inputs: the Python mirror of
``cpp/include/stackwise/attention_dispatch.h``, the host-side dispatch of ``cuda/attention.cu``.

    cuda_unsupported_reason(torch.bfloat16, 128, 128)   # None: a kernel serves it
    cuda_unsupported_reason(torch.float32, 32, 32)      # "the CUDA kernel takes bfloat16 ..."

The CUDA kernel is one template over (element type, Dqk, Dv), instantiated for exactly the pairs
of :data:`CUDA_HEAD_DIMS` (the C++ table; a test reads the header and checks the two agree), for
bfloat16 and float16 inputs with float32 accumulation. Anything else raises
``NotImplementedError`` on CUDA with the reason given here. Float32 models reach the kernel
through bf16 autocast (``training.dtype``). Callable without a GPU or a CUDA build.
"""

from __future__ import annotations

import torch

# (Dqk, Dv) pairs with a CUDA instantiation; (192, 128) is MLA's 128 content + 64 rotary dims.
CUDA_HEAD_DIMS: tuple[tuple[int, int], ...] = (
    (32, 32),
    (64, 64),
    (96, 96),
    (128, 128),
    (192, 128),
    (256, 256),
)
CUDA_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)


def cuda_head_dims_index(dqk: int, dv: int) -> int:
    """The index of ``(dqk, dv)`` in :data:`CUDA_HEAD_DIMS`, or -1 when no kernel serves it."""
    try:
        return CUDA_HEAD_DIMS.index((int(dqk), int(dv)))
    except ValueError:
        return -1


def cuda_unsupported_reason(dtype: torch.dtype, dqk: int, dv: int) -> str | None:
    """Why the CUDA attention kernel cannot serve q/k/v of ``dtype`` with head dims
    ``(dqk, dv)``, or None when it can (the same decision as the C++ dispatch)."""
    if dtype not in CUDA_DTYPES:
        return (
            "the CUDA kernel takes bfloat16 or float16 q, k, v (fp32 accumulation); run float32 "
            "models under bf16/fp16 autocast (training.dtype) or on the CPU"
        )
    if cuda_head_dims_index(dqk, dv) < 0:
        pairs = ", ".join(f"({a}, {b})" for a, b in CUDA_HEAD_DIMS)
        return f"the CUDA kernel supports head dims (Dqk, Dv) = {pairs}"
    return None


__all__ = ["CUDA_DTYPES", "CUDA_HEAD_DIMS", "cuda_head_dims_index", "cuda_unsupported_reason"]
