"""The ``stackwise`` command (also ``python -m stackwise``).

    stackwise train --config FILE|NAME [key.sub=value ...] [--run-dir DIR] [--resume | --overwrite]
    stackwise eval --run-dir DIR [--split val|train]
    stackwise generate --run-dir DIR --prompt TEXT [--max-new-tokens N] [--temperature T]
                       [--top-k K] [--top-p P] [--seed S] [--sampler ar|depth|diffusion]
    stackwise export --run-dir DIR --format hf OUT [--adapters merge|peft] [--dtype D]
    stackwise bench op [NAME ...] | e2e [ARGS ...]
    stackwise info [--json]
    stackwise plan --config FILE [--device-memory 80GB] [--end-to-end] [--json] [key=value ...]
    stackwise config show|validate FILE [key=value ...]
    stackwise config list
    stackwise config reference [--update docs/configuration.md]

Every command has --help. An error prints one line (``stackwise: error: ...``), naming the log
file that holds the traceback when there is one, and exits non-zero: 2 for bad input (options,
configuration, files), 1 for a failure while running, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

from stackwise.exceptions import StackWiseError

EXIT_USAGE, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``stackwise train: error: ...``) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- commands -------------------------------------------------------------------------------------


def _config_command(args: argparse.Namespace) -> int:
    if args.action == "reference":
        from stackwise.run.reference import config_reference, update_readme

        if args.update:
            changed = update_readme(args.update)
            print(f"{args.update}: {'updated' if changed else 'already up to date'}")
        else:
            sys.stdout.write(config_reference())
        return 0
    from stackwise.config.base import StackWiseConfig
    from stackwise.config.library import describe, library_configs, library_dir, resolve_config

    if args.action == "list":
        shipped = library_configs()
        width = max(len(name) for name in shipped)
        print(f"shipped configurations ({library_dir()}); stackwise train --config NAME")
        for name, path in shipped.items():
            print(f"  {name:<{width}}  {describe(path)}")
        return 0
    if args.file is None:
        raise _UsageError(f"config {args.action} needs a FILE")
    config = StackWiseConfig.from_yaml(resolve_config(args.file), overrides=args.overrides)
    config.validate()
    if args.action == "show":
        sys.stdout.write(config.to_yaml())
    else:
        print(f"{args.file}: valid")
    return 0


def _plan_command(args: argparse.Namespace) -> int:
    from stackwise.config.base import StackWiseConfig
    from stackwise.run.plan import parse_bytes, plan_run

    if args.config is None:
        raise _UsageError("plan needs --config FILE")
    from stackwise.config.library import resolve_config

    config = StackWiseConfig.from_yaml(resolve_config(args.config), overrides=args.overrides)
    config.validate()
    memory = parse_bytes(args.device_memory) if args.device_memory else None
    plan = plan_run(config, memory, end_to_end=args.end_to_end)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        sys.stdout.write(plan.table())
    return 0


def _info_command(args: argparse.Namespace) -> int:
    from stackwise.info import main as info_main

    return info_main(["--json"] if args.json else [])


def _train_command(args: argparse.Namespace) -> int:
    from stackwise.run.train import train_run

    overrides = list(args.overrides)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise _UsageError(f"{bad[0]!r} is not an override of the form key.sub=value")

    def _stop(signum, frame):  # a terminated run is recorded like an interrupted one
        raise KeyboardInterrupt

    config = args.config
    if config is not None:
        from stackwise.config.library import resolve_config

        config = str(resolve_config(config))
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        train_run(
            config,
            overrides,
            args.run_dir,
            resume=args.resume,
            overwrite=args.overwrite,
            use_bar=False if args.no_progress_bar else None,
            argv=["stackwise", *sys.argv[1:]],
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _eval_command(args: argparse.Namespace) -> int:
    from stackwise._io import atomic_write_text
    from stackwise.run.evaluate import evaluate_run, load_run

    run = load_run(args.run_dir, device=args.device)
    _print_notes(run.notes)
    result = evaluate_run(run, args.split, max_batches=args.max_batches)
    atomic_write_text(run.run_dir.root / f"eval-{args.split}.json", json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.split} split of {run.run_dir.root}: {result['tokens']:,} tokens")
    print(f"  loss              {result['loss']:.4f} nats/token")
    print(f"  perplexity        {result['perplexity']:.2f}")
    if result["bits_per_byte"] is not None:
        print(
            f"  bits per byte     {result['bits_per_byte']:.4f} "
            f"({result['bits_per_byte_quantity']})"
        )
    else:
        print("  bits per byte     not reported (the masked-token loss of mlm is no likelihood)")
    if result["masked_accuracy"] is not None:
        print(
            f"  masked accuracy   {100 * result['masked_accuracy']:.2f}% "
            f"(mask ratio {result['mask_ratio']:.2f})"
        )
    print(f"  unigram baseline  {result['unigram_loss']:.4f} nats/token")
    return 0


def _export_command(args: argparse.Namespace) -> int:
    import torch

    from stackwise.model.hf_export import export_hf
    from stackwise.run.evaluate import load_run

    run = load_run(args.run_dir, device="cpu")
    _print_notes(run.notes)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    out = export_hf(run.rack, args.out, run.tokenizer, args.adapters, dtype[args.dtype])
    print(f"wrote a Hugging Face Llama folder to {out}")
    if args.adapters == "peft":
        print(f"  LoRA adapters (PEFT layout) in {out / 'adapter'}")
    return 0


def _print_notes(notes: list[str]) -> None:
    for note in notes:
        print(f"stackwise: note: {note}", file=sys.stderr)


def _generate_command(args: argparse.Namespace) -> int:
    from stackwise.run import generate as g
    from stackwise.run.evaluate import load_run

    run = load_run(args.run_dir, device=args.device)
    _print_notes(run.notes)
    tok = run.tokenizer
    sampler = args.sampler or ("depth" if run.masked else "ar")
    if run.masked and sampler == "ar":
        raise _UsageError(
            "--sampler ar needs a causal (clm) rack; this one is "
            f"{run.config.training.progressive.training_objective}: use depth or diffusion"
        )
    if not run.masked and sampler != "ar":
        raise _UsageError(f"--sampler {sampler} needs an mlm or diffusion rack; this one is clm")
    if run.masked and tok.mask_token_id is None:
        raise _UsageError(f"tokenizer {tok.name!r} has no mask token; masked samplers need one")
    prompt = tok.encode(args.prompt)
    banned = (tok.mask_token_id, tok.pad_token_id)
    common = dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        banned=banned,
    )
    if sampler == "ar":
        ids = g.generate_causal(
            run.rack, prompt, args.max_new_tokens, use_cache=not args.no_cache, **common
        )
    elif sampler == "depth":
        ids = g.generate_depth(
            run.rack,
            run.config,
            prompt,
            args.max_new_tokens,
            mask_id=tok.mask_token_id,
            **common,
        )
    else:
        ids = g.generate_diffusion(
            run.rack,
            prompt,
            args.max_new_tokens,
            mask_id=tok.mask_token_id,
            steps=args.steps,
            **common,
        )
    if args.json:
        print(
            json.dumps(
                {
                    "sampler": sampler,
                    "prompt_tokens": len(prompt),
                    "ids": ids,
                    "text": tok.decode(ids),
                }
            )
        )
    else:
        print(tok.decode(ids))
    return 0


_OP_BENCHES = {
    "swiglu": "ops_swiglu.py",
    "norm_rope": "ops_norm_rope.py",
    "attention": "ops_attention.py",
    "linear_attention": "ops_linear_attention.py",
    "quant": "ops_quant.py",
    "cache": "cache_store.py",
}


def bench_dir() -> Path:
    """The repository's ``bench/`` folder (benchmarks run from a source checkout)."""
    import stackwise

    return Path(stackwise.__file__).resolve().parents[2] / "bench"


def _bench_command(args: argparse.Namespace) -> int:
    folder = bench_dir()
    if not folder.is_dir():
        raise StackWiseError(f"benchmarks live in a source checkout; {folder} does not exist")
    extra = list(args.args)
    if args.kind == "e2e":
        scripts = [("e2e_depth.py", extra)]
    else:
        # leading words name benchmarks; the first option and what follows go to each script
        n_names = next((i for i, a in enumerate(extra) if a.startswith("-")), len(extra))
        names, flags = extra[:n_names], extra[n_names:]
        unknown = [n for n in names if n not in _OP_BENCHES]
        if unknown:
            raise _UsageError(f"unknown benchmark {unknown[0]!r}; one of {sorted(_OP_BENCHES)}")
        scripts = [(_OP_BENCHES[n], flags) for n in (names or list(_OP_BENCHES))]
    for script, script_args in scripts:
        path = folder / script
        print(f"== {path.name} {' '.join(script_args)}", flush=True)
        rc = subprocess.call([sys.executable, str(path), *script_args], cwd=folder.parent)
        if rc != 0:
            raise StackWiseError(f"benchmark {path.name} exited with status {rc}")
    return 0


class _UsageError(StackWiseError):
    """Bad command-line input found after parsing."""


# -- parser ---------------------------------------------------------------------------------------


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="dotted overrides, e.g. training.lr=3e-4",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="stackwise", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    train = sub.add_parser(
        "train",
        help="train a rack progressively into a run directory",
        description="Train a rack stack by stack. Writes config.yaml, metrics.jsonl, train.log, "
        "checkpoints/, rack/, plots/ and summary.{json,md} into the run directory.",
    )
    train.add_argument(
        "--config",
        metavar="FILE",
        help="YAML configuration, or a shipped one by name (stackwise config list)",
    )
    _add_overrides(train)
    train.add_argument(
        "--run-dir", metavar="DIR", help="run directory (default runs/<config stem>)"
    )
    mode = train.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir from its last checkpoint",
    )
    mode.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    train.add_argument(
        "--no-progress-bar", action="store_true", help="plain log lines even on a terminal"
    )
    train.set_defaults(func=_train_command)

    ev = sub.add_parser(
        "eval",
        help="loss, perplexity, bits per byte (and masked accuracy) of a trained run",
        description="Evaluate a run's final rack on a split; also writes eval-<split>.json there.",
    )
    ev.add_argument(
        "--run-dir", metavar="DIR", required=True, help="a run directory of stackwise train"
    )
    ev.add_argument("--split", choices=["val", "train"], default="val")
    ev.add_argument(
        "--max-batches", type=int, metavar="N", help="evaluate the first N batches only"
    )
    ev.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the run's device")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=_eval_command)

    gen = sub.add_parser(
        "generate",
        help="sample text from a trained run",
        description="Causal racks: autoregressive sampling with a KV cache. Masked racks (mlm, "
        "diffusion): depth-as-time unmasking (one step per stack) or iterative masked diffusion.",
    )
    gen.add_argument("--run-dir", metavar="DIR", required=True)
    gen.add_argument("--prompt", required=True, metavar="TEXT")
    gen.add_argument(
        "--max-new-tokens",
        type=_new_tokens,
        default=64,
        metavar="N",
        help="tokens to generate, at most 65536 per call",
    )
    gen.add_argument(
        "--temperature", type=_non_negative_float, default=0.8, metavar="T", help="0: greedy"
    )
    gen.add_argument("--top-k", type=_positive_int, default=None, metavar="K")
    gen.add_argument("--top-p", type=_probability, default=None, metavar="P")
    gen.add_argument("--seed", type=int, default=0, metavar="S")
    gen.add_argument(
        "--sampler",
        choices=["ar", "depth", "diffusion"],
        help="default: ar for causal racks, depth for masked racks",
    )
    gen.add_argument(
        "--steps", type=_positive_int, default=16, help="steps of the diffusion sampler"
    )
    gen.add_argument("--no-cache", action="store_true", help="recompute the sequence every token")
    gen.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the run's device")
    gen.add_argument("--json", action="store_true", help="print ids and text as JSON")
    gen.set_defaults(func=_generate_command)

    export = sub.add_parser(
        "export",
        help="write a trained run as a Hugging Face model folder",
        description="Write the run's final rack as a transformers LlamaForCausalLM folder "
        "(config.json, model.safetensors, tokenizer.json). LoRA adapters are merged into the "
        "weights, or with --adapters peft written in PEFT's layout to OUT/adapter.",
    )
    export.add_argument("--run-dir", metavar="DIR", required=True)
    export.add_argument("--format", choices=["hf"], required=True, help="hf: Hugging Face")
    export.add_argument("out", metavar="OUT", help="output folder")
    export.add_argument("--adapters", choices=["merge", "peft"], default="merge")
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    export.set_defaults(func=_export_command)

    bench = sub.add_parser(
        "bench",
        help="run the benchmarks in bench/",
        description=f"op: the op benchmarks ({', '.join(_OP_BENCHES)}; all by default); e2e: "
        "the progressive vs end-to-end depth benchmark. Remaining arguments go to the scripts.",
    )
    bench.add_argument("kind", choices=["op", "e2e"])
    bench.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS")
    bench.set_defaults(func=_bench_command)

    plan = sub.add_parser(
        "plan",
        help="accelerator memory of each stage of a progressive run, without allocating it",
        description="Build the rack of a configuration on the meta device, stage by stage as the "
        "progressive trainer does, and print per stage the bytes of frozen weights (by "
        "precision), trainable weights, gradients, optimizer state and saved activations (with "
        "and without activation checkpointing), the activation cache's host/disk footprint, and "
        "whether the stage fits in --device-memory.",
    )
    plan.add_argument(
        "--config",
        metavar="FILE",
        help="YAML configuration, or a shipped one by name (stackwise config list)",
    )
    _add_overrides(plan)
    plan.add_argument(
        "--device-memory", metavar="SIZE", help="accelerator memory, e.g. 80GB (GB means GiB)"
    )
    plan.add_argument(
        "--end-to-end", action="store_true", help="plan the whole rack trained at once instead"
    )
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.set_defaults(func=_plan_command)

    info = sub.add_parser("info", help="versions, build record, ops and their kernels, GPUs")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=_info_command)

    cfg = sub.add_parser(
        "config",
        help="show or validate a configuration file; list the shipped ones; print the reference",
    )
    cfg.add_argument("action", choices=["show", "validate", "reference", "list"])
    cfg.add_argument(
        "file", nargs="?", help="YAML configuration or a shipped one's name (show, validate)"
    )
    _add_overrides(cfg)
    cfg.add_argument(
        "--update", metavar="FILE", help="reference: rewrite the generated section of this file"
    )
    cfg.set_defaults(func=_config_command)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _new_tokens(text: str) -> int:
    """--max-new-tokens, checked against the documented bound before the run is loaded."""
    from stackwise.run.generate import MAX_NEW_TOKENS

    value = _positive_int(text)
    if value > MAX_NEW_TOKENS:
        raise argparse.ArgumentTypeError(
            f"{value} exceeds the limit of {MAX_NEW_TOKENS} tokens per call"
        )
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def _probability(text: str) -> float:
    value = _non_negative_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} must be in (0, 1]")
    return value


# -- errors ---------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def _traceback_file(exc: BaseException) -> str:
    """Where the traceback of an unexpected error goes: the run's log, else a temp file."""
    path = getattr(exc, "log_path", None)
    if path:
        return path
    fd, name = tempfile.mkstemp(prefix="stackwise-error-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return name


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt as exc:
        where = getattr(exc, "log_path", None)
        hint = f" (log: {where}; continue with --resume)" if where else ""
        print(f"stackwise: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except StackWiseError as exc:
        where = getattr(exc, "log_path", None)
        hint = f" (details: {where})" if where else ""
        print(f"stackwise: error: {_one_line(exc)}{hint}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # an unexpected failure: one line, the traceback in a file
        where = _traceback_file(exc)
        print(
            f"stackwise: error: {type(exc).__name__}: {_one_line(exc)} (traceback: {where})",
            file=sys.stderr,
        )
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
