"""What a run directory promises: a resumed run keeps every metrics record, one process at a
time holds the folder, manifests and the checkpoint pointer cannot lead outside it, a damaged
metrics file or rack is an error (never a silently shorter file or an older rack)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from stackwise._io import sha256_file
from stackwise.cli import main
from stackwise.exceptions import TrainingError
from stackwise.run.metrics import MetricsWriter, read_metrics
from stackwise.run.rundir import RunDirectory

CHECKPOINT_EVERY = [
    "training.log_every=1",
    "training.checkpointing.every_steps=2",
    "training.checkpointing.keep_last=10",
]


def _steps(run) -> list[int]:
    return [r["global_step"] for r in read_metrics(run / "metrics.jsonl") if r["type"] == "step"]


def _losses(run) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["type"] == "step"]


def _crash_at(run, folder: str, last_step: int) -> None:
    """Make ``run`` look as if it died after writing the records of global step ``last_step``,
    its newest checkpoint being ``folder``."""
    ckpt = run / "checkpoints"
    shutil.rmtree(ckpt / "stage-001")  # the end of stage 1 was never reached
    (ckpt / "latest").write_text(folder + "\n")
    keep = []
    for line in (run / "metrics.jsonl").read_text().splitlines(keepends=True):
        r = json.loads(line)
        if r["type"] in ("final", "stage_end") and r.get("stage", 0) >= 1:
            continue
        if r.get("global_step", 0) > last_step:
            continue
        keep.append(line)
    (run / "metrics.jsonl").write_text("".join(keep))
    shutil.rmtree(run / "rack")


def test_mid_stage_resume_keeps_the_interrupted_stages_records(tmp_path, make_tiny, capsys):
    cfg = make_tiny(tmp_path)
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--run-dir", str(run), *CHECKPOINT_EVERY]) == 0
    assert _steps(run) == list(range(1, 9))
    losses = _losses(run)
    # died at global step 7 (stage 1, step 3); the newest checkpoint is stage 1 after step 2
    _crash_at(run, "stage-001-step-000002", 7)
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run), "--resume"]) == 0
    assert "(global step 6)" in capsys.readouterr().out
    assert _steps(run) == list(range(1, 9))  # 5 and 6 were lost before
    assert _losses(run) == losses  # the steps after the checkpoint ran again, identically
    kinds = [r["type"] for r in read_metrics(run / "metrics.jsonl")]
    assert kinds.count("stage_start") == 2 and kinds.count("final") == 1


def test_latest_missing_resumes_from_the_newest_verified_checkpoint(tmp_path, make_tiny, capsys):
    cfg = make_tiny(tmp_path)
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--run-dir", str(run), *CHECKPOINT_EVERY]) == 0
    _crash_at(run, "stage-001-step-000002", 7)
    ckpt = run / "checkpoints"
    (ckpt / "latest").unlink()
    # a newer folder that does not verify is skipped and named
    shutil.copytree(ckpt / "stage-001-step-000002", ckpt / "stage-001-step-000003")
    with open(ckpt / "stage-001-step-000003" / "model.safetensors", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\0")
    capsys.readouterr()
    assert main(["eval", "--run-dir", str(run)]) == 2  # eval never rewrites the pointer
    assert "stage-001-step-000002" in capsys.readouterr().err
    assert main(["train", "--run-dir", str(run), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "latest was missing: continuing from stage-001-step-000002" in out
    assert "skipped stage-001-step-000003" in out and "(global step 6)" in out
    assert _steps(run) == list(range(1, 9))


@pytest.mark.parametrize("pointer", ["../../other/checkpoints/stage-000", "ABSOLUTE", "stage-009"])
def test_latest_outside_the_run_is_refused(tmp_path, make_tiny, capsys, pointer):
    cfg = make_tiny(tmp_path)
    run = tmp_path / "run"
    one = "training.progressive.target_stacks=1"
    assert main(["train", "--config", str(cfg), "--run-dir", str(run), one]) == 0
    other = tmp_path / "other"
    shutil.copytree(run, other)
    # a folder of the right name that is a link to another run's checkpoint
    (run / "checkpoints" / "stage-009").symlink_to(other / "checkpoints" / "stage-000")
    if pointer == "ABSOLUTE":
        pointer = str(other / "checkpoints" / "stage-000")
    (run / "checkpoints" / "latest").write_text(pointer + "\n")
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "latest names" in err[0], err
    why = err[0].split("latest names", 1)[1]
    assert "must name a checkpoint folder" in why or "a link leading outside" in why, err


def _edit_manifest(rack, change) -> None:
    manifest = json.loads((rack / "manifest.json").read_text())
    change(manifest)
    (rack / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.clear(), "does not list"),
        (lambda m: m.pop("model.safetensors"), "does not list"),
        (lambda m: m.update({"/dev/zero": "0" * 64}), "relative paths inside"),
        (lambda m: m.update({"../../../../etc/hostname": "0" * 64}), "relative paths inside"),
        (lambda m: m.update({"model.safetensors": "nothex"}), "not a SHA-256"),
    ],
)
def test_a_damaged_rack_manifest_fails_loudly(trained_run, tmp_path, capsys, change, message):
    _, src = trained_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    with open(run / "rack" / "model.safetensors", "r+b") as f:  # weights no one verified
        f.seek(-4, os.SEEK_END)
        f.write(b"\xff\xff\xff\x7f")
    _edit_manifest(run / "rack", change)
    capsys.readouterr()
    assert main(["eval", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "manifest.json" in err[0], err


def test_manifest_links_outside_are_refused(trained_run, tmp_path, capsys):
    _, src = trained_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    secret = tmp_path / "secret.txt"
    secret.write_text("not the run's\n")
    (run / "rack" / "extra.txt").symlink_to(secret)
    _edit_manifest(run / "rack", lambda m: m.update({"extra.txt": sha256_file(secret)}))
    assert main(["eval", "--run-dir", str(run)]) == 2
    assert "leads outside" in capsys.readouterr().err


def test_a_rack_that_does_not_fit_is_an_error_not_an_older_checkpoint(
    trained_run, tmp_path, capsys
):
    from safetensors.torch import load_file, save_file

    _, src = trained_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    weights = run / "rack" / "model.safetensors"
    state = load_file(str(weights))
    name = next(k for k, v in state.items() if v.dim() == 2)
    state[name] = state[name][:, :-1].contiguous()
    save_file(state, str(weights))
    _edit_manifest(run / "rack", lambda m: m.update({"model.safetensors": sha256_file(weights)}))
    assert main(["eval", "--run-dir", str(run)]) == 2
    assert "does not fit its config.yaml" in capsys.readouterr().err


def test_a_converted_rack_is_rebuilt_from_its_checkpoint_and_says_so(tmp_path, make_tiny, capsys):
    cfg = make_tiny(tmp_path)
    run = tmp_path / "run"
    nf4 = ["training.quantization_enabled=true", "training.quantization_type=nf4"]
    assert main(["train", "--config", str(cfg), "--run-dir", str(run), *nf4]) == 0
    capsys.readouterr()
    assert main(["eval", "--run-dir", str(run), "--json"]) == 0
    captured = capsys.readouterr()
    assert "stackwise: note:" in captured.err and "using checkpoint stage-001" in captured.err
    summary = json.loads((run / "summary.json").read_text())
    assert json.loads(captured.out)["loss"] == pytest.approx(summary["val_loss"], rel=1e-5)


_HOLD = """
import sys
from stackwise.run.rundir import RunDirectory
RunDirectory(sys.argv[1]).prepare(resume=True)
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_live_run_is_locked_and_a_dead_ones_lock_is_not(trained_run, tmp_path, capsys):
    cfg, src = trained_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(run)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in (["--resume"], ["--config", str(cfg), "--overwrite"]):
            capsys.readouterr()
            assert main(["train", "--run-dir", str(run), *extra]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert (
                len(err) == 1
                and f"in use by another stackwise process (pid {holder.pid})" in (err[0])
            )
        assert (run / "summary.json").is_file() and (run / "rack").is_dir()  # untouched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel dropped the dead process's lock: the run can be taken over
    folder = RunDirectory(run)
    folder.prepare(resume=True)
    folder.release()


def test_read_metrics_refuses_a_damaged_line_and_skips_only_a_torn_last_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    w = MetricsWriter(path)
    for step in (1, 2):
        w.write("eval", stage=0, step=step, global_step=step, eval_loss=1.0)
    w.close()
    good = path.read_text()
    path.write_text(good + '{"type": "eval", "stage": 0, "st')  # torn by a crash
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    lines = good.splitlines(keepends=True)
    for bad in ("not json\n", "[1, 2]\n", '{"type": "eval"\n', "\udcff\n"):
        path.write_bytes((lines[0] + bad + lines[1]).encode("utf-8", "surrogateescape"))
        with pytest.raises(TrainingError, match="line 2 is not a JSON record"):
            read_metrics(path)
    # appending after a torn line first cuts it, so the next record stays whole
    path.write_text(good + '{"type": "eval", "st')
    w = MetricsWriter(path)
    w.write("eval", stage=0, step=3, global_step=3, eval_loss=1.0)
    w.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


@pytest.mark.parametrize("text", ["[]", "not json", '{"../../run.json": "' + "0" * 64 + '"}'])
def test_a_damaged_checkpoint_manifest_is_one_clear_error(tmp_path, make_tiny, capsys, text):
    cfg = make_tiny(tmp_path)
    run = tmp_path / "run"
    one = "training.progressive.target_stacks=1"
    assert main(["train", "--config", str(cfg), "--run-dir", str(run), one]) == 0
    (run / "checkpoints" / "stage-000" / "manifest.json").write_text(text)
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stage-000/manifest.json" in err[0], err
