"""SwiGLUFFN against a plain reference and its freeze flag; LexicalKernelManager loading local
GPT-2 and BERT layouts, projection, tied head storage, freeze flags and errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from stackwise.exceptions import ModelError
from stackwise.model.layers import LexicalKernelManager, SwiGLUFFN


def test_swiglu_ffn_matches_reference_and_grads():
    torch.manual_seed(0)
    ffn = SwiGLUFFN(32, 80)
    x = torch.randn(2, 5, 32, requires_grad=True)
    y = ffn(x)
    ref = ffn.down_proj(F.silu(ffn.gate_proj(x)) * ffn.up_proj(x))
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    assert all(p.grad is not None for p in ffn.parameters())


def test_swiglu_ffn_frozen_up_is_seeded_fixed_features():
    a = SwiGLUFFN(16, 48, freeze_up_proj=True, seed=3)
    torch.manual_seed(123)  # the global RNG must not matter
    b = SwiGLUFFN(16, 48, freeze_up_proj=True, seed=3)
    assert torch.equal(a.up_proj.weight, b.up_proj.weight)
    assert not a.up_proj.weight.requires_grad and a.gate_proj.weight.requires_grad
    a(torch.randn(3, 16)).sum().backward()
    assert a.up_proj.weight.grad is None and a.down_proj.weight.grad is not None


def _write_checkpoint(folder, tensors, sharded=False):
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "test"}))
    if sharded:
        names = list(tensors)
        save_file({names[0]: tensors[names[0]]}, str(folder / "model-00001-of-00002.safetensors"))
        save_file(
            {k: tensors[k] for k in names[1:]}, str(folder / "model-00002-of-00002.safetensors")
        )
        wm = {names[0]: "model-00001-of-00002.safetensors"}
        wm.update({k: "model-00002-of-00002.safetensors" for k in names[1:]})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    else:
        save_file(tensors, str(folder / "model.safetensors"))


def test_loads_gpt2_layout_with_projection_and_tied_head(tmp_path):
    wte = torch.randn(100, 24)
    _write_checkpoint(tmp_path / "gpt2", {"wte.weight": wte, "wpe.weight": torch.randn(8, 24)})
    m = LexicalKernelManager(
        family="gpt2",
        embedding_option="embed_tokens",
        freeze_embeddings=True,
        target_model_dim=32,
        path=tmp_path / "gpt2",
    )
    emb, head = m.get_embeddings(), m.get_lm_head()
    assert torch.equal(emb.table.weight, wte)
    assert not emb.table.weight.requires_grad and emb.projection.weight.requires_grad
    ids = torch.tensor([[1, 5, 99]])
    h = emb(ids)
    assert h.shape == (1, 3, 32)
    # The tied head shares the table's storage and is the transpose of the embedding path.
    assert head.weight.data_ptr() == emb.table.weight.data_ptr()
    logits = head(h)
    assert logits.shape == (1, 3, 100)
    torch.testing.assert_close(logits, h @ emb.projection.weight @ wte.t())
    assert sum(1 for k in m.state_dict() if k.endswith("table.weight")) == 1


def test_loads_bert_layout_sharded_and_extends_vocab(tmp_path):
    table = torch.randn(50, 32)
    _write_checkpoint(
        tmp_path / "bert",
        {
            "bert.embeddings.word_embeddings.weight": table,
            "bert.pooler.dense.weight": torch.randn(32, 32),
        },
        sharded=True,
    )
    m = LexicalKernelManager(
        family="bert",
        embedding_option="embed_tokens",
        freeze_embeddings=False,
        target_model_dim=32,
        vocab_size=52,
        path=tmp_path / "bert",
    )
    w = m.get_embeddings().table.weight
    assert w.shape == (52, 32) and torch.equal(w[:50], table)
    torch.testing.assert_close(w[50], table.mean(0))
    assert w.requires_grad and m.get_embeddings().projection is None


def test_env_path_and_missing_weights(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="STACKWISE_EMBEDDINGS_PATH"):
        LexicalKernelManager(family="gpt2", embedding_option="embed_tokens")
    monkeypatch.setenv("STACKWISE_EMBEDDINGS_PATH", str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="does not exist"):
        LexicalKernelManager(family="gpt2", embedding_option="embed_tokens")
    _write_checkpoint(tmp_path / "llama", {"something.else": torch.randn(4, 4)})
    with pytest.raises(ModelError, match="no llama embedding table"):
        LexicalKernelManager(family="llama", path=tmp_path / "llama")


def test_learned_untied_and_errors():
    m = LexicalKernelManager(
        family="custom",
        embedding_option="learned",
        freeze_embeddings=False,
        target_model_dim=16,
        vocab_size=40,
        tie_embeddings=False,
    )
    assert m.get_lm_head().weight.data_ptr() != m.get_embeddings().table.weight.data_ptr()
    assert m.vocab_size == 40
    with pytest.raises(ModelError, match="unknown family 't5'"):
        LexicalKernelManager(family="t5")
    with pytest.raises(ModelError, match="unknown embedding_option"):
        LexicalKernelManager(family="gpt2", embedding_option="random")
