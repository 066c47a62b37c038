"""Configuration inputs that used to be accepted silently (issue R1, item 14): an empty or
comment-only file, duplicate YAML keys, non-finite numbers and absurd sizes."""

from __future__ import annotations

import re

import pytest

from stackwise.cli import main
from stackwise.config.base import StackWiseConfig
from stackwise.exceptions import ConfigurationError


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n# and another\n"])
def test_empty_or_comment_only_file_is_refused(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigurationError, match="is empty .or holds only comments."):
        StackWiseConfig.from_yaml(path)


def test_explicitly_empty_mapping_means_every_default(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("{}\n")
    assert StackWiseConfig.from_yaml(path) == StackWiseConfig()


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        ("training:\n  learning_rate: 1e-3\n  learning_rate: 2e-3\n", "learning_rate", (3, 2)),
        ("model: {d_model: 64}\ntraining: {}\nmodel: {d_model: 32}\n", "model", (3, 1)),
        ("data: {corpus: a, corpus: b}\n", "corpus", (1, 1)),
    ],
)
def test_duplicate_keys_are_refused_with_both_lines(tmp_path, text, key, lines):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigurationError) as err:
        StackWiseConfig.from_yaml(path)
    message = str(err.value)
    assert f"duplicate key {key!r} on line {lines[0]} (first set on line {lines[1]})" in message
    assert str(path) in message


def test_yaml_merge_keys_still_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  <<: {d_model: 32, n_heads: 4}\n  d_model: 64\n  n_kv_heads: 4\n")
    model = StackWiseConfig.from_yaml(path).model
    assert (model.d_model, model.n_heads) == (64, 4)


@pytest.mark.parametrize(
    ("override", "key", "message"),
    [
        ("training.lr=.inf", "training.lr", "must be a finite number, got inf"),
        ("training.learning_rate=-.inf", "training.learning_rate", "must be a finite number"),
        ("training.optimizer.eps=.nan", "training.optimizer.eps", "must be a finite number"),
        ("training.optimizer.betas=[0.9, .inf]", "training.optimizer.betas[1]", "finite"),
        ("model.max_seq_len=1e30", "model.max_seq_len", "expected an integer"),
        ("model.max_seq_len=" + "1" + "0" * 30, "model.max_seq_len", "is out of range"),
        ("model.max_seq_len=1000000000000", "model.max_seq_len", "exceeds the limit of 16777216"),
        ("training.batch_size=99999999999", "training.batch_size", "exceeds the limit"),
        ("model.d_model=1000000", "model.d_model", "exceeds the limit|parameters"),
    ],
)
def test_non_finite_and_absurd_values_are_refused(override, key, message):
    with pytest.raises(ConfigurationError) as err:
        StackWiseConfig.from_dict({}, [override]).validate()
    assert err.value.key == key
    assert re.search(message, str(err.value))


def test_programmatic_non_finite_value_is_refused_by_validate():
    config = StackWiseConfig()
    config.training.learning_rate = float("inf")
    with pytest.raises(ConfigurationError, match="training.learning_rate: must be a finite"):
        config.validate()


def test_huge_rack_is_refused_before_it_is_built():
    overrides = ["model.d_model=65536", "model.d_ff=4194304", "model.n_heads=64"]
    overrides += ["model.n_kv_heads=64"]
    with pytest.raises(ConfigurationError, match="would hold about .* parameters"):
        StackWiseConfig.from_dict({}, overrides).validate()


@pytest.mark.parametrize("text", ["", "# nothing\n", "a: 1\na: 2\n"])
def test_cli_reports_one_line_and_exit_2(tmp_path, capsys, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert main(["config", "validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stackwise: error:")
