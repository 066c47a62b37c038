"""Disk backups of full-precision block weights: exact fp32 round trip, fp16/bf16 within their
precision, metadata contents, incremental saves; every missing or corrupt piece is named."""

from __future__ import annotations

import json

import pytest
import torch

from stackwise._io import sha256_file
from stackwise.exceptions import TrainingError
from stackwise.model.mlgka import MLGKALayer
from stackwise.training.backup import (
    backup_directory,
    restore_full_precision_weights,
    save_full_precision_weights,
)


def _states(n=3):
    out = {}
    for i in range(n):
        layer = MLGKALayer(d_model=32, n_heads=4, n_kv_heads=4, d_ff=64, seed=i)
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        state["attn_norm.weight"] += torch.randn(32) * 1e-3  # not exactly 1.0 everywhere
        state["step"] = torch.tensor([i, 7], dtype=torch.int64)  # a non-float tensor stays
        out[i] = state
    return out


@pytest.mark.parametrize(
    ("precision", "dtype", "rtol"),
    [("fp32", torch.float32, 0.0), ("fp16", torch.float16, 1e-3), ("bf16", torch.bfloat16, 8e-3)],
)
def test_round_trip(tmp_path, precision, dtype, rtol):
    states = _states()
    save_full_precision_weights(tmp_path, states, precision, run_id="r1")
    restored = restore_full_precision_weights(tmp_path, precision=precision)
    assert sorted(restored) == [0, 1, 2]
    for i, state in states.items():
        assert set(restored[i]) == set(state)
        for name, t in state.items():
            got = restored[i][name]
            assert got.dtype == t.dtype and got.shape == t.shape
            if not t.is_floating_point() or precision == "fp32":
                assert torch.equal(got, t), name
            else:
                assert torch.equal(got, t.to(dtype).to(t.dtype)), name  # rounded, nothing else
                torch.testing.assert_close(got, t, rtol=rtol, atol=1e-6)


def test_metadata_and_incremental_saves(tmp_path):
    states = _states()
    save_full_precision_weights(tmp_path, {0: states[0]}, "fp16", run_id="r2")
    save_full_precision_weights(tmp_path, {2: states[2], 1: states[1]}, "fp16", run_id="r2")
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["run_id"] == "r2" and meta["precision"] == "fp16"
    assert meta["block_indices"] == [0, 1, 2]
    entry = meta["blocks"]["1"]
    assert entry["sha256"] == sha256_file(tmp_path / entry["file"])
    q = entry["tensors"]["attn.q_proj.weight"]
    assert q == {"shape": [32, 32], "dtype": "float32", "stored_dtype": "float16"}
    assert entry["tensors"]["step"]["stored_dtype"] == "int64"
    assert sorted(restore_full_precision_weights(tmp_path, [2, 0])) == [0, 2]
    with pytest.raises(TrainingError, match="belongs to run 'r2', not 'other'"):
        save_full_precision_weights(tmp_path, {3: states[0]}, "fp16", run_id="other")
    save_full_precision_weights(tmp_path, {3: states[0]}, "fp32", run_id="r2")
    assert json.loads((tmp_path / "metadata.json").read_text())["precision"] == "mixed"
    with pytest.raises(TrainingError, match="block 3 of the weight backup .* is stored in fp32"):
        restore_full_precision_weights(tmp_path, [3], precision="fp16")


def test_flipped_byte_names_the_file(tmp_path):
    save_full_precision_weights(tmp_path, _states(), "fp32", run_id="r3")
    path = tmp_path / "block-0001.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert restore_full_precision_weights(tmp_path, [0, 2])  # the others are fine
    with pytest.raises(TrainingError, match=r"block-0001\.safetensors is corrupt"):
        restore_full_precision_weights(tmp_path, [0, 1])


def test_missing_pieces_are_named(tmp_path):
    with pytest.raises(TrainingError, match="no weight backup at .*nothing"):
        restore_full_precision_weights(tmp_path / "nothing")
    save_full_precision_weights(tmp_path, _states(), "bf16", run_id="r4")
    with pytest.raises(TrainingError, match=r"block 7 is not in the weight backup .*\[0, 1, 2\]"):
        restore_full_precision_weights(tmp_path, [0, 7])
    (tmp_path / "block-0002.safetensors").unlink()
    with pytest.raises(TrainingError, match=r"block-0002\.safetensors is missing"):
        restore_full_precision_weights(tmp_path)
    (tmp_path / "metadata.json").unlink()
    with pytest.raises(TrainingError, match=r"metadata\.json is missing"):
        restore_full_precision_weights(tmp_path, [0])


def test_unreadable_file_and_shape_mismatch(tmp_path):
    save_full_precision_weights(tmp_path, _states(2), "fp32", run_id="r5")
    meta_path = tmp_path / "metadata.json"
    meta = json.loads(meta_path.read_text())
    # A file whose checksum matches the metadata but that safetensors cannot parse.
    garbage = tmp_path / "block-0000.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    meta["blocks"]["0"]["sha256"] = sha256_file(garbage)
    meta["blocks"]["1"]["tensors"]["attn.q_proj.weight"]["shape"] = [16, 64]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(TrainingError, match=r"block-0000\.safetensors cannot be read"):
        restore_full_precision_weights(tmp_path, [0])
    with pytest.raises(TrainingError, match=r"tensor attn\.q_proj\.weight is float32 \[32, 32\]"):
        restore_full_precision_weights(tmp_path, [1])
    meta_path.write_text("{not json")
    with pytest.raises(TrainingError, match=r"metadata\.json is corrupt"):
        restore_full_precision_weights(tmp_path, [1])


def test_bad_arguments(tmp_path):
    with pytest.raises(TrainingError, match="cache_precision 'int8' is not one of"):
        save_full_precision_weights(tmp_path, _states(1), "int8", run_id="r6")
    with pytest.raises(TrainingError, match="run_id '../x' is not a usable folder name"):
        backup_directory(None, "../x", tmp_path)
