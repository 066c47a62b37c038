"""LoRA adapters over frozen, quantized layers (QLoRA: Dettmers et al. 2023; LoRA: Hu et al.
2021), as used for the frozen trunk of a progressively trained rack.

    adapter = QLoRAAdapter(original_layer=layer, rank=16, alpha=32.0, dropout=0.1)
    output = adapter(input_tensor)

output = base(x) + dropout(x) · Aᵀ · Bᵀ · (alpha / rank), with A [rank, in] Kaiming-uniform and
B [out, rank] zeros, so a new adapter changes nothing until it is trained. The base layer is
frozen and, by default, stored in NF4.

:func:`save_peft_adapters` writes a model's adapters in the PEFT layout
(``adapter_model.safetensors`` + ``adapter_config.json``); :func:`load_peft_adapters` reads it.

:func:`wrap_linears`, :func:`merge_adapters` and :func:`adapter_parameters` put adapters on a
module's linear layers, fold full-precision ones back in, and collect their trainable tensors;
the rack builder and the fusion trainer share them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stackwise._io import atomic_write_bytes
from stackwise.exceptions import QuantizationError
from stackwise.model.quantized import QuantizedLinear


class QLoRAAdapter(nn.Module):
    """A trainable low-rank update on a frozen (quantized) linear layer.

    Args:
        original_layer: an ``nn.Linear`` or :class:`QuantizedLinear`.
        rank: LoRA rank r > 0.
        alpha: scaling numerator; the update is scaled by ``alpha / rank``.
        dropout: dropout probability on the adapter's input.
        quantization: storage of an ``nn.Linear`` base: ``"nf4"`` (default), ``"int8"``,
            ``"fp8_e4m3"``, ``"fp8_e5m2"``, ``"fp16"``, ``"bf16"``, or ``None`` to keep it as given.
        block_size: NF4 block size for the base.
        double_quant: NF4 base only: QLoRA's double quantization of the absmax values.
    """

    def __init__(
        self,
        original_layer: nn.Module,
        rank: int = 16,
        alpha: float = 32.0,
        dropout: float = 0.1,
        quantization: str | None = "nf4",
        block_size: int = 64,
        double_quant: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(original_layer, (nn.Linear, QuantizedLinear)):
            raise QuantizationError(
                f"QLoRAAdapter: original_layer must be nn.Linear or QuantizedLinear, got "
                f"{type(original_layer).__name__}"
            )
        if not isinstance(rank, int) or rank <= 0:
            raise QuantizationError(f"QLoRAAdapter: rank must be a positive int, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise QuantizationError(f"QLoRAAdapter: dropout must be in [0, 1), got {dropout!r}")
        base = original_layer
        if isinstance(base, nn.Linear) and quantization is not None:
            base = QuantizedLinear.from_linear(
                base, quantization, block_size, double_quant=double_quant
            )
        self.base_layer = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        self.dropout_p = dropout
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = next(iter(base.buffers()), next(iter(base.parameters()), None))
        device = device.device if device is not None else None
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        # nn.Linear's (and PEFT's) default initialisation for A.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self._merged_from: QuantizedLinear | None = None
        self._merged_delta: Tensor | None = None
        self.freeze_original_layer()

    def freeze_original_layer(self) -> None:
        """No gradient reaches the base layer's parameters."""
        for p in self.base_layer.parameters():
            p.requires_grad_(False)

    def get_adaptation_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters: ``[lora_A, lora_B]``."""
        return [self.lora_A, self.lora_B]

    @property
    def merged(self) -> bool:
        return self._merged_delta is not None

    def delta_weight(self) -> Tensor:
        """``B · A · alpha / rank``, ``[out, in]``."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        a = self.lora_A.to(x.dtype)
        b = self.lora_B.to(x.dtype)
        return out + (self.lora_dropout(x) @ a.t() @ b.t()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight. A quantized base becomes a full-precision
        ``nn.Linear`` holding dequant(W) + BA·s, and its packed form is kept so :meth:`unmerge`
        restores it bit for bit."""
        if self.merged:
            return
        delta = self.delta_weight().detach().float()
        if isinstance(self.base_layer, QuantizedLinear):
            q = self.base_layer
            lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
            lin = lin.to(delta.device)
            lin.weight.copy_(q.dequantize(torch.float32) + delta)
            if q.bias is not None:
                lin.bias.copy_(q.bias)
            lin.requires_grad_(False)
            self._merged_from = q
            self.base_layer = lin
        else:
            self.base_layer.weight.add_(delta.to(self.base_layer.weight.dtype))
        self._merged_delta = delta

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`."""
        if not self.merged:
            return
        if self._merged_from is not None:
            self.base_layer = self._merged_from
            self._merged_from = None
        else:
            self.base_layer.weight.sub_(self._merged_delta.to(self.base_layer.weight.dtype))
        self._merged_delta = None

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, dropout={self.dropout_p}"


def _adapters(model: nn.Module) -> list[tuple[str, QLoRAAdapter]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QLoRAAdapter)]


def save_peft_adapters(
    model: nn.Module, directory: str | os.PathLike[str], base_model_name_or_path: str | None = None
) -> Path:
    """Write every :class:`QLoRAAdapter` of ``model`` in the PEFT LoRA layout.

    Keys are ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``; all adapters
    must share rank, alpha and dropout (one PEFT config). Returns the directory.
    """
    from safetensors.torch import save as st_save

    adapters = _adapters(model)
    if not adapters:
        raise QuantizationError("save_peft_adapters: the model has no QLoRAAdapter")
    ranks = {(a.rank, a.alpha, a.dropout_p) for _, a in adapters}
    if len(ranks) != 1:
        raise QuantizationError(
            f"save_peft_adapters: adapters differ in (rank, alpha, dropout): {sorted(ranks)}"
        )
    rank, alpha, dropout = ranks.pop()
    tensors = {}
    for name, a in adapters:
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.lora_A.detach().float().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = a.lora_B.detach().float().cpu()
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name, _ in adapters}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "adapter_model.safetensors", st_save(tensors))
    atomic_write_bytes(out / "adapter_config.json", json.dumps(config, indent=2).encode())
    return out


def load_peft_adapters(model: nn.Module, directory: str | os.PathLike[str]) -> None:
    """Load adapter weights saved by :func:`save_peft_adapters` (or PEFT) into ``model``."""
    from safetensors.torch import load_file

    path = Path(directory)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    adapters = dict(_adapters(model))
    for name, adapter in adapters.items():
        for part in ("lora_A", "lora_B"):
            key = f"base_model.model.{name}.{part}.weight"
            if key not in tensors:
                raise QuantizationError(f"load_peft_adapters: {path} has no tensor {key}")
            param = getattr(adapter, part)
            if tuple(tensors[key].shape) != tuple(param.shape):
                raise QuantizationError(
                    f"load_peft_adapters: {key} has shape {tuple(tensors[key].shape)}, "
                    f"the adapter expects {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(tensors[key])


def _linear_children(module: nn.Module, skip_up_proj: bool) -> list[tuple[nn.Module, str, Any]]:
    """``(parent, attribute, layer)`` of each nn.Linear / QuantizedLinear not yet adapted."""
    out = []
    for name, child in list(module.named_modules()):
        if not isinstance(child, (nn.Linear, QuantizedLinear)):
            continue
        if skip_up_proj and name.endswith("up_proj"):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        if not isinstance(parent, QLoRAAdapter):
            out.append((parent, attr, child))
    return out


def wrap_linears(
    module: nn.Module,
    rank: int,
    alpha: float,
    dropout: float,
    quantization: str | None,
    skip_up_proj: bool = False,
) -> None:
    """Put a :class:`QLoRAAdapter` (base stored as ``quantization``) around every linear layer
    of ``module`` that has none yet; ``skip_up_proj`` leaves a fixed FFN up-projection alone."""
    for parent, attr, linear in _linear_children(module, skip_up_proj):
        adapter = QLoRAAdapter(
            linear, rank=rank, alpha=alpha, dropout=dropout, quantization=quantization
        )
        setattr(parent, attr, adapter)


@torch.no_grad()
def merge_adapters(module: nn.Module) -> None:
    """Fold every adapter over a full-precision ``nn.Linear`` into its layer and unwrap it
    (adapters over quantized layers stay)."""
    for name, m in list(module.named_modules()):
        if isinstance(m, QLoRAAdapter) and isinstance(m.base_layer, nn.Linear):
            m.merge()
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, m.base_layer)


def adapter_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA tensors of every adapter in ``module``."""
    return [
        p
        for m in module.modules()
        if isinstance(m, QLoRAAdapter)
        for p in m.get_adaptation_parameters()
    ]
