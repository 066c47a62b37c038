"""Export a rack as a Hugging Face ``LlamaForCausalLM`` folder (and its LoRA adapters for PEFT).

    from stackwise.model.hf_export import export_hf
    export_hf(rack, "out/", tokenizer=tok)                    # adapters merged into the weights
    export_hf(rack, "out/", tokenizer=tok, adapters="peft")   # base + out/adapter (PEFT LoRA)

    model = transformers.AutoModelForCausalLM.from_pretrained("out/")          # no custom code
    model = peft.PeftModel.from_pretrained(model, "out/adapter")

The folder holds ``config.json``, ``model.safetensors``, ``generation_config.json`` and, given a
tokenizer, ``tokenizer.json`` + ``tokenizer_config.json``. Every block's weights are written in
float32 (or ``dtype``): quantized trunk layers are dequantized; LoRA adapters are either folded
in (``adapters="merge"``) or written in the PEFT layout next to the dequantized base they were
trained on (``adapters="peft"``; ranks that differ between layers go to ``rank_pattern`` /
``alpha_pattern``). A rack that Llama cannot express (MLA, latent or kernel attention, a time
embedding, learned positions, LayerNorm, an embedding projection, a bidirectional block) is a
:class:`ModelError` before anything is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from stackwise._io import atomic_write_bytes, atomic_write_text
from stackwise.exceptions import ModelError
from stackwise.model.hf import LAYER_KEYS
from stackwise.model.quantized import QuantizedLinear

# The block's linear layers -> their HF module names (the norms are written separately).
_LINEARS = {v.rsplit(".", 1)[0]: k.rsplit(".", 1)[0] for k, v in LAYER_KEYS.items() if "proj" in k}


def check_llama_expressible(rack) -> None:
    """Raise :class:`ModelError` naming what a Llama checkpoint cannot express."""
    cfg = rack.config
    problems = []
    if cfg.attention_type not in ("standard", "mha", "gqa"):
        problems.append(f"attention_type {cfg.attention_type!r} (Llama has softmax GQA only)")
    if not cfg.use_rope:
        problems.append("use_rope false (Llama rotates q/k)")
    if cfg.norm != "rmsnorm":
        problems.append(f"norm {cfg.norm!r} (Llama uses RMSNorm)")
    if rack.time_embedding is not None:
        problems.append("a time embedding")
    if rack.position is not None:
        problems.append("learned position embeddings")
    if rack.lexical.embeddings.projection is not None:
        problems.append("a projection between the embedding table and the model")
    for s, stack in enumerate(rack.stacks):
        for b, block in enumerate(stack.blocks):
            if block.attention_mode != "causal":
                problems.append(f"stack {s} block {b} is bidirectional (not a causal LM)")
                break
    if problems:
        raise ModelError("this rack cannot be exported as a Llama model: " + "; ".join(problems))


def _weight(module: nn.Module) -> Tensor:
    """The float32 weight a linear layer computes with (adapters not included)."""
    from stackwise.training.core.qlora import QLoRAAdapter

    if isinstance(module, QLoRAAdapter):
        return _weight(module.base_layer)  # a merged adapter's base already holds the update
    if isinstance(module, QuantizedLinear):
        return module.dequantize(torch.float32).cpu()
    if isinstance(module, nn.Linear):
        if module.bias is not None:
            raise ModelError("a linear layer with a bias cannot be exported as Llama")
        return module.weight.detach().float().cpu()
    raise ModelError(f"cannot export a {type(module).__name__} as a linear layer")


def _blocks(rack):
    i = 0
    for stack in rack.stacks:
        for block in stack.blocks:
            yield i, block
            i += 1


def hf_config(rack, tokenizer=None) -> dict:
    """The ``config.json`` of a Llama model equivalent to ``rack``."""
    check_llama_expressible(rack)
    cfg = rack.config
    attn = rack.stacks[0].blocks[0].attn
    n_layers = sum(len(s) for s in rack.stacks)
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": rack.lexical.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": rack.stacks[0].blocks[0].ffn.d_ff,
        "num_hidden_layers": n_layers,
        "num_attention_heads": attn.n_heads,
        "num_key_value_heads": attn.n_kv_heads,
        "head_dim": attn.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        "tie_word_embeddings": bool(cfg.tie_embeddings),
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "dtype": "float32",
    }
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None) if tokenizer is not None else None
        out[name] = value
    return out


def hf_state_dict(rack, merge: bool = True) -> dict[str, Tensor]:
    """The rack's weights under Hugging Face Llama names (float32, CPU); adapters folded in
    with ``merge``, left out otherwise."""
    from stackwise.training.core.qlora import QLoRAAdapter

    check_llama_expressible(rack)
    state = {"model.embed_tokens.weight": rack.lexical.embeddings.table.weight}
    state["model.norm.weight"] = rack.final_norm.weight
    if not rack.config.tie_embeddings:
        state["lm_head.weight"] = rack.lexical.lm_head.weight
    for i, block in _blocks(rack):
        state[f"model.layers.{i}.input_layernorm.weight"] = block.attn_norm.weight
        state[f"model.layers.{i}.post_attention_layernorm.weight"] = block.ffn_norm.weight
        for ours, theirs in _LINEARS.items():
            module = block.get_submodule(ours)
            w = _weight(module)
            if merge and isinstance(module, QLoRAAdapter) and not module.merged:
                w = w + module.delta_weight().detach().float().cpu()
            state[f"model.layers.{i}.{theirs}.weight"] = w
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def peft_adapters(rack) -> tuple[dict[str, Tensor], dict] | None:
    """(tensors, adapter_config) of the rack's LoRA adapters in PEFT's layout, or None."""
    from stackwise.training.core.qlora import QLoRAAdapter

    tensors: dict[str, Tensor] = {}
    specs: dict[str, tuple[int, float, float]] = {}
    for i, block in _blocks(rack):
        for ours, theirs in _LINEARS.items():
            module = block.get_submodule(ours)
            if not isinstance(module, QLoRAAdapter) or module.merged:
                continue
            name = f"model.layers.{i}.{theirs}"
            prefix = f"base_model.model.{name}"
            tensors[f"{prefix}.lora_A.weight"] = module.lora_A.detach().float().cpu()
            tensors[f"{prefix}.lora_B.weight"] = module.lora_B.detach().float().cpu()
            specs[name] = (module.rank, float(module.alpha), float(module.dropout_p))
    if not specs:
        return None
    values = list(specs.values())  # the most common (rank, alpha, dropout), ties to the largest
    rank, alpha, dropout = max(set(values), key=lambda v: (values.count(v), v))
    if len({d for _, _, d in values}) > 1:
        raise ModelError("the rack's LoRA adapters differ in dropout, which PEFT cannot express")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in specs}),
        "rank_pattern": {n: r for n, (r, _, _) in specs.items() if r != rank},
        "alpha_pattern": {n: a for n, (_, a, _) in specs.items() if a != alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "modules_to_save": None,
    }
    return tensors, config


def hf_tokenizer_object(tokenizer):
    """A ``tokenizers.Tokenizer`` equal to a stackwise tokenizer: a local Hugging Face one,
    GPT-2's BPE with stackwise's mask and pad ids, or the byte tokenizer (a BPE with no merges
    whose every byte falls back to its ``<0xNN>`` token, so id = byte value)."""
    from tokenizers import AddedToken, Tokenizer, decoders

    from stackwise.data.tokenizers import ByteTokenizer, GPT2Tokenizer, HFTokenizer, gpt2_files

    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.backend
    if isinstance(tokenizer, ByteTokenizer):
        from tokenizers.models import BPE

        vocab = {f"<0x{b:02X}>": b for b in range(256)}
        tok = Tokenizer(BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token=None))
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
        specials = {tokenizer.pad_token_id: "<pad>", tokenizer.eos_token_id: "</s>"}
        specials[tokenizer.mask_token_id] = "<mask>"
        tok.add_special_tokens([AddedToken(specials[i], special=True) for i in sorted(specials)])
        return tok
    if isinstance(tokenizer, GPT2Tokenizer):
        from tokenizers import pre_tokenizers
        from tokenizers.models import BPE

        encoder, merges = gpt2_files()
        tok = Tokenizer(BPE.from_file(str(encoder), str(merges)))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(
            [AddedToken(t, special=True) for t in ("<|endoftext|>", "<|mask|>", "<|pad|>")]
        )
        for name, i in (("<|mask|>", tokenizer.mask_token_id), ("<|pad|>", tokenizer.pad_token_id)):
            if tok.token_to_id(name) != i:
                raise ModelError(f"GPT-2 tokenizer export: {name} got id {tok.token_to_id(name)}")
        return tok
    raise ModelError(
        f"the {getattr(tokenizer, 'name', type(tokenizer).__name__)!r} tokenizer has no Hugging "
        "Face form; export without a tokenizer (tokenizer=None)"
    )


def _write_tokenizer(tokenizer, out: Path) -> None:
    backend = hf_tokenizer_object(tokenizer)
    atomic_write_text(out / "tokenizer.json", backend.to_str())
    special = {}
    for name in ("bos_token", "eos_token", "pad_token"):
        i = getattr(tokenizer, f"{name}_id", None)
        if i is not None:
            special[name] = backend.id_to_token(i)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30, **special}
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2))


def export_hf(
    rack,
    directory: str | os.PathLike[str],
    tokenizer=None,
    adapters: str = "merge",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``rack`` as a Hugging Face Llama folder; see the module docstring. ``adapters``:
    "merge" (fold LoRA adapters into the weights) or "peft" (also write ``adapter/``)."""
    from safetensors.torch import save

    if adapters not in ("merge", "peft"):
        raise ModelError(f"adapters must be 'merge' or 'peft', got {adapters!r}")
    config = hf_config(rack, tokenizer)
    state = hf_state_dict(rack, merge=adapters == "merge")
    lora = peft_adapters(rack) if adapters == "peft" else None
    if adapters == "peft" and lora is None:
        raise ModelError("adapters='peft' but the rack has no unmerged LoRA adapters")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        _write_tokenizer(tokenizer, out)
    config["dtype"] = str(dtype).removeprefix("torch.")
    state = {k: v.to(dtype) for k, v in state.items()}
    atomic_write_bytes(out / "model.safetensors", save(state, metadata={"format": "pt"}))
    atomic_write_text(out / "config.json", json.dumps(config, indent=2))
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k]}
    atomic_write_text(out / "generation_config.json", json.dumps(gen, indent=2))
    if lora is not None:
        tensors, adapter_config = lora
        adapter_config["base_model_name_or_path"] = str(out.resolve())
        (out / "adapter").mkdir(exist_ok=True)
        atomic_write_bytes(out / "adapter" / "adapter_model.safetensors", save(tensors))
        atomic_write_text(
            out / "adapter" / "adapter_config.json", json.dumps(adapter_config, indent=2)
        )
    return out


__all__ = ["check_llama_expressible", "export_hf", "hf_config", "hf_state_dict", "peft_adapters"]
