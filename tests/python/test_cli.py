"""The stackwise command: info, config show/validate, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stackwise", *args], capture_output=True, text=True, timeout=120
    )


def test_info_json():
    res = _run("info", "--json")
    assert res.returncode == 0, res.stderr
    assert "swiglu" in json.loads(res.stdout)["ops"]


def test_config_validate_and_show_with_override():
    cfg = str(CONFIGS / "shakespeare-tiny.yaml")
    res = _run("config", "validate", cfg)
    assert res.returncode == 0 and "valid" in res.stdout
    res = _run("config", "show", cfg, "training.lr=3e-4")
    assert res.returncode == 0 and "learning_rate: 0.0003" in res.stdout


def test_bad_input_is_one_line_and_status_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_modle: 64\n")
    res = _run("config", "validate", str(bad))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.d_modle: unknown key; did you mean 'd_model'?" in lines[0]
    res = _run("config", "validate", str(tmp_path / "missing.yaml"))
    assert res.returncode == 2 and "does not exist" in res.stderr
    res = _run("config", "validate", str(CONFIGS / "shakespeare-tiny.yaml"), "model.d_model=90")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "model.d_model: 90 is not divisible by model.n_heads=4" in res.stderr


def _one_error_line(res: subprocess.CompletedProcess) -> str:
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("stackwise"), lines[0]
    return lines[0]


def test_help_on_every_command():
    for command in ([], ["train"], ["eval"], ["generate"], ["bench"], ["info"], ["config"]):
        res = _run(*command, "--help")
        assert res.returncode == 0 and "usage: stackwise" in res.stdout, command


def test_train_bad_input_is_one_line(tmp_path):
    cfg = str(CONFIGS / "shakespeare-tiny.yaml")
    run_dir = str(tmp_path / "run")
    res = _run("train", "--config", cfg, "--run-dir", run_dir, "model.d_modle=64")
    assert res.returncode == 2
    assert "model.d_modle: unknown key; did you mean 'd_model'?" in _one_error_line(res)
    res = _run("train", "--config", cfg, "--run-dir", run_dir, "training.batch_size=many")
    assert res.returncode == 2
    assert "training.batch_size: expected an integer" in _one_error_line(res)
    res = _run("train", "--config", str(tmp_path / "missing.yaml"))
    assert res.returncode == 2 and "missing.yaml does not exist" in _one_error_line(res)
    res = _run("train", "--config", cfg, "--resume", "--overwrite")
    assert res.returncode == 2 and "not allowed with" in _one_error_line(res)
    res = _run("train", "--config", cfg, "--run-dir", run_dir, "--epochs", "3")
    assert res.returncode == 2 and "unrecognized arguments: --epochs" in _one_error_line(res)
    res = _run("generate", "--run-dir", run_dir, "--prompt", "x", "--top-p", "2")
    assert res.returncode == 2 and "--top-p" in _one_error_line(res)
    res = _run("eval", "--run-dir", run_dir)
    assert res.returncode == 2 and "does not exist" in _one_error_line(res)
    res = _run("bench", "op", "nope", "--repeat", "1")
    assert res.returncode == 2 and "unknown benchmark 'nope'" in _one_error_line(res)
    assert not (tmp_path / "run").exists()  # nothing was created for a rejected command


def test_missing_corpus_path_is_named(tmp_path):
    cfg = str(CONFIGS / "shakespeare-tiny.yaml")
    missing = tmp_path / "no-such-corpus.txt"
    res = _run(
        "train",
        "--config",
        cfg,
        "--run-dir",
        str(tmp_path / "run"),
        f"data.corpus={missing}",
        "data.tokenizer=bytes",
        "model.vocab_size=259",
    )
    assert res.returncode == 2
    line = _one_error_line(res)
    assert f"data.corpus: corpus path {missing} does not exist" in line
    assert not (tmp_path / "run").exists()  # input errors are found before the run starts
