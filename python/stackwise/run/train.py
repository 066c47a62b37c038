"""``stackwise train``: one progressive training run, from a configuration file to a run directory
(layout in :mod:`stackwise.run.rundir`).

    summary = train_run("configs/shakespeare-tiny.yaml", overrides=["training.lr=3e-4"])

Data loaders come from :func:`~stackwise.data.create_data_loaders`; the rack grows in the
configured building mode with :class:`~stackwise.training.ProgressiveTrainer`, which checkpoints
each stage into ``<run>/checkpoints``; ``resume=True`` continues from the newest checkpoint. The
final rack is evaluated on the whole validation split and compared with the unigram baseline.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import IO, Any

import torch

from stackwise.exceptions import ConfigurationError
from stackwise.run.rundir import RunDirectory, default_run_dir
from stackwise.training.distributed import DistributedContext, report_rank_error


def _load_config(config_path, overrides, run: RunDirectory | None, resume: bool):
    from stackwise.config.base import StackWiseConfig

    if config_path is not None:
        config = StackWiseConfig.from_yaml(config_path, overrides=overrides)
    elif resume and run is not None:
        if not run.is_run():
            raise ConfigurationError(f"cannot resume: {run.root} holds no run (no config.yaml)")
        config = StackWiseConfig.from_yaml(run.config, overrides=overrides)
    else:
        raise ConfigurationError("--config FILE is required (or --resume with --run-dir)")
    from stackwise.model.hf_init import apply_init_from

    apply_init_from(config)  # training.init_from: the model section follows the pretrained model
    return config.validate()


def _check_tokenizer(config, tok) -> None:
    if config.model.vocab_size < tok.vocab_size:
        raise ConfigurationError(
            f"{config.model.vocab_size} is smaller than the vocabulary of tokenizer "
            f"{tok.name!r} ({tok.vocab_size})",
            "model.vocab_size",
        )


def _tokenizer_ids(tok) -> dict[str, int]:
    ids = {"mask": tok.mask_token_id, "pad": tok.pad_token_id, "eos": tok.eos_token_id}
    return {k: int(v) for k, v in ids.items() if v is not None}


def train_run(
    config_path: str | None,
    overrides: list[str] | tuple[str, ...] = (),
    run_dir: str | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stream: IO[str] | None = None,
    use_bar: bool | None = None,
    argv: list[str] | None = None,
) -> dict[str, Any]:
    """Train (or resume) a run; returns its summary (also written to ``summary.json``).

    Errors raised after the run directory exists carry ``log_path``: the ``train.log`` holding
    their traceback.
    """
    if run_dir is None:
        if config_path is None:
            raise ConfigurationError("--config FILE is required (or --resume with --run-dir)")
        run_dir = str(default_run_dir(config_path))
    from stackwise.data import create_data_loaders
    from stackwise.data.tokenizers import get_tokenizer
    from stackwise.run.evaluate import resolve_device

    run = RunDirectory(run_dir)
    if resume and overwrite:
        raise ConfigurationError("--resume and --overwrite exclude each other")
    # Everything that can be wrong with the input is found before the run directory is touched.
    config = _load_config(config_path, overrides, run, resume)
    resolve_device(config.training.device)  # 'cuda' with no GPU visible is refused here
    tok = get_tokenizer(config.data.tokenizer)
    _check_tokenizer(config, tok)
    # Under torchrun (WORLD_SIZE > 1) this joins the job; for one process it changes nothing.
    ctx = DistributedContext.from_env(config)
    try:
        # The same global batches for any number of processes (rank r reads its share of each).
        loaders = create_data_loaders(config, tokenizer=tok, distributed=ctx)
        if not ctx.is_main:
            # Rank 0 owns the run directory (files, logs, metrics, plots, checkpoints); the
            # other ranks train their share of every batch and write nothing.
            ctx.barrier()
            _train_worker(run, config, tok, loaders, resume)
            return {}
        run.prepare(resume=resume, overwrite=overwrite)
        ctx.barrier()
        return _train_main(run, config, tok, loaders, resume, stream, use_bar, argv)
    except BaseException as exc:
        if ctx.enabled:
            report_rank_error(exc, ctx.rank)
        raise
    finally:
        run.release()
        ctx.shutdown()


def _train_main(run, config, tok, loaders, resume, stream, use_bar, argv) -> dict[str, Any]:
    out = stream if stream is not None else sys.stdout
    log = open(run.log, "a", encoding="utf-8")  # noqa: SIM115 (closed below)
    try:
        return _train(run, config, tok, loaders, resume, out, log, use_bar, argv)
    except BaseException as exc:
        log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} FAILED\n{traceback.format_exc()}\n")
        log.flush()
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        try:
            run.update_run_json(status=status, error=f"{type(exc).__name__}: {exc}")
        except OSError:
            pass
        exc.log_path = str(run.log)  # type: ignore[attr-defined]
        raise
    finally:
        log.close()


def _trainer_and_builder(run: RunDirectory, config, tok, resume: bool):
    """The trainer and rack builder: from the newest checkpoint when resuming, else fresh (every
    rank of a data-parallel job builds the same ones)."""
    from stackwise.training import ProgressiveRackBuilder, ProgressiveTrainer

    ids = _tokenizer_ids(tok)
    if resume and (run.checkpoints / "latest").is_file():
        trainer, builder = ProgressiveTrainer.resume(str(run.checkpoints), config)
        trainer.set_tokenizer_ids(ids)
    else:
        torch.manual_seed(config.training.seed)
        prog = config.training.progressive
        builder = ProgressiveRackBuilder(config=config, building_mode=prog.building_mode)
        from stackwise.model.hf_init import seed_trunk

        seed_trunk(builder)  # the pretrained trunk of training.init_from, if any
        trainer = ProgressiveTrainer(config=config, tokenizer_ids=ids)
    trainer.checkpoint_dir = str(run.checkpoints)
    return trainer, builder


class _UnitsAsStages:
    """The hierarchical trainer's units reported through the run's stage callbacks (metrics,
    progress): unit k of n is stage k of n."""

    def __init__(self, callbacks: list, n_units: int, n_stacks: int) -> None:
        self.callbacks, self.n_units, self.n_stacks = callbacks, n_units, n_stacks
        self.stage = -1

    def _fields(self, info: dict[str, Any]) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "stack_index": info.get("index", self.stage),
            "n_stacks": self.n_stacks,
            "target_stacks": self.n_units,
            "mask_ratio": info.get("mask_ratio", 0.0),
        }

    def _call(self, event: str, info: dict[str, Any]) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is not None:
                fn({**info, **self._fields(info)})

    def on_unit_start(self, info: dict[str, Any]) -> None:
        self.stage += 1
        self._call("on_stage_start", info)

    def on_step(self, info: dict[str, Any]) -> None:
        self._call("on_step", info)

    def on_eval(self, info: dict[str, Any]) -> None:
        self._call("on_eval", info)

    def on_unit_end(self, record: dict[str, Any]) -> None:
        self._call("on_stage_end", record)


def _hierarchical_trainer(config, tok, resume: bool):
    """``training.progressive.enabled: false``: the hierarchical :class:`Trainer` in
    ``training.mode`` (``rackwise`` is the end-to-end baseline). These runs keep no
    checkpoints, so there is nothing to resume."""
    from stackwise.training import Trainer

    if resume:
        raise ConfigurationError(
            "--resume continues progressive runs only (they checkpoint every stage); a "
            f"training.mode {config.training.mode!r} run starts again with --overwrite",
            "training.progressive.enabled",
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigurationError(
            "data-parallel runs (torchrun) train progressively only; set it to true or "
            "launch one process",
            "training.progressive.enabled",
        )
    return Trainer(config, tokenizer_ids=_tokenizer_ids(tok))


def _train_worker(run: RunDirectory, config, tok, loaders, resume: bool) -> None:
    """A non-zero rank of a data-parallel run: the same training and its share of the final
    evaluation (whose sums rank 0 receives), no files and no output."""
    from stackwise.run.evaluate import LoadedRun, evaluate_run

    train_loader, val_loader = loaders
    trainer, builder = _trainer_and_builder(run, config, tok, resume)
    eval_loader = val_loader if len(val_loader.dataset) > 0 else None
    prog = config.training.progressive
    trainer.train_rack(builder, train_loader, prog.target_stacks, eval_loader=eval_loader)
    if eval_loader is not None:
        evaluate_run(LoadedRun(run, config, builder.rack, tok, trainer.device), "val")


def _train(
    run: RunDirectory, config, tok, loaders, resume: bool, out, log, use_bar, argv
) -> dict[str, Any]:
    from stackwise import __version__
    from stackwise.model.architecture import save_rack
    from stackwise.run import plots
    from stackwise.run.evaluate import LoadedRun, evaluate_run
    from stackwise.run.metrics import MetricsWriter, read_metrics, truncate_after
    from stackwise.run.progress import MetricsCallback, ProgressCallback, format_duration
    from stackwise.run.resume import checkpoint_global_step
    from stackwise.run.summary import build_summary, write_summary

    t0 = time.perf_counter()
    progress = ProgressCallback(config.training.log_every, out, log, use_bar)
    if not resume:
        config.to_yaml(run.config)
    train_loader, val_loader = loaders
    n_train, n_val = len(train_loader.dataset), len(val_loader.dataset)
    eval_loader = val_loader if n_val > 0 else None
    prog = config.training.progressive
    progress.line(f"run directory {run.root}" + (" (resumed)" if resume else ""))
    for note in run.notes:
        progress.line(note)
    progress.line(
        f"data: corpus {config.data.corpus!r}, tokenizer {tok.name}: "
        f"{len(train_loader.dataset.tokens):,} train tokens ({n_train} windows of "
        f"{train_loader.dataset.seq_len}), {len(val_loader.dataset.tokens):,} val tokens"
    )

    progressive = prog.enabled
    if progressive:
        trainer, builder = _trainer_and_builder(run, config, tok, resume)
    else:
        trainer, builder = _hierarchical_trainer(config, tok, resume), None
        trainer.backup_dir = str(run.checkpoints / "backups")  # mode fused: inside the run
    resumed_step = checkpoint_global_step(run.resume_folder) if resume else 0  # within a stage
    if progressive and resume and (run.checkpoints / "latest").is_file():
        progress.line(
            f"resuming after stage {len(trainer.history)} of {prog.target_stacks} "
            f"(global step {resumed_step})"
        )
    if resume:  # only once the checkpoint has loaded under it: a misfit keeps the old config
        config.to_yaml(run.config)
    global_step = lambda: sum(int(h.get("steps", 0)) for h in trainer.history)  # noqa: E731
    truncate_after(run.metrics, resumed_step, len(trainer.history))
    writer = MetricsWriter(run.metrics, str(run.tensorboard))
    metrics = MetricsCallback(writer, config.training.log_every, global_step)
    if progressive:
        trainer.callbacks = [metrics, progress]
    else:
        trainer.callbacks = [
            _UnitsAsStages([metrics, progress], trainer.n_units(), len(trainer.rack.stacks))
        ]
    run.update_run_json(
        status="running",
        tokenizer=tok.name,
        corpus=config.data.corpus,
        stackwise_version=__version__,
        command=argv if argv is not None else sys.argv,
        started=time.strftime("%Y-%m-%dT%H:%M:%S"),
        tensorboard=writer.tensorboard,
    )
    m = config.model
    if progressive:
        progress.line(
            f"model: {m.n_layers} blocks in {prog.target_stacks} stacks ({m.attention_type}, "
            f"d_model {m.d_model}), {prog.building_mode} mode, {prog.training_objective} "
            f"objective, {prog.trunk_strategy} trunk, device {trainer.device.type}"
        )
    else:
        progress.line(
            f"model: {len(trainer.rack.stacks)} stacks of {m.architecture.blocks_per_stack} "
            f"blocks ({m.attention_type}, d_model {m.d_model}), hierarchical training, "
            f"training.mode {trainer.mode!r} (training.progressive.enabled is false), "
            f"{prog.training_objective} objective, device {trainer.device.type}"
        )
    try:
        if progressive:
            trainer.train_rack(builder, train_loader, prog.target_stacks, eval_loader=eval_loader)
            rack = builder.rack
        else:
            trainer.train(None, train_loader, eval_loader=eval_loader)
            rack = trainer.rack
        save_rack(rack, run.rack)
        evaluation: dict[str, Any] = {}
        if eval_loader is not None:
            cap = config.training.eval_max_tokens
            progress.line(
                "evaluating the final rack on the whole validation split"
                if cap is None
                else f"evaluating the final rack on the first {cap:,} validation tokens "
                "(training.eval_max_tokens)"
            )
            loaded = LoadedRun(run, config, rack, tok, trainer.device)
            t_eval = time.perf_counter()
            evaluation = evaluate_run(loaded, "val")
            progress.line(
                f"evaluated {evaluation['scored_tokens']:,} tokens in "
                f"{time.perf_counter() - t_eval:.1f}s: loss {evaluation['loss']:.4f}"
            )
        wall = time.perf_counter() - t0
        records = read_metrics(run.metrics)
        summary = build_summary(
            records,
            evaluation,
            {
                "wall_s": wall,
                "parameters": rack.num_parameters(),
                "tokenizer": tok.name,
                "corpus": config.data.corpus,
                "device": trainer.device.type,
                "config": str(run.config),
                "run_dir": str(run.root),
            },
        )
        writer.write(
            "final",
            val_loss=evaluation.get("loss"),
            perplexity=evaluation.get("perplexity"),
            bits_per_byte=evaluation.get("bits_per_byte"),
            bits_per_byte_quantity=evaluation.get("bits_per_byte_quantity"),
            unigram_loss=evaluation.get("unigram_loss"),
            masked_accuracy=evaluation.get("masked_accuracy"),
            eval_tokens=evaluation.get("tokens"),
            eval_split_tokens=evaluation.get("split_tokens"),
            wall_s=summary["wall_s"],
        )
    finally:
        writer.close()
        progress.close()
    records = read_metrics(run.metrics)
    run.plots.mkdir(parents=True, exist_ok=True)
    plots.plot_loss(
        records,
        run.plots / "loss.png",
        baseline=evaluation.get("unigram_loss"),
        title=f"{Path(str(run.root)).name}: loss",
    )
    plots.plot_memory(records, run.plots / "memory.png")
    write_summary(run, summary)
    run.update_run_json(
        status="finished", finished=time.strftime("%Y-%m-%dT%H:%M:%S"), wall_s=summary["wall_s"]
    )
    if evaluation:
        bpb = evaluation["bits_per_byte"]
        progress.line(
            f"final: val loss {evaluation['loss']:.4f} (perplexity {evaluation['perplexity']:.1f}, "
            + (f"{bpb:.3f} bits/byte" if bpb is not None else "no bits/byte")
            + f"); unigram baseline {evaluation['unigram_loss']:.4f}"
        )
    progress.line(
        f"wall time {format_duration(summary['wall_s'])}; wrote {run.summary_md}, "
        f"{run.plots / 'loss.png'}, {run.rack}/"
    )
    return summary
