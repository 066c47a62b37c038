"""stackwise train / eval / generate end to end on a tiny configuration: the run directory, its
metrics, plots and summary, refusal of an existing directory, --overwrite and --resume."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from stackwise.cli import main
from stackwise.run.metrics import SCHEMA, check_record, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_train_writes_the_run_directory(trained_run):
    _, run = trained_run
    for name in (
        "config.yaml",
        "run.json",
        "metrics.jsonl",
        "train.log",
        "summary.json",
        "summary.md",
        "rack/model.safetensors",
        "rack/manifest.json",
        "checkpoints/latest",
        "plots/loss.png",
        "plots/memory.png",
    ):
        assert (run / name).is_file(), name
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["tokenizer"] == "bytes"
    summary = json.loads((run / "summary.json").read_text())
    for key in ("val_loss", "perplexity", "unigram_loss", "tokens_per_s", "wall_s", "stages"):
        assert summary[key] is not None, key
    assert len(summary["stages"]) == 2
    assert math.isclose(summary["perplexity"], math.exp(summary["val_loss"]), rel_tol=1e-6)
    assert all(s["peak_memory_bytes"] > 0 and s["wall_s"] > 0 for s in summary["stages"])
    assert "validation loss" in (run / "summary.md").read_text()

    from stackwise.config.base import StackWiseConfig
    from stackwise.model.architecture import load_rack

    assert StackWiseConfig.from_yaml(run / "config.yaml").validate().model.d_model == 32
    assert len(load_rack(run / "rack").stacks) == 2


def test_metrics_jsonl_schema(trained_run):
    _, run = trained_run
    records = read_metrics(run / "metrics.jsonl")
    for r in records:
        check_record(r)
    kinds = [r["type"] for r in records]
    assert set(kinds) == set(SCHEMA)
    assert kinds.count("stage_start") == 2 and kinds.count("stage_end") == 2
    assert kinds.count("final") == 1 and kinds[-1] == "final"
    steps = [r for r in records if r["type"] == "step"]
    # log_every 2, 4 steps per stage: steps 2 and 4 of each stage
    assert [(r["stage"], r["step"]) for r in steps] == [(0, 2), (0, 4), (1, 2), (1, 4)]
    assert [r["global_step"] for r in steps] == [2, 4, 6, 8]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["global_step"] for r in evals] == [2, 4, 6, 8]
    with pytest.raises(ValueError, match="lacks"):
        check_record({"type": "step", "time": 0.0, "loss": 1.0})
    with pytest.raises(ValueError, match="unknown record type"):
        check_record({"type": "nope", "time": 0.0})


def test_tensorboard_events_hold_the_metrics(trained_run):
    """`stackwise train` always writes TensorBoard events; read back with TensorBoard's own
    reader they hold the loss curve of metrics.jsonl: same tags, steps and values (float32)."""
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from stackwise.run.metrics import TENSORBOARD_TAGS

    _, run = trained_run
    assert json.loads((run / "run.json").read_text())["tensorboard"] is True
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    expected_tags = {tag for tags in TENSORBOARD_TAGS.values() for tag, _ in tags}
    assert set(acc.Tags()["scalars"]) == expected_tags
    records = read_metrics(run / "metrics.jsonl")
    for kind, tags in TENSORBOARD_TAGS.items():
        of_kind = [r for r in records if r["type"] == kind]
        assert of_kind, kind
        for tag, key in tags:
            events = acc.Scalars(tag)
            want = [r[key] / 2**20 if key == "peak_memory_bytes" else r[key] for r in of_kind]
            assert [e.value for e in events] == [float(np.float32(v)) for v in want], tag
            if kind != "final":
                assert [e.step for e in events] == [r["global_step"] for r in of_kind], tag
    loss = acc.Scalars("train/loss")
    steps = [r for r in records if r["type"] == "step"]
    assert len(loss) == len(steps) >= 4  # the loss curve: every logged step of both stages
    assert acc.Scalars("final/val_loss")[0].step == steps[-1]["global_step"]


def test_plots_are_valid_pngs(trained_run):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.image as mpimg

    _, run = trained_run
    for name in ("loss.png", "memory.png"):
        path = run / "plots" / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = mpimg.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_eval_command(trained_run, capsys):
    _, run = trained_run
    assert main(["eval", "--run-dir", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert math.isclose(result["perplexity"], math.exp(result["loss"]), rel_tol=1e-9)
    # every byte of this ASCII corpus is one token of the byte tokenizer
    assert result["bytes"] == result["tokens"]
    assert math.isclose(result["bits_per_byte"], result["loss"] / math.log(2), rel_tol=1e-9)
    assert result["bits_per_byte_quantity"].startswith("next-token cross entropy")
    assert result["masked_accuracy"] is None and result["unigram_loss"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert math.isclose(result["loss"], summary["val_loss"], rel_tol=1e-5)
    assert (run / "eval-val.json").is_file()
    assert main(["eval", "--run-dir", str(run), "--split", "train", "--max-batches", "2"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_generate_command_is_deterministic(trained_run, capsys):
    _, run = trained_run
    args = ["generate", "--run-dir", str(run), "--prompt", "Line 3", "--max-new-tokens", "12"]
    outs = []
    for extra in (["--seed", "7"], ["--seed", "7"], ["--seed", "7", "--no-cache"]):
        assert main([*args, *extra, "--json"]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0]["ids"] == outs[1]["ids"] == outs[2]["ids"]
    assert len(outs[0]["ids"]) == outs[0]["prompt_tokens"] + 12
    assert outs[0]["text"].startswith("Line 3")


def test_existing_run_dir_is_refused_then_overwritten(trained_run, tmp_path, capsys):
    cfg, run = trained_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    assert main(["train", "--config", str(cfg), "--run-dir", str(copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--overwrite" in err[0]
    (copy / "marker").write_text("old run")
    assert main(["train", "--config", str(cfg), "--run-dir", str(copy), "--overwrite"]) == 0
    assert not (copy / "marker").exists() and (copy / "summary.json").is_file()
    assert main(["train", "--run-dir", str(tmp_path / "none"), "--resume"]) == 2
    assert "holds no run" in capsys.readouterr().err


def test_resume_grows_and_recovers(tmp_path, make_tiny, capsys):
    cfg = make_tiny(tmp_path)
    run = tmp_path / "run"
    one = "training.progressive.target_stacks=1"
    assert main(["train", "--config", str(cfg), "--run-dir", str(run), one]) == 0
    assert json.loads((run / "summary.json").read_text())["stages"][0]["stage"] == 0
    # grow the finished one-stack run to two stacks
    two = "training.progressive.target_stacks=2"
    assert main(["train", "--run-dir", str(run), "--resume", two]) == 0
    assert "resuming after stage 1" in capsys.readouterr().out
    kinds = [r["type"] for r in read_metrics(run / "metrics.jsonl")]
    assert kinds.count("stage_end") == 2 and kinds.count("final") == 1
    assert len(json.loads((run / "summary.json").read_text())["stages"]) == 2

    # a crash during stage 2: its checkpoint is gone, its metrics half written
    shutil.rmtree(run / "checkpoints" / "stage-001")
    (run / "checkpoints" / "latest").write_text("stage-000\n")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"type": "step", "time": 0, "stage": 1, "global_step": 9999')  # torn line
    assert main(["train", "--run-dir", str(run), "--resume"]) == 0
    records = read_metrics(run / "metrics.jsonl")
    for r in records:
        check_record(r)
    assert [r["stage"] for r in records if r["type"] == "stage_end"] == [0, 1]
    steps = [r["global_step"] for r in records if r["type"] == "step"]
    assert steps == sorted(steps) and len(steps) == len(set(steps))
    assert (run / "checkpoints" / "stage-001").is_dir()

    # a resumed run cannot change the model; its config.yaml stays as it was
    before = (run / "config.yaml").read_text()
    assert main(["train", "--run-dir", str(run), "--resume", "model.d_ff=96"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit this configuration" in err[0] and "train.log" in err[0]
    assert (run / "config.yaml").read_text() == before
    assert json.loads((run / "run.json").read_text())["status"] == "failed"


def test_masked_run_eval_and_samplers(tmp_path, make_tiny, capsys):
    cfg = make_tiny(tmp_path, objective="diffusion", building="prepend")
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--run-dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["eval", "--run-dir", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.0 <= result["masked_accuracy"] <= 1.0 and result["mask_ratio"] == pytest.approx(0.9)
    for sampler in ("depth", "diffusion"):
        args = ["generate", "--run-dir", str(run), "--prompt", "Line", "--sampler", sampler]
        outs = []
        for _ in range(2):
            assert main([*args, "--max-new-tokens", "10", "--seed", "3", "--json"]) == 0
            outs.append(json.loads(capsys.readouterr().out))
        assert outs[0]["ids"] == outs[1]["ids"]
        assert 258 not in outs[0]["ids"] and len(outs[0]["ids"]) == 14  # no mask id left
    assert main(["generate", "--run-dir", str(run), "--prompt", "x", "--sampler", "ar"]) == 2
    assert "needs a causal" in capsys.readouterr().err


def test_export_command_writes_a_transformers_folder(trained_run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    import torch

    from stackwise.run.evaluate import load_run
    from utils import assert_close

    _, run_dir = trained_run
    out = tmp_path / "hf"
    assert main(["export", "--run-dir", str(run_dir), "--format", "hf", str(out)]) == 0
    assert "wrote a Hugging Face Llama folder" in capsys.readouterr().out
    run = load_run(run_dir, device="cpu")
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "the quick brown fox"
    ids = run.tokenizer.encode(text)
    assert tok(text, add_special_tokens=False)["input_ids"] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        assert_close(model(x).logits, run.rack(x), "model_logits", torch.float32)
    assert (
        main(
            [
                "export",
                "--run-dir",
                str(run_dir),
                "--format",
                "hf",
                "--adapters",
                "peft",
                str(tmp_path / "p"),
            ]
        )
        == 2
    )
    assert "no unmerged LoRA adapters" in capsys.readouterr().err
