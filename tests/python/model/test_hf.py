"""Hugging Face import and export (stackwise.model.hf, hf_export): tiny random LlamaForCausalLM
models saved to temporary folders go HF -> rack -> HF with the same logits as transformers."""

from __future__ import annotations

import json

import pytest
import torch

from stackwise.exceptions import ModelError
from stackwise.model.hf import load_pretrained
from stackwise.model.hf_export import export_hf
from utils import assert_close

transformers = pytest.importorskip("transformers")

VOCAB = 97
CASES = {
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa-tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "gqa-head-dim": dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=48,
    ),
}


def tiny_llama(seed: int = 0, n_layers: int = 2, **overrides):
    """A random LlamaForCausalLM (eval mode) with weights large enough to matter."""
    fields = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=n_layers,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    fields.update(overrides)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).eval()
    with torch.no_grad():  # norms away from 1 so a missed norm weight shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def rack_logits(rack, ids):
    with torch.no_grad():
        return rack(ids)


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_rack_hf_round_trip(tmp_path, ids, case):
    model = tiny_llama(**CASES[case])
    model.save_pretrained(tmp_path / "hf")
    imported = load_pretrained(tmp_path / "hf")
    rack = imported.rack
    cfg = rack.config
    assert cfg.tie_embeddings == model.config.tie_word_embeddings
    assert cfg.n_kv_heads == model.config.num_key_value_heads
    assert rack.stacks[0].blocks[0].attn.head_dim == model.config.head_dim
    assert cfg.max_seq_len == model.config.max_position_embeddings
    expected = hf_logits(model, ids)
    assert_close(rack_logits(rack, ids), expected, "model_logits", torch.float32)

    export_hf(rack, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == "LlamaForCausalLM"
    for name in ("head_dim", "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(back.config, name) == getattr(model.config, name), name
    assert back.config.rope_parameters["rope_theta"] == model.config.rope_parameters["rope_theta"]
    torch.testing.assert_close(hf_logits(back, ids), expected, rtol=0, atol=0)


def test_sharded_folder_and_blocks_per_stack(tmp_path, ids):
    model = tiny_llama(n_layers=4, num_attention_heads=4, num_key_value_heads=1)
    model.save_pretrained(tmp_path / "hf", max_shard_size="60KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    rack = load_pretrained(tmp_path / "hf", blocks_per_stack=2).rack
    assert [len(s) for s in rack.stacks] == [2, 2]
    assert_close(rack_logits(rack, ids), hf_logits(model, ids), "model_logits", torch.float32)
    with pytest.raises(ModelError, match="blocks_per_stack 3 does not divide"):
        load_pretrained(tmp_path / "hf", blocks_per_stack=3)


def _edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "llama3"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type 'linear'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"sliding_window": 16}, "sliding_window"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ],
)
def test_fields_it_cannot_honour_are_named(tmp_path, changes, match):
    tiny_llama(n_layers=1).save_pretrained(tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ModelError, match=match):
        load_pretrained(tmp_path)


def test_bad_paths_and_weights_name_the_file(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_pretrained(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a .gguf file"):
        load_pretrained(tmp_path / "weights.bin")
    folder = tmp_path / "hf"
    tiny_llama(n_layers=1).save_pretrained(folder)
    _edit_config(folder, intermediate_size=80)
    with pytest.raises(ModelError, match=r"model\.safetensors: tensor .*_proj.weight has shape"):
        load_pretrained(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no \\*.safetensors weights"):
        load_pretrained(folder)


def test_export_refuses_racks_llama_cannot_express(tmp_path):
    from stackwise.config import _schema
    from stackwise.config.base import ModelConfig
    from stackwise.model.architecture import Rack
    from utils import tiny_model

    def config(**overrides):
        return _schema.from_dict(ModelConfig, tiny_model(VOCAB, **overrides), "model")

    for overrides, match in (
        ({"attention_type": "mla", "use_rope": True}, "attention_type 'mla'"),
        ({"attention_type": "gqa", "use_rope": False}, "use_rope false"),
        ({"attention_type": "gqa", "use_rope": True, "attention_mode": "bidirectional"}, "causal"),
    ):
        rack = Rack.from_config(config(**overrides))
        with pytest.raises(ModelError, match=match):
            export_hf(rack, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    rack = Rack.from_config(config(attention_type="gqa", use_rope=True), time_embedding=True)
    with pytest.raises(ModelError, match="time embedding"):
        export_hf(rack, tmp_path / "out")


def test_gpt2_tokenizer_is_written(tmp_path):
    from stackwise.data.tokenizers import get_tokenizer

    tok = get_tokenizer("gpt2")
    rack = load_pretrained(_saved(tmp_path, n_layers=1, vocab_size=tok.vocab_size)).rack
    export_hf(rack, tmp_path / "out", tokenizer=tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "To be, or not to be: that is the question.\n  Whether 'tis nobler"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert hf_tok.convert_tokens_to_ids("<|mask|>") == tok.mask_token_id


def _saved(tmp_path, **kw):
    folder = tmp_path / "hf"
    tiny_llama(**kw).save_pretrained(folder)
    return folder


def _adapted_rack(tmp_path):
    """An imported rack whose two stacks carry LoRA adapters over NF4 weights (ranks 4 and 2),
    with non-zero B so the adapters change the logits."""
    from stackwise.training.core.qlora import wrap_linears

    rack = load_pretrained(_saved(tmp_path, num_key_value_heads=2), blocks_per_stack=1).rack
    for stack, rank in zip(rack.stacks, (4, 2), strict=True):
        wrap_linears(stack, rank=rank, alpha=2.0 * rank, dropout=0.0, quantization="nf4")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in rack.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return rack.eval()


def test_lora_adapters_load_in_peft(tmp_path, ids):
    peft = pytest.importorskip("peft")
    rack = _adapted_rack(tmp_path)
    expected = rack_logits(rack, ids)
    export_hf(rack, tmp_path / "out", adapters="peft")
    cfg = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["rank_pattern"]  # stack 1's layers have rank 2
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    without = hf_logits(base, ids)
    model = peft.PeftModel.from_pretrained(base, tmp_path / "out" / "adapter").eval()
    assert_close(hf_logits(model, ids), expected, "model_logits", torch.float32)
    assert (without - expected).abs().max() > 1e-3  # the adapters matter

    export_hf(rack, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not (tmp_path / "merged" / "adapter").exists()
    assert_close(hf_logits(merged, ids), expected, "model_logits", torch.float32)
    with pytest.raises(ModelError, match="no unmerged LoRA adapters"):
        export_hf(load_pretrained(tmp_path / "merged").rack, tmp_path / "x", adapters="peft")
