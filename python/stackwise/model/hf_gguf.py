"""Import a GGUF file of a Llama-architecture model (llama.cpp's format) into a :class:`Rack`.

    from stackwise.model.hf_gguf import load_gguf
    model = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")   # PretrainedModel, float32 rack

Tensors are read and dequantized with ``gguf`` (any type it can dequantize: F32, F16, Q4_1,
Q8_0, ...), renamed from llama.cpp's names to Hugging Face's, and the q/k rows put back in
Hugging Face's rotate_half order (llama.cpp's converter interleaves each head's two halves for
its own RoPE). The metadata becomes a Hugging Face-style config, so the checks of
:func:`stackwise.model.hf.model_config_from_hf` apply unchanged. The tokenizer is rebuilt from the
file's ``tokenizer.ggml.*`` metadata by ``transformers``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from stackwise.exceptions import ModelError

# llama.cpp tensor names -> Hugging Face Llama names ("{i}": the layer).
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def _hf_name(name: str, source: Path) -> str:
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
        pattern = ".".join(["blk", "{i}", *parts[2:]])
        if pattern in GGUF_NAMES:
            return GGUF_NAMES[pattern].format(i=parts[1])
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    if name == "rope_freqs.weight":
        raise ModelError(f"{source}: rope_freqs (scaled RoPE frequencies) are not supported")
    raise ModelError(f"{source}: tensor {name} has no place in a Llama rack")


def unpermute_qk(w: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's q/k row permutation: per head, rows (r0, r_half, r1, r_half+1, ...)
    back to the rotate_half order (first half, then second half)."""
    rows = w.shape[0]
    return (
        w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    )


def permute_qk(w: Tensor, n_heads: int) -> Tensor:
    """llama.cpp's q/k row permutation (the inverse of :func:`unpermute_qk`)."""
    rows = w.shape[0]
    return (
        w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    )


def _metadata(reader, source: Path) -> dict:
    out = {}
    for key, f in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key not in ("tokenizer.ggml.model",):
            continue  # large arrays; the tokenizer is rebuilt by transformers
        try:
            out[key] = f.contents()
        except Exception as exc:  # a field gguf cannot decode
            raise ModelError(f"{source}: metadata field {key} is unreadable: {exc}") from None
    return out


def hf_config_from_gguf(meta: dict, source: Path, vocab_rows: int, tied: bool) -> dict:
    """The metadata of a ``llama`` GGUF file as a Hugging Face Llama config dict."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelError(f"{source}: general.architecture {arch!r} is not 'llama'")

    def get(key: str, default=None):
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise ModelError(f"{source}: metadata field llama.{key} is missing")
        return value

    if int(meta.get("llama.expert_count", 0) or 0) > 0:
        raise ModelError(f"{source}: llama.expert_count > 0 (mixture of experts) is not supported")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ModelError(f"{source}: llama.rope.scaling.type {scaling!r} is not implemented")
    n_heads = int(get("attention.head_count"))
    d_model = int(get("embedding_length"))
    head_dim = int(meta.get("llama.attention.key_length", d_model // n_heads))
    rope_dims = int(meta.get("llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ModelError(
            f"{source}: llama.rope.dimension_count {rope_dims} != head dim {head_dim} "
            "(partial rotary embeddings are not supported)"
        )
    return {
        "model_type": "llama",
        "vocab_size": int(meta.get("llama.vocab_size", vocab_rows)),
        "hidden_size": d_model,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length")),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
    }


def read_gguf(path: str | os.PathLike[str]) -> tuple[dict, dict[str, Tensor]]:
    """(Hugging Face config dict, Hugging Face-named float32 tensors) of a Llama GGUF file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    source = Path(path)
    try:
        reader = GGUFReader(str(source))
    except Exception as exc:  # gguf raises ValueError / struct errors on a bad file
        raise ModelError(f"{source} is not a readable GGUF file: {exc}") from None
    meta = _metadata(reader, source)
    tensors: dict[str, Tensor] = {}
    for t in reader.tensors:
        try:
            values = dequantize(t.data, t.tensor_type)
        except NotImplementedError as exc:
            raise ModelError(f"{source}: tensor {t.name}: {exc}") from None
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        tensors[_hf_name(t.name, source)] = torch.from_numpy(
            np.array(values, dtype=np.float32, copy=True).reshape(shape)
        )
    if "model.embed_tokens.weight" not in tensors:
        raise ModelError(f"{source}: no token_embd.weight tensor")
    hf = hf_config_from_gguf(
        meta, source, tensors["model.embed_tokens.weight"].shape[0], "lm_head.weight" not in tensors
    )
    for key in list(tensors):
        if key.endswith("self_attn.q_proj.weight"):
            tensors[key] = unpermute_qk(tensors[key], hf["num_attention_heads"])
        elif key.endswith("self_attn.k_proj.weight"):
            tensors[key] = unpermute_qk(tensors[key], hf["num_key_value_heads"])
    hf["_tokenizer_model"] = meta.get("tokenizer.ggml.model")
    return hf, tensors


def load_gguf(path: str | os.PathLike[str], blocks_per_stack: int | None = None):
    """A :class:`PretrainedModel` from a Llama GGUF file."""
    from stackwise.model.hf import PretrainedModel, model_config_from_hf, rack_from_tensors

    source = Path(path)
    hf, tensors = read_gguf(source)
    tokenizer_model = hf.pop("_tokenizer_model")
    cfg = model_config_from_hf(hf, str(source), blocks_per_stack)
    rack = rack_from_tensors(cfg, tensors, {k: str(source) for k in tensors})
    tokenizer = None
    if tokenizer_model:
        from stackwise.data.tokenizers import gguf_tokenizer

        tokenizer = gguf_tokenizer(source)
    return PretrainedModel(rack, tokenizer, source, hf)


__all__ = ["hf_config_from_gguf", "load_gguf", "permute_qk", "read_gguf", "unpermute_qk"]
