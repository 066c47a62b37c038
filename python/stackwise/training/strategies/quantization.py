"""``QuantizationManager``: converts a model's linear layers to a storage precision, reports its
memory footprint and restores it from a backup.

    quant_manager = QuantizationManager(precision="fp16", enable_qlora=True)
    quantized_model = quant_manager.convert_to_precision(model, "fp16")

Precisions: "full"/"fp32" (float32 nn.Linear), "half"/"fp16", "bf16", "int8", "nf4",
"fp8"/"fp8_e4m3", "fp8_e5m2". Anything but full precision replaces each ``nn.Linear`` with a
frozen :class:`~stackwise.model.quantized.QuantizedLinear`. A module that defines
``convert_precision(precision: str, manager: QuantizationManager) -> nn.Module | None`` is asked
to convert itself instead (returning a replacement, or None after converting in place).
Norms and embeddings are cast to ``other_precision`` (default fp32).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from stackwise import precision as _precision
from stackwise.exceptions import QuantizationError
from stackwise.model.quantized import QuantizedLinear

_CAST = {name: _precision.dtype_of(name) for name in _precision.FLOAT}
_NORM_TYPES = (nn.LayerNorm, nn.Embedding, nn.GroupNorm, nn.BatchNorm1d)


def canonical_precision(precision: str) -> str:
    """The canonical name of a precision a model can be converted to (the vocabulary of
    :mod:`stackwise.precision`), or QuantizationError naming the unknown one."""
    return _precision.canonical(precision, _precision.TRUNK_STORAGE, error=QuantizationError)


class QuantizationManager:
    """Converts models between storage precisions.

    Args:
        precision: default target of :meth:`convert_to_precision`.
        enable_qlora: whether QLoRA adapters (NF4 base) are the intended use; recorded for the
            trainers, and the default precision of adapters' base layers.
        block_size: NF4 block size.
        other_precision: precision of norms and embeddings ("fp32", "fp16" or "bf16").
        keep_backup: keep a CPU copy of each converted layer so :meth:`restore` can undo.
        skip_modules: qualified module names (or name suffixes) left untouched.
        double_quant: NF4 layers also quantize their absmax values (QLoRA double quantization).
    """

    def __init__(
        self,
        precision: str = "fp16",
        enable_qlora: bool = True,
        block_size: int = 64,
        other_precision: str = "fp32",
        keep_backup: bool = True,
        skip_modules: tuple[str, ...] | list[str] = (),
        double_quant: bool = False,
    ) -> None:
        self.double_quant = bool(double_quant)
        self.precision = canonical_precision(precision)
        self.enable_qlora = bool(enable_qlora)
        self.block_size = block_size
        self.other_precision = canonical_precision(other_precision)
        if self.other_precision not in _CAST:
            raise QuantizationError(
                f"other_precision must be fp32, fp16 or bf16, got {other_precision!r}"
            )
        self.keep_backup = keep_backup
        self.skip_modules = tuple(skip_modules)
        self._backups: dict[int, dict[str, nn.Module]] = {}

    def _skipped(self, name: str) -> bool:
        return any(name == s or name.endswith("." + s) for s in self.skip_modules)

    def convert_to_precision(self, model: nn.Module, precision: str | None = None) -> nn.Module:
        """Convert ``model``'s linear layers in place to ``precision`` and return ``model``."""
        target = canonical_precision(precision or self.precision)
        backups = self._backups.setdefault(id(model), {})
        for name, module in list(model.named_modules()):
            if not name or self._skipped(name):
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if hasattr(module, "convert_precision") and not isinstance(module, QuantizedLinear):
                replacement = module.convert_precision(target, self)
                if replacement is not None:
                    setattr(parent, attr, replacement)
                continue
            if isinstance(module, (nn.Linear, QuantizedLinear)):
                linear = module if isinstance(module, nn.Linear) else self._to_linear(module)
                if self.keep_backup and name not in backups:
                    backups[name] = copy.deepcopy(linear).cpu()
                setattr(parent, attr, self._convert_linear(linear, target, name))
            elif isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower():
                module.to(_CAST[self.other_precision])
        return model

    def _convert_linear(self, linear: nn.Linear, target: str, name: str) -> nn.Module:
        if target == "fp32":
            return linear.float()
        try:
            return QuantizedLinear.from_linear(
                linear,
                target,
                self.block_size,
                name=name,
                double_quant=self.double_quant and target == "nf4",
            )
        except QuantizationError as exc:
            raise QuantizationError(f"layer {name}: {exc}") from exc

    @staticmethod
    def _to_linear(qlinear: QuantizedLinear) -> nn.Linear:
        lin = nn.Linear(qlinear.in_features, qlinear.out_features, bias=qlinear.bias is not None)
        lin = lin.to(qlinear.qweight.device)
        with torch.no_grad():
            lin.weight.copy_(qlinear.dequantize(torch.float32))
            if qlinear.bias is not None:
                lin.bias.copy_(qlinear.bias)
        return lin

    def restore(self, model: nn.Module) -> nn.Module:
        """Put back the full-precision layers saved by :meth:`convert_to_precision`."""
        backups = self._backups.get(id(model))
        if not backups:
            raise QuantizationError("restore: no backup of this model (keep_backup=False?)")
        for name, original in backups.items():
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            current = getattr(parent, attr)
            device = next(iter(current.buffers()), next(iter(current.parameters()), None))
            restored = copy.deepcopy(original)
            if device is not None:
                restored = restored.to(device.device)
            setattr(parent, attr, restored)
        del self._backups[id(model)]
        return model

    @staticmethod
    def memory_footprint(model: nn.Module) -> int:
        """Bytes held by the model's parameters and buffers (shared tensors counted once)."""
        seen: set[int] = set()
        total = 0
        for t in list(model.parameters()) + list(model.buffers()):
            key = t.untyped_storage().data_ptr()
            if key in seen and key != 0:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
        return total
