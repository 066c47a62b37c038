"""GGUF import (stackwise.model.hf_gguf): a tiny random Llama written with ``gguf`` the way
llama.cpp's converter writes it (q/k rows permuted, a GPT-2-style BPE tokenizer in the
metadata) imports with transformers' logits and the same tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from stackwise.exceptions import ModelError
from stackwise.model.hf import load_pretrained
from stackwise.model.hf_gguf import permute_qk, unpermute_qk
from utils import assert_close

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from model.test_hf import tiny_llama  # noqa: E402

TEXT = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune",
] * 10
SUFFIX = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def small_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXT, trainer)
    return tok


def write_gguf(path, model, tok, arch: str = "llama") -> None:
    """``model`` (LlamaForCausalLM) and ``tok`` as a llama.cpp-layout GGUF file (float32)."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    w.add_token_list(tokens)
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    merges = json.loads(tok.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for a tied head
        if key in TOP:
            name = TOP[key]
        else:
            parts = key.split(".")
            name = f"blk.{parts[2]}.{SUFFIX['.'.join(parts[3:-1])]}.weight"
        if key.endswith("q_proj.weight"):
            value = permute_qk(value, c.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            value = permute_qk(value, c.num_key_value_heads)
        w.add_tensor(name, value.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_permutation_round_trip():
    w = torch.randn(3 * 8, 5)
    torch.testing.assert_close(unpermute_qk(permute_qk(w, 3), 3), w, rtol=0, atol=0)
    assert not torch.equal(permute_qk(w, 3), w)


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_import_matches_transformers(tmp_path, tied):
    tok = small_bpe()
    model = tiny_llama(
        vocab_size=tok.get_vocab_size(),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        tie_word_embeddings=tied,
    )
    write_gguf(tmp_path / "tiny.gguf", model, tok)
    imported = load_pretrained(tmp_path / "tiny.gguf", blocks_per_stack=1)
    assert len(imported.rack.stacks) == 2 and imported.rack.config.tie_embeddings == tied
    ids = torch.randint(
        0, tok.get_vocab_size(), (2, 13), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        expected = model(ids).logits
        assert_close(imported.rack(ids), expected, "model_logits", torch.float32)
    text = "To be, or not to be: the question"
    assert imported.tokenizer.encode(text) == tok.encode(text).ids
    from stackwise.data.tokenizers import get_tokenizer  # what a run's data.tokenizer reads

    assert get_tokenizer(str(tmp_path / "tiny.gguf")).encode(text) == tok.encode(text).ids


def test_gguf_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="bad.gguf is not a readable GGUF file"):
        load_pretrained(bad)
    tok = small_bpe()
    model = tiny_llama(n_layers=1, vocab_size=tok.get_vocab_size())
    write_gguf(tmp_path / "other.gguf", model, tok, arch="qwen2")
    with pytest.raises(ModelError, match="general.architecture 'qwen2'"):
        load_pretrained(tmp_path / "other.gguf")
