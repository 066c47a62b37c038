"""Import Llama-family models from Hugging Face folders and GGUF files into a :class:`Rack`.

    from stackwise.model.hf import load_pretrained
    model = load_pretrained("path/to/SmolLM2")             # config.json + *.safetensors
    model = load_pretrained("model.Q4_1.gguf", blocks_per_stack=2)
    logits = model.rack(ids)                               # matches transformers' logits
    tokenizer = model.tokenizer                            # from tokenizer.json / the GGUF file

A Llama block is a stackwise block: pre-norm RMSNorm, grouped-query attention with rotate_half
RoPE on q/k (the same layout as stackwise's rope op, so q/k weights are copied as they are),
SwiGLU. Every config field that changes the math is honoured (``rope_theta``, ``rms_norm_eps``,
``head_dim``, ``num_key_value_heads``, ``tie_word_embeddings``, ``max_position_embeddings``); one
that cannot be (a rope scaling type, biases, a sliding window, another activation) is a
:class:`ModelError` naming the field, never a silently different model. Nothing is downloaded:
a missing path, a folder without weights or a tensor of the wrong shape is an error naming the
file. GGUF files are read with ``gguf`` (:mod:`stackwise.model.hf_gguf`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from stackwise.exceptions import ModelError
from stackwise.model.architecture import Rack

# HF Llama tensor names (within one decoder layer) -> the stackwise block's parameter names.
LAYER_KEYS = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "mlp.gate_proj.weight": "ffn.gate_proj.weight",
    "mlp.up_proj.weight": "ffn.up_proj.weight",
    "mlp.down_proj.weight": "ffn.down_proj.weight",
}
EMBED_KEY, NORM_KEY, HEAD_KEY = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass
class PretrainedModel:
    """An imported model: the rack (float32, eval mode), its tokenizer and where it came from."""

    rack: Rack
    tokenizer: Any
    source: Path
    hf_config: dict


def _field(hf: dict, name: str, source: str, default: Any = None) -> Any:
    value = hf.get(name, default)
    if value is None:
        raise ModelError(f"{source}: config field {name!r} is missing")
    return value


def _rope_theta(hf: dict, source: str) -> float:
    """rope_theta from ``rope_parameters`` (transformers >= 5) or the older top-level fields;
    any rope type but the default one is refused, naming the field."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    for name, spec in (("rope_parameters", params), ("rope_scaling", scaling)):
        if isinstance(spec, dict):
            kind = spec.get("rope_type", spec.get("type", "default"))
            if kind != "default":
                raise ModelError(
                    f"{source}: {name}.rope_type {kind!r} is not implemented (stackwise's RoPE "
                    f"is the default, unscaled rotation)"
                )
        elif spec is not None:
            raise ModelError(f"{source}: {name} {spec!r} is not understood")
    theta = (params or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta)


def model_config_from_hf(
    hf: dict, source: str = "config.json", blocks_per_stack: int | None = None
):
    """A stackwise :class:`ModelConfig` equivalent to the HF Llama config ``hf`` (a dict)."""
    from stackwise.config.base import ArchitectureConfig, ModelConfig, TokenizerEmbeddingConfig

    model_type = hf.get("model_type")
    if model_type != "llama":
        raise ModelError(
            f"{source}: model_type {model_type!r} is not supported; only Llama-family "
            "('llama') models can be imported"
        )
    refused = {
        "attention_bias": "biases on the attention projections",
        "mlp_bias": "biases on the MLP projections",
    }
    for name, what in refused.items():
        if hf.get(name):
            raise ModelError(f"{source}: {name}=true ({what}) is not supported")
    if hf.get("sliding_window") is not None or hf.get("use_sliding_window"):
        raise ModelError(f"{source}: sliding_window attention is not supported")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ModelError(f"{source}: hidden_act {act!r} is not supported (stackwise uses SwiGLU)")
    if float(hf.get("attention_dropout") or 0.0) != 0.0:
        raise ModelError(f"{source}: attention_dropout != 0 is not supported")
    n_layers = int(_field(hf, "num_hidden_layers", source))
    d_model = int(_field(hf, "hidden_size", source))
    n_heads = int(_field(hf, "num_attention_heads", source))
    n_kv = int(hf.get("num_key_value_heads") or n_heads)
    head_dim = hf.get("head_dim")
    head_dim = int(head_dim) if head_dim else d_model // n_heads
    bps = blocks_per_stack or n_layers
    if bps < 1 or n_layers % bps:
        raise ModelError(
            f"{source}: blocks_per_stack {bps} does not divide num_hidden_layers {n_layers}"
        )
    vocab = int(_field(hf, "vocab_size", source))
    return ModelConfig(
        vocab_size=vocab,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        d_ff=int(_field(hf, "intermediate_size", source)),
        attention_type="gqa",
        attention_mode="causal",
        use_rope=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        architecture=ArchitectureConfig(n_stacks=n_layers // bps, blocks_per_stack=bps),
        rope_theta=_rope_theta(hf, source),
        max_seq_len=int(_field(hf, "max_position_embeddings", source)),
        norm="rmsnorm",
        norm_eps=float(_field(hf, "rms_norm_eps", source)),
        head_dim=None if head_dim * n_heads == d_model else head_dim,
        tokenizer_embedding=TokenizerEmbeddingConfig(
            family="llama", embedding_option="learned", freeze_embeddings=False
        ),
    )


def rack_key(hf_key: str, blocks_per_stack: int) -> str | None:
    """The rack's state-dict key of the HF tensor ``hf_key`` (None for ignored buffers)."""
    if hf_key == EMBED_KEY:
        return "lexical.embeddings.table.weight"
    if hf_key == NORM_KEY:
        return "final_norm.weight"
    if hf_key == HEAD_KEY:
        return "lexical.lm_head.weight"
    m = _LAYER_RE.match(hf_key)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        if rest.endswith("rotary_emb.inv_freq"):
            return None
        if rest in LAYER_KEYS:
            s, b = divmod(layer, blocks_per_stack)
            return f"stacks.{s}.blocks.{b}.{LAYER_KEYS[rest]}"
    if hf_key.endswith(".bias"):
        raise ModelError(f"tensor {hf_key}: biases are not supported")
    raise ModelError(f"tensor {hf_key} has no place in a Llama rack")


def rack_from_tensors(cfg, tensors: dict[str, Tensor], where: dict[str, str]) -> Rack:
    """Build the rack of ``cfg`` and fill it from HF-named ``tensors``; ``where[key]`` names the
    file each tensor came from (for errors)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        rack = Rack.from_config(cfg)
    target = rack.state_dict()
    bps = cfg.architecture.blocks_per_stack
    state: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if cfg.tie_embeddings and key == HEAD_KEY:
            continue  # a tied checkpoint may store the head too; the table is the head
        try:
            name = rack_key(key, bps)
        except ModelError as exc:
            raise ModelError(f"{where.get(key, '?')}: {exc}") from None
        if name is None:
            continue
        if name not in target:
            raise ModelError(f"{where.get(key, '?')}: tensor {key} does not fit the config")
        if tuple(value.shape) != tuple(target[name].shape):
            raise ModelError(
                f"{where.get(key, '?')}: tensor {key} has shape {tuple(value.shape)}, the config "
                f"implies {tuple(target[name].shape)}"
            )
        state[name] = value.float()
    missing = sorted(set(target) - set(state))
    if missing:
        raise ModelError(f"{sorted(set(where.values()))}: no tensor for {missing[:5]}")
    rack.load_state_dict(state)
    return rack.eval()


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as exc:
            raise ModelError(f"{index} is not a safetensors index: {exc}") from None
        files = [folder / s for s in shards]
        for f in files:
            if not f.is_file():
                raise ModelError(f"{index} lists {f.name}, which is missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder} holds no *.safetensors weights (nothing is downloaded)")
    return files


def read_safetensors(folder: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every tensor of a (possibly sharded) safetensors checkpoint and the file it came from."""
    from safetensors import safe_open

    tensors: dict[str, Tensor] = {}
    where: dict[str, str] = {}
    for f in _safetensors_files(folder):
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    tensors[key] = st.get_tensor(key)
                    where[key] = str(f)
        except Exception as exc:  # safetensors raises its own error types
            raise ModelError(f"{f} is not a readable safetensors file: {exc}") from exc
    return tensors, where


def load_hf_folder(path: str | os.PathLike[str], blocks_per_stack: int | None = None):
    folder = Path(path)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{folder} has no config.json: not a Hugging Face model folder")
    try:
        hf = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise ModelError(f"{cfg_path} is not valid JSON: {exc}") from None
    cfg = model_config_from_hf(hf, str(cfg_path), blocks_per_stack)
    tensors, where = read_safetensors(folder)
    rack = rack_from_tensors(cfg, tensors, where)
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        from stackwise.data.tokenizers import HFTokenizer

        tokenizer = HFTokenizer(folder / "tokenizer.json")
    return PretrainedModel(rack, tokenizer, folder, hf)


def load_pretrained(
    path: str | os.PathLike[str], blocks_per_stack: int | None = None
) -> PretrainedModel:
    """Import a local HF Llama folder or a Llama GGUF file; the blocks are split into stacks of
    ``blocks_per_stack`` (default: one stack holding every layer)."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"pretrained model {p} does not exist (nothing is downloaded)")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ModelError(f"{p} is a file but not a .gguf file; give a folder or a GGUF file")
        from stackwise.model.hf_gguf import load_gguf

        return load_gguf(p, blocks_per_stack)
    return load_hf_folder(p, blocks_per_stack)


__all__ = [
    "PretrainedModel",
    "load_hf_folder",
    "load_pretrained",
    "model_config_from_hf",
    "rack_from_tensors",
    "read_safetensors",
]
