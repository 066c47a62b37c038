"""The configuration library: shipped configurations found by name (`stackwise train --config
shakespeare-tiny`), listed with a description (`stackwise config list`), and carried by the
built package (setup.py's build_py copies configs/ into stackwise/configs/; the sdist holds
configs/)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from stackwise.cli import main
from stackwise.config import library
from stackwise.exceptions import ConfigurationError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_names_resolve_to_the_shipped_files():
    shipped = library.library_configs()
    assert sorted(shipped) == [p.stem for p in CONFIGS]
    assert library.resolve_config("shakespeare-tiny") == shipped["shakespeare-tiny"]
    assert library.resolve_config("shakespeare-tiny.yaml") == shipped["shakespeare-tiny"]
    path = ROOT / "configs" / "shakespeare-tiny.yaml"
    assert library.resolve_config(str(path)) == path  # a path is taken as given


def test_an_unknown_name_lists_the_shipped_ones(capsys):
    with pytest.raises(ConfigurationError, match="shakespeare-tiny"):
        library.resolve_config("shakespeare-huge")
    assert main(["train", "--config", "shakespeare-huge"]) == 2
    err = capsys.readouterr().err
    assert "shakespeare-huge does not exist and is not a shipped configuration" in err
    assert "stackwise config list" in err


def test_a_missing_path_is_still_reported_as_missing(tmp_path, capsys):
    assert main(["config", "validate", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err


def test_config_list_names_every_config_with_a_description(capsys):
    assert main(["config", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for path in CONFIGS:
        row = next(line for line in lines if line.split()[:1] == [path.stem])
        description = row.split(None, 1)[1]
        assert description == library.describe(path) and len(description) > 20, path.stem


def test_config_show_takes_a_name(capsys):
    assert main(["config", "show", "shakespeare-tiny", "training.lr=3e-4"]) == 0
    assert "learning_rate: 0.0003" in capsys.readouterr().out


def test_build_py_puts_the_library_in_the_package(tmp_path, monkeypatch):
    """What a wheel or `pip install .` installs: stackwise/configs/ holds every configs/ file,
    and the library reads that copy before any checkout."""
    build = tmp_path / "lib"
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(build)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    packaged = build / "stackwise" / "configs"
    assert sorted(p.name for p in packaged.glob("*.yaml")) == [p.name for p in CONFIGS]
    assert (packaged / "README.md").is_file()
    for path in CONFIGS:
        assert (packaged / path.name).read_bytes() == path.read_bytes()
    monkeypatch.setattr(library, "PACKAGE_CONFIGS", packaged)
    monkeypatch.setattr(library, "CHECKOUT_CONFIGS", tmp_path / "no-checkout")
    assert library.resolve_config("shakespeare-tiny") == packaged / "shakespeare-tiny.yaml"


def test_no_library_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(library, "PACKAGE_CONFIGS", tmp_path / "a")
    monkeypatch.setattr(library, "CHECKOUT_CONFIGS", tmp_path / "b")
    with pytest.raises(ConfigurationError, match="no configuration library"):
        library.resolve_config("shakespeare-tiny")


def test_sdist_carries_the_configs(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "setup.py",
            "-q",
            "egg_info",
            "--egg-base",
            str(tmp_path),
            "sdist",
            "--dist-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    (sdist,) = tmp_path.glob("stackwise-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {Path(n).relative_to(Path(n).parts[0]).as_posix() for n in tar.getnames()}
    for path in CONFIGS:
        assert f"configs/{path.name}" in names
    assert {"configs/README.md", "setup.py", "CMakeLists.txt", "cpp/bindings.cpp"} <= names
