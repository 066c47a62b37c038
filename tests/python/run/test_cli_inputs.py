"""Bad input to the command line gets one ``stackwise: error:`` line and exit status 2, before any
work and before the run directory is created (issue R1, items 15-17): non-UTF-8 corpora, a
corpus of empty texts, a tokenizer.json that is not JSON, a checkpoint manifest that is not a
JSON object, ``training.device=cuda`` without a GPU, a run directory under a file, and a
``--max-new-tokens`` request beyond the documented bound."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from stackwise.cli import main
from stackwise.config.base import StackWiseConfig
from stackwise.exceptions import TrainingError
from stackwise.run.generate import MAX_NEW_TOKENS


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("stackwise: error:"), lines[0]
    return lines[0]


def _train(cfg, run_dir, *overrides) -> int:
    return main(["train", "--config", str(cfg), "--run-dir", str(run_dir), *overrides])


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_non_utf8_corpus(tmp_path, capsys, make_tiny, suffix):
    cfg = make_tiny(tmp_path)
    corpus = tmp_path / f"latin1{suffix}"
    text = "Fran\xe7ais et caf\xe9. " * 100
    body = json.dumps({"text": text}, ensure_ascii=False) if suffix == ".jsonl" else text
    corpus.write_bytes(body.encode("latin-1"))
    assert _train(cfg, tmp_path / "run", f"data.corpus={corpus}") == 2
    line = _one_error_line(capsys)
    assert f"latin1{suffix} is not UTF-8 text" in line
    assert not (tmp_path / "run").exists()


def test_jsonl_of_empty_texts(tmp_path, capsys, make_tiny):
    cfg = make_tiny(tmp_path)
    corpus = tmp_path / "empty.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": ""}) for _ in range(50)))
    assert _train(cfg, tmp_path / "run", f"data.corpus={corpus}") == 2
    assert "holds no text" in _one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_tokenizer_json_that_is_not_json(tmp_path, capsys, make_tiny):
    cfg = make_tiny(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("this is not { json")
    assert _train(cfg, tmp_path / "run", f"data.tokenizer={bad}") == 2
    assert "tokenizer.json is not a tokenizer.json" in _one_error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_device_without_gpu(tmp_path, capsys, make_tiny):
    cfg = make_tiny(tmp_path)
    assert _train(cfg, tmp_path / "run", "training.device=cuda") == 2
    assert "training.device" in _one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_run_dir_under_a_file(tmp_path, capsys, make_tiny):
    cfg = make_tiny(tmp_path)
    (tmp_path / "plain-file").write_text("x")
    assert _train(cfg, tmp_path / "plain-file" / "run") == 2
    assert "plain-file is a file, not a folder" in _one_error_line(capsys)


def test_max_new_tokens_bound_is_checked_before_any_work(tmp_path, capsys):
    # The run folder does not exist: the bound is refused before the run is even looked at.
    args = ["generate", "--run-dir", str(tmp_path / "none"), "--prompt", "hi"]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--max-new-tokens", "1000000000000"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"exceeds the limit of {MAX_NEW_TOKENS}" in err and "none" not in err
    assert main([*args, "--max-new-tokens", str(MAX_NEW_TOKENS)]) == 2  # in bounds: no run
    assert "none" in _one_error_line(capsys)


@pytest.mark.parametrize("manifest", [b"not json at all", b"[]", b'["model.safetensors"]'])
def test_checkpoint_manifest_that_is_not_an_object(trained_run, tmp_path, capsys, manifest):
    cfg, run = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for folder in (copy / "checkpoints").glob("stage-*"):
        (folder / "manifest.json").write_bytes(manifest)
    assert main(["train", "--run-dir", str(copy), "--resume"]) == 2
    assert "manifest.json" in _one_error_line(capsys)
    # The loader itself (the documented resume API) refuses it with a TrainingError too.
    from stackwise.training import ProgressiveTrainer

    config = StackWiseConfig.from_yaml(copy / "config.yaml")
    with pytest.raises(TrainingError, match="manifest.json"):
        ProgressiveTrainer.resume(str(copy / "checkpoints"), config)
