"""``training.init_from``: a tiny pretrained Llama (saved with transformers) becomes the trunk of
a run; new stacks start as the identity, the trunk can be NF4, and eval, generate, resume and
export work on the grown rack."""

from __future__ import annotations

import json

import pytest
import torch

from stackwise.cli import main
from stackwise.config.base import StackWiseConfig
from stackwise.exceptions import ConfigurationError
from utils import assert_close

transformers = pytest.importorskip("transformers")

GROW = """\
model:
  architecture: {{blocks_per_stack: 1}}
training:
  init_from: {base}
  learning_rate: 3e-3
  batch_size: 4
  seq_len: 32
  log_every: 2
  eval_every: 2
  quantization_enabled: {nf4}
  quantization_type: nf4
  optimizer: {{warmup_steps: 0}}
  progressive: {{target_stacks: 3, steps_per_stack: 3}}
data: {{corpus: {corpus}, tokenizer: {tokenizer}, val_fraction: 0.1}}
"""


@pytest.fixture
def base(tmp_path):
    """A 2-layer random Llama over the byte tokenizer (tokenizer.json written by the export)."""
    from stackwise.data.tokenizers import ByteTokenizer
    from stackwise.model.hf_export import hf_tokenizer_object

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=259,
        max_position_embeddings=64,
        initializer_range=0.1,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    folder = tmp_path / "base"
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text(hf_tokenizer_object(ByteTokenizer()).to_str())
    return folder, model


def _config(tmp_path, base_folder, nf4=False, tokenizer="gpt2"):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"Line {i}: the quick brown fox jumps.\n" for i in range(160)))
    path = tmp_path / "grow.yaml"
    text = GROW.format(base=base_folder, nf4=str(nf4).lower(), corpus=corpus, tokenizer=tokenizer)
    path.write_text(text)
    return path


def test_new_stack_starts_as_the_identity(tmp_path, base):
    from stackwise.model.hf_init import apply_init_from, seed_trunk
    from stackwise.training import ProgressiveRackBuilder
    from stackwise.training.growth import init_new_stack

    folder, model = base
    config = StackWiseConfig.from_yaml(_config(tmp_path, folder))
    apply_init_from(config)
    config.validate()
    assert config.model.d_model == 32 and config.model.n_layers == 3
    assert config.data.tokenizer == str(folder / "tokenizer.json")
    builder = ProgressiveRackBuilder(config=config)
    assert seed_trunk(builder)
    builder.add_stack()
    init_new_stack(builder, 2, config.training.progressive.new_stack_init)  # auto -> identity
    ids = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        assert_close(builder.rack.eval()(ids), expected, "model_logits", torch.float32)
        config.training.progressive.new_stack_init = "random"
        init_new_stack(builder, 2, "random")  # a no-op: "random" keeps the blocks' own init
    assert builder.rack.stacks[2].blocks[0].attn.o_proj.weight.abs().max() == 0


def test_config_conflicts_are_named(tmp_path, base):
    from stackwise.model.hf_init import apply_init_from

    folder, _ = base
    config = StackWiseConfig.from_yaml(_config(tmp_path, folder), overrides=["model.d_model=48"])
    with pytest.raises(ConfigurationError, match=r"model\.d_model.*48 differs from 32"):
        apply_init_from(config)
    config = StackWiseConfig.from_yaml(
        _config(tmp_path, folder), overrides=["training.progressive.target_stacks=2"]
    )
    with pytest.raises(ConfigurationError, match="does not exceed the 2 stacks"):
        apply_init_from(config)
    config = StackWiseConfig.from_yaml(_config(tmp_path, folder, tokenizer="bytes"))
    with pytest.raises(ConfigurationError, match="data.tokenizer"):
        apply_init_from(config)


def test_grow_on_an_nf4_trunk_then_eval_generate_resume_export(tmp_path, base, capsys):
    folder, _ = base
    cfg = _config(tmp_path, folder, nf4=True)
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--run-dir", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == [2]
    builder = json.loads(next((run / "checkpoints").glob("stage-*/builder.json")).read_text())
    assert builder["precisions"] == ["nf4", "nf4", "nf4"]
    capsys.readouterr()
    assert main(["eval", "--run-dir", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    from stackwise.model.hf import load_pretrained
    from stackwise.run.evaluate import LoadedRun, evaluate_run, load_run

    loaded = load_run(run, device="cpu")
    base_rack = load_pretrained(folder).rack
    as_base = LoadedRun(loaded.run_dir, loaded.config, base_rack, loaded.tokenizer, loaded.device)
    assert result["loss"] < evaluate_run(as_base, "val")["loss"]  # the new stack learned
    assert (
        main(["generate", "--run-dir", str(run), "--prompt", "Line", "--max-new-tokens", "8"]) == 0
    )
    capsys.readouterr()
    four = "training.progressive.target_stacks=4"
    assert main(["train", "--run-dir", str(run), "--resume", four]) == 0
    assert "resuming after stage 1" in capsys.readouterr().out
    out = tmp_path / "hf"
    assert main(["export", "--run-dir", str(run), "--format", "hf", str(out)]) == 0
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert exported.config.num_hidden_layers == 4
    loaded = load_run(run, device="cpu")
    ids = torch.tensor([loaded.tokenizer.encode("Line 3: the quick")])
    with torch.no_grad():
        assert_close(exported(ids).logits, loaded.rack(ids), "model_logits", torch.float32)
