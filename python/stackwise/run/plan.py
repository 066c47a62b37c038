"""The memory planner behind ``stackwise plan``: what each stage of a progressive run holds on the
accelerator, computed without allocating a byte of it.

    plan = plan_memory(config, device_memory=80 * 2**30)
    print(plan.table())           # one row per stage: weights, gradients, optimizer, activations
    plan.stages[-1].fits          # whether the last (largest) stage fits in 80 GiB

The rack is built the way the progressive trainer builds it (:class:`ProgressiveRackBuilder`:
one stack added per stage, the others frozen and converted to their trunk precision with
``freeze_stack``), but on the meta device: every weight has its real shape and dtype and no
storage, so a 70B-shaped rack plans in seconds on a laptop. The forward passes run on fake CPU
tensors (:class:`torch._subclasses.fake_tensor.FakeTensorMode`), where autocast applies.

Per stage it counts, in bytes:

- **frozen weights** by storage precision (fp32 / bf16 / fp16 tensors by dtype; ``nf4``, ``int8``,
  ``fp8_*`` quantized linears with their codes, scales, metadata and bias): the trunk, frozen
  embeddings and norms;
- **trainable** weights (fp32 master weights), their **gradients** (same bytes) and the
  **optimizer** state (AdamW / Adam: two moments of the parameter's dtype; SGD with momentum: one
  buffer; the per-parameter ``step`` counters, kept on the host, are not counted);
- **saved activations** of one micro-batch (``training.batch_size`` x ``training.seq_len``): the
  stage's forward pass and loss run on fake tensors under ``saved_tensors_hooks`` (under bf16 /
  fp16 autocast when the run computes in it), and every tensor autograd keeps for the backward
  pass that is not a weight is counted once per storage. The same pass gives the figure with
  per-block activation checkpointing (each trained-through block keeps only its input; one
  block's activations are live while it is recomputed). The trainer does not checkpoint
  activations today: that column says what it would save;
- the **activation cache** of the frozen trunk's boundary (stages after the first, when
  ``progressive.cache_activations``): entries of B x S x d_model at
  ``caching.storage_precision`` plus the labels and attention mask, split between host memory
  (``max_memory_mb`` / ``max_cache_size``) and spill files.

Not counted: the CUDA context and libraries (about 0.5-1 GiB), allocator fragmentation and the
transient tensors of the backward pass and optimizer step; leave that margin. The progressive
trainer moves the whole rack to the device, so the trunk's converted weights are counted there.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from stackwise.exceptions import ConfigurationError
from stackwise.model.quantized import QuantizedLinear
from stackwise.precision import PRECISIONS, canonical

GiB = 2**30
_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {p.dtype: name for name, p in PRECISIONS.items() if p.dtype is not None}


@dataclass
class StagePlan:
    """Accelerator bytes of one stage (module docstring); ``cache_*`` are host / disk bytes."""

    stage: int
    trained_blocks: int
    total_blocks: int
    frozen: dict[str, int]
    trainable: int
    gradients: int
    optimizer: int
    activations: int
    activations_checkpointed: int
    cache_entry: int = 0
    cache_entries: int | None = None
    cache_host: int = 0
    cache_disk: int = 0
    notes: list[str] = field(default_factory=list)
    fits: bool | None = None
    fits_checkpointed: bool | None = None

    @property
    def weights(self) -> int:
        return sum(self.frozen.values()) + self.trainable

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def total_checkpointed(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations_checkpointed


@dataclass
class MemoryPlan:
    """The stages of one configuration, and the device memory they were checked against."""

    stages: list[StagePlan]
    device_memory: int | None
    micro_batch: tuple[int, int]
    compute_dtype: str

    def to_dict(self) -> dict:
        return {
            "device_memory": self.device_memory,
            "micro_batch": list(self.micro_batch),
            "compute_dtype": self.compute_dtype,
            "stages": [
                {**asdict(s), "total": s.total, "total_checkpointed": s.total_checkpointed}
                for s in self.stages
            ],
        }

    def table(self) -> str:
        """A plain-text table, one row per stage, sizes in GiB."""
        from stackwise.run.plan_format import format_plan

        return format_plan(self)


def compute_dtype_name(training, device_type: str | None = None) -> str:
    """The precision the forward pass computes in on ``device_type`` (default: the run's,
    ``training.device``, with ``auto`` taken as the accelerator the plan is for):
    ``training.autocast: true`` is bf16, else ``training.dtype`` (fp32, bf16 or fp16; ``auto``
    is bf16 on CUDA and fp32 on the CPU)."""
    if device_type is None:
        device_type = "cpu" if training.device == "cpu" else "cuda"
    if training.dtype == "auto":
        name = "bf16" if device_type == "cuda" else "fp32"
    else:
        name = canonical(training.dtype, tuple(_AUTOCAST), key="training.dtype")
    if training.autocast:
        if name == "fp16":
            raise ConfigurationError(
                "training.autocast is shorthand for training.dtype: bf16; it contradicts 'fp16'",
                "training.autocast",
            )
        return "bf16"
    return name


def gpu_compute_dtype(training) -> torch.dtype:
    """The dtype activations reach the attention op in on a GPU (float32 without autocast)."""
    return _AUTOCAST[compute_dtype_name(training, "cuda")] or torch.float32


def trunk_precision(training) -> str:
    """What a frozen trunk stack is converted to (``quantization_type`` when enabled)."""
    if not training.quantization_enabled:
        return "fp32"
    return canonical(training.quantization_type)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _weight_bytes(rack: nn.Module) -> tuple[dict[str, int], int, list[Tensor]]:
    """(frozen bytes by precision, trainable bytes, trainable parameters), shared tensors once."""
    frozen: dict[str, int] = defaultdict(int)
    seen: set[int] = set()
    trainable: list[Tensor] = []
    for module in rack.modules():
        own = list(module.named_parameters(recurse=False)) + list(
            module.named_buffers(recurse=False)
        )
        for _, t in own:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            if isinstance(t, nn.Parameter) and t.requires_grad:
                trainable.append(t)
            elif isinstance(module, QuantizedLinear):
                frozen[module.precision] += _nbytes(t)
            else:
                frozen[_DTYPE_NAMES.get(t.dtype, str(t.dtype).replace("torch.", ""))] += _nbytes(t)
    return dict(frozen), sum(_nbytes(p) for p in trainable), trainable


def _optimizer_bytes(optimizer_cfg, trainable: list[Tensor]) -> int:
    name = optimizer_cfg.name
    if name in ("adamw", "adam"):
        return 2 * sum(_nbytes(p) for p in trainable)
    if name == "sgd":
        return sum(_nbytes(p) for p in trainable) if optimizer_cfg.momentum else 0
    raise ConfigurationError(f"the planner does not know optimizer {name!r}", "optimizer.name")


def plan_memory(
    config, device_memory: int | None = None, end_to_end: bool = False, first_stage: int = 0
) -> MemoryPlan:
    """Plan every stage of ``config``'s progressive run (``progressive.target_stacks`` stages);
    ``device_memory`` in bytes, None to skip the fit check. ``end_to_end``: one stage training
    the whole rack at once instead (the baseline). ``first_stage``: the stages before it are not
    trained (a pretrained trunk of that many stacks, ``training.init_from``) and not listed."""
    from stackwise.run.plan_stages import end_to_end_state, stage_states

    t = config.training
    dtype_name = compute_dtype_name(t)
    stages: list[StagePlan] = []
    with torch.device("meta"):
        states = [end_to_end_state(config)] if end_to_end else stage_states(config)
        for state in states:
            if state.stage < first_stage:
                continue
            frozen, trainable_bytes, trainable = _weight_bytes(state.rack)
            acts, acts_ckpt = state.activations(_AUTOCAST[dtype_name])
            plan = StagePlan(
                stage=state.stage,
                trained_blocks=state.trained_blocks,
                total_blocks=state.total_blocks,
                frozen=frozen,
                trainable=trainable_bytes,
                gradients=trainable_bytes,
                optimizer=_optimizer_bytes(t.optimizer, trainable),
                activations=acts,
                activations_checkpointed=acts_ckpt,
            )
            _cache_footprint(config, state, plan)
            if device_memory is not None:
                plan.fits = plan.total <= device_memory
                plan.fits_checkpointed = plan.total_checkpointed <= device_memory
            stages.append(plan)
    return MemoryPlan(stages, device_memory, (t.batch_size, t.seq_len), dtype_name)


def _cache_footprint(config, state, plan: StagePlan) -> None:
    """Host / disk bytes of the stage's activation cache (module docstring)."""
    if not state.uses_cache:
        return
    t, c = config.training, config.training.caching
    b, s, d = t.batch_size, t.seq_len, config.model.d_model
    storage = canonical(c.storage_precision)
    elem = 4 if storage == "as_is" else PRECISIONS[storage].dtype.itemsize
    scales = 4 * b * s if storage in ("int8", "fp8_e4m3") else 0
    plan.cache_entry = b * s * d * elem + scales + 2 * b * s * 8  # + labels and mask (int64)
    steps = state.steps
    if steps is None:
        plan.notes.append("cache entries depend on the data (epochs_per_stack): per entry only")
        return
    plan.cache_entries = steps * t.optimizer.grad_accumulation
    total = plan.cache_entries * plan.cache_entry
    host_cap = min(c.max_memory_mb * 2**20, c.max_cache_size * plan.cache_entry)
    plan.cache_host = min(total, host_cap)
    plan.cache_disk = total - plan.cache_host
    if plan.cache_disk and not c.spill_dir:
        plan.notes.append(
            f"the cache needs {plan.cache_disk / GiB:.1f} GiB beyond caching.max_memory_mb / "
            "max_cache_size and caching.spill_dir is not set: storing would fail"
        )


def plan_run(config, device_memory: int | None = None, end_to_end: bool = False) -> MemoryPlan:
    """:func:`plan_memory` for ``config`` as ``stackwise train`` would run it: with
    ``training.init_from``, the model section follows the pretrained model and its stacks are the
    trunk (their stages are not planned)."""
    from stackwise.model.hf_init import apply_init_from

    pretrained = apply_init_from(config)
    first = len(pretrained.rack.stacks) if pretrained is not None and not end_to_end else 0
    return plan_memory(config, device_memory, end_to_end=end_to_end, first_stage=first)


def parse_bytes(text: str) -> int:
    """``80GB``, ``80GiB``, ``141G``, ``512MB`` or a plain number of bytes -> bytes (GB and G
    mean GiB here, as GPU memory is quoted)."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = s[-1:] if s[-1:] in units and s[-1:] else ""
    number = s[: len(s) - len(unit)] if unit else s
    try:
        value = float(number)
    except ValueError:
        raise ConfigurationError(
            f"{text!r} is not a memory size (e.g. 80GB, 141GiB, 512MB)", "--device-memory"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigurationError(f"{text!r} must be a positive size", "--device-memory")
    return int(value * units[unit])


__all__ = [
    "GiB",
    "MemoryPlan",
    "StagePlan",
    "compute_dtype_name",
    "gpu_compute_dtype",
    "parse_bytes",
    "plan_memory",
    "plan_run",
]
