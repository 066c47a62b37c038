"""Pieces of the run: the run directory's rules, metrics truncation on resume, the unigram
baseline, byte counting, and docs/configuration.md, the configuration reference (generated, never
drifting)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from stackwise.data.tokenizers import ByteTokenizer
from stackwise.exceptions import ConfigurationError
from stackwise.run.evaluate import text_bytes, unigram_loss
from stackwise.run.metrics import MetricsWriter, read_metrics, truncate_after
from stackwise.run.reference import DESCRIPTIONS, config_reference, readme_section
from stackwise.run.rundir import RunDirectory

CONFIG_DOC = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"


def test_run_directory_rules(tmp_path):
    run = RunDirectory(tmp_path / "r")
    run.prepare()
    run.config.write_text("model: {}\n")
    with pytest.raises(ConfigurationError, match="already exists"):
        RunDirectory(run.root).prepare()
    # the folder stays locked by ``run`` until it releases it
    for kwargs in ({"resume": True}, {"overwrite": True}):
        with pytest.raises(ConfigurationError, match="in use by another stackwise process"):
            RunDirectory(run.root).prepare(**kwargs)
    assert run.config.is_file()
    run.release()
    other = RunDirectory(run.root)
    other.prepare(resume=True)
    other.release()
    with pytest.raises(ConfigurationError, match="exclude each other"):
        run.prepare(resume=True, overwrite=True)
    run.prepare(overwrite=True)
    assert run.root.is_dir() and not run.config.exists()
    run.release()
    with pytest.raises(ConfigurationError, match="holds no run"):
        run.prepare(resume=True)
    with pytest.raises(ConfigurationError, match="not a run directory"):
        run.require_run()


def test_metrics_truncation_for_resume(tmp_path):
    w = MetricsWriter(tmp_path / "m.jsonl")
    common = dict(stack_index=0, n_stacks=1, target_stacks=2, steps=2, mask_ratio=0.0)
    for stage in (0, 1):
        w.write("stage_start", stage=stage, global_step=2 * stage, cache_fill_s=0.0, **common)
        for step in (1, 2):
            w.write(
                "step",
                stage=stage,
                stack_index=stage,
                step=step,
                steps=2,
                global_step=2 * stage + step,
                loss=1.0,
                lr=1e-3,
                tokens=8,
                tokens_per_s=1.0,
                step_ms=1.0,
            )
    w.close()
    assert truncate_after(tmp_path / "m.jsonl", global_step=2, completed_stages=1) == 3
    kept = read_metrics(tmp_path / "m.jsonl")
    assert [(r["type"], r["stage"]) for r in kept] == [("stage_start", 0), ("step", 0), ("step", 0)]


def test_unigram_baseline_and_bytes():
    train = np.array([0, 0, 1, 2])  # counts + 1 over a vocabulary of 4: 3, 2, 2, 1 of 8
    assert unigram_loss(train, np.array([0, 3]), 4) == pytest.approx(
        -(math.log(3 / 8) + math.log(1 / 8)) / 2
    )
    tok = ByteTokenizer()
    ids = np.array(tok.encode("héllo") + [tok.eos_token_id, tok.pad_token_id])
    assert text_bytes(tok, ids) == len("héllo".encode())


def test_every_config_field_is_described():
    reference = config_reference()
    keys = [line.split("`")[1] for line in reference.splitlines() if line.startswith("| `")]
    assert sorted(keys) == sorted(DESCRIPTIONS)
    assert "| `training.progressive.building_mode` | str | `append` |" in reference


def test_configuration_reference_page_is_generated():
    """docs/configuration.md's generated part is exactly `stackwise config reference`; after
    changing a config dataclass run `stackwise config reference --update docs/configuration.md`."""
    assert readme_section(CONFIG_DOC.read_text(encoding="utf-8")) == config_reference()


def test_reference_update_rewrites_only_the_section(tmp_path):
    from stackwise.run.reference import BEGIN, END, update_readme

    doc = tmp_path / "doc.md"
    doc.write_text(f"# Title\n\n{BEGIN}\nold\n{END}\n\nafter\n")
    assert update_readme(doc) is True
    text = doc.read_text()
    assert text.startswith("# Title\n\n") and text.endswith(f"{END}\n\nafter\n")
    assert readme_section(text) == config_reference()
    assert update_readme(doc) is False
    json.dumps(DESCRIPTIONS)  # plain strings only


def _drive(callback):
    start = dict(
        stage=0,
        stack_index=0,
        n_stacks=1,
        target_stacks=2,
        steps=4,
        mask_ratio=0.0,
        param_groups=["current_stack"],
        cache_fill_s=0.0,
    )
    callback.on_stage_start(start)
    for step in range(1, 5):
        callback.on_step(
            dict(
                stage=0,
                stack_index=0,
                step=step,
                steps=4,
                global_step=step,
                loss=2.0,
                lr=1e-3,
                tokens=8 * step,
                tokens_per_s=100.0,
                step_ms=1.0,
            )
        )
    callback.on_eval(dict(stage=0, step=4, global_step=4, eval_loss=1.5))
    callback.on_stage_end(
        dict(
            stage=0,
            stack_index=0,
            n_stacks=1,
            steps=4,
            tokens=32,
            tokens_per_s=100.0,
            wall_s=0.3,
            cache_fill_s=0.0,
            peak_memory_bytes=2**20,
            mask_ratio=0.0,
            losses=[2.0],
        )
    )
    callback.close()


def test_progress_lines_and_bar():
    import io

    from stackwise.run.progress import ProgressCallback

    out, log = io.StringIO(), io.StringIO()
    _drive(ProgressCallback(log_every=2, stream=out, log_file=log, use_bar=False))
    lines = out.getvalue().splitlines()
    steps = [line for line in lines if " lr " in line]
    assert [line.split(" step ")[1].split()[0] for line in steps] == ["2/4", "4/4"]
    assert steps[0].startswith("[stack 1/2]") and "tok/s 100" in steps[0] and "eta" in steps[0]
    assert any("val loss 1.5000" in line for line in lines)
    assert len(log.getvalue().splitlines()) == len(lines)

    out, log = io.StringIO(), io.StringIO()
    _drive(ProgressCallback(log_every=2, stream=out, log_file=log, use_bar=True))
    assert "stack 1/2" in out.getvalue() and "4/4" in out.getvalue()  # the tqdm bar
    assert sum(" lr " in line for line in log.getvalue().splitlines()) == 2
