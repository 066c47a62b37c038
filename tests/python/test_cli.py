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
