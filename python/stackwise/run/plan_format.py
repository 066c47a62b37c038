"""Text rendering of a :class:`~stackwise.run.plan.MemoryPlan` (``stackwise plan``): one row per
stage, sizes in GiB, and the lines that explain the columns."""

from __future__ import annotations

GiB = 2**30


def _frozen(frozen: dict[str, int], _g) -> str:
    parts = [f"{name} {_g(n)}" for name, n in sorted(frozen.items(), key=lambda kv: -kv[1]) if n]
    return " + ".join(parts) or "0"


def _fits(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "NO")


def format_plan(plan) -> str:
    small = all(st.total < GiB for st in plan.stages)  # MiB for small racks
    unit, unit_name = (2**20, "MiB") if small else (GiB, "GiB")

    def _g(n: int) -> str:
        return f"{n / unit:.2f}"

    b, s = plan.micro_batch
    head = (
        f"micro-batch {b} x {s} tokens, compute {plan.compute_dtype}"
        + (f", device memory {plan.device_memory / GiB:.2f} GiB" if plan.device_memory else "")
        + f"; sizes in {unit_name}"
    )
    cols = (
        "stage",
        "blocks",
        "frozen weights",
        "trainable",
        "grads",
        "optim",
        "acts",
        "acts ckpt",
        "total",
        "total ckpt",
        "fits",
        "fits ckpt",
        "cache host",
        "cache disk",
    )
    rows = []
    for st in plan.stages:
        rows.append(
            (
                str(st.stage),
                f"{st.trained_blocks}/{st.total_blocks}",
                _frozen(st.frozen, _g),
                _g(st.trainable),
                _g(st.gradients),
                _g(st.optimizer),
                _g(st.activations),
                _g(st.activations_checkpointed),
                _g(st.total),
                _g(st.total_checkpointed),
                _fits(st.fits),
                _fits(st.fits_checkpointed),
                _g(st.cache_host) if st.cache_entry else "-",
                _g(st.cache_disk) if st.cache_entry else "-",
            )
        )
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    lines = [head, "  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    notes = sorted({n for st in plan.stages for n in st.notes})
    lines += [
        "blocks: trained / in the rack. total = weights + grads + optim + acts (one micro-batch);",
        "ckpt: with per-block activation checkpointing (not a training option yet). Not counted:",
        "CUDA context, allocator fragmentation, backward/optimizer temporaries.",
        *[f"note: {n}" for n in notes],
    ]
    return "\n".join(lines) + "\n"
