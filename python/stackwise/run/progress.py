"""Trainer callbacks of ``stackwise train``: progress on the terminal and in ``train.log``, and
the records of ``metrics.jsonl``.

On a terminal, a tqdm bar per stage (``stack k/N``, step, loss, learning rate, tokens/s, the
stage's ETA and the run's); otherwise (a pipe, a CI log) one plain line every
``training.log_every`` steps. Either way the plain lines go to ``train.log``.

Callbacks follow :class:`~stackwise.training.progressive.ProgressiveTrainer`'s protocol:
``on_stage_start(info)``, ``on_step(info)``, ``on_eval(info)``, ``on_stage_end(record)``.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from stackwise.run.metrics import SCHEMA, MetricsWriter


def format_duration(seconds: float) -> str:
    """``"42s"``, ``"3m05s"``, ``"1h02m"``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def format_bytes(n: float) -> str:
    return f"{n / 2**20:.0f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


class MetricsCallback:
    """Writes ``stage_start``, ``step`` (every ``log_every`` steps and the stage's last),
    ``eval`` and ``stage_end`` records. ``steps_before`` returns the global step at which the
    stage starting now begins (the trainer's ``global_step``)."""

    STEP_KEYS = SCHEMA["step"]

    def __init__(self, writer: MetricsWriter, log_every: int, steps_before=lambda: 0) -> None:
        self.writer = writer
        self.log_every = max(1, log_every)
        self.steps_before = steps_before
        self._base = 0

    def on_stage_start(self, info: dict[str, Any]) -> None:
        self._base = int(self.steps_before())
        self.writer.write(
            "stage_start",
            stage=info["stage"],
            stack_index=info["stack_index"],
            n_stacks=info["n_stacks"],
            target_stacks=info["target_stacks"],
            steps=info["steps"],
            mask_ratio=info["mask_ratio"],
            global_step=self._base,
            cache_fill_s=info["cache_fill_s"],
        )

    def on_step(self, info: dict[str, Any]) -> None:
        if info["step"] % self.log_every == 0 or info["step"] == info["steps"]:
            self.writer.write("step", **{k: info[k] for k in self.STEP_KEYS})

    def on_eval(self, info: dict[str, Any]) -> None:
        self.writer.write(
            "eval",
            stage=info["stage"],
            step=info["step"],
            global_step=info["global_step"],
            eval_loss=info["eval_loss"],
        )

    def on_stage_end(self, record: dict[str, Any]) -> None:
        losses = record.get("losses") or []
        tail = losses[-max(1, len(losses) // 10) :] if losses else []
        self.writer.write(
            "stage_end",
            stage=record["stage"],
            stack_index=record["stack_index"],
            n_stacks=record["n_stacks"],
            steps=record["steps"],
            global_step=self._base + record["steps"],
            train_loss=sum(tail) / len(tail) if tail else None,
            eval_loss=record.get("eval_loss"),
            tokens=record["tokens"],
            tokens_per_s=record["tokens_per_s"],
            wall_s=record["wall_s"],
            cache_fill_s=record["cache_fill_s"],
            peak_memory_bytes=record["peak_memory_bytes"],
            mask_ratio=record["mask_ratio"],
        )


class ProgressCallback:
    """tqdm bars on a terminal, plain lines elsewhere; plain lines always to ``log_file``."""

    def __init__(
        self,
        log_every: int,
        stream: IO[str] | None = None,
        log_file: IO[str] | None = None,
        use_bar: bool | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.log_file = log_file
        self.log_every = max(1, log_every)
        self.use_bar = self.stream.isatty() if use_bar is None else use_bar
        self._bar = None
        self._stage: dict[str, Any] = {}
        self._t_stage = time.perf_counter()
        self._warmup_said = False

    # -- output ---------------------------------------------------------------------------------

    def line(self, text: str) -> None:
        """A plain line: on the stream (through tqdm when a bar is open) and in the log."""
        if self.log_file is not None:
            self.log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
            self.log_file.flush()
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def _log_only(self, text: str) -> None:
        if self.log_file is not None:
            self.log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
            self.log_file.flush()

    def _tag(self, stage: int) -> str:
        return f"stack {stage + 1}/{self._stage.get('target_stacks', '?')}"

    # -- callbacks ------------------------------------------------------------------------------

    def on_stage_start(self, info: dict[str, Any]) -> None:
        self._stage = dict(info)
        self._t_stage = time.perf_counter()
        self._say_warmup(info)
        ratio = f", mask ratio {info['mask_ratio']:.2f}" if info["mask_ratio"] else ""
        self.line(
            f"[{self._tag(info['stage'])}] training stack at position {info['stack_index']} "
            f"({info['steps']} steps, groups {', '.join(info['param_groups'])}{ratio}"
            + (
                f", cache filled in {info['cache_fill_s']:.1f}s"
                if info["cache_fill_s"] > 0.05
                else ""
            )
            + ")"
        )
        if self.use_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=info["steps"],
                desc=self._tag(info["stage"]),
                unit="step",
                file=self.stream,
                dynamic_ncols=True,
                leave=True,
            )

    def _say_warmup(self, info: dict[str, Any]) -> None:
        """One line, the first time a stage shortens the configured warmup
        (:func:`stackwise.training.optim.effective_warmup`): what it was, what it became, why."""
        configured = info.get("warmup_steps_configured", 0)
        used = info.get("warmup_steps", configured)
        if self._warmup_said or used == configured:
            return
        self._warmup_said = True
        self.line(
            f"warmup: training.optimizer.warmup_steps={configured} is not shorter than this "
            f"stage's {info['steps']} steps, so the learning rate would never reach its peak; "
            f"shortened to {used} (a tenth of the stage's steps) in every stage it does not fit"
        )

    def _eta(self, info: dict[str, Any]) -> tuple[float, float]:
        elapsed = time.perf_counter() - self._t_stage
        per_step = elapsed / max(1, info["step"])
        stage_left = per_step * (info["steps"] - info["step"])
        later = self._stage.get("target_stacks", 1) - info["stage"] - 1
        return stage_left, stage_left + later * per_step * info["steps"]

    def on_step(self, info: dict[str, Any]) -> None:
        stage_eta, run_eta = self._eta(info)
        text = (
            f"[{self._tag(info['stage'])}] step {info['step']}/{info['steps']} "
            f"(global {info['global_step']}) loss {info['loss']:.4f} lr {info['lr']:.2e} "
            f"tok/s {info['tokens_per_s']:.0f} eta {format_duration(stage_eta)} "
            f"(run ~{format_duration(run_eta)})"
        )
        periodic = info["step"] % self.log_every == 0 or info["step"] == info["steps"]
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(
                f"loss {info['loss']:.3f} lr {info['lr']:.1e} tok/s {info['tokens_per_s']:.0f} "
                f"run eta ~{format_duration(run_eta)}",
                refresh=False,
            )
            if periodic:
                self._log_only(text)
        elif periodic:
            self.line(text)

    def on_eval(self, info: dict[str, Any]) -> None:
        self.line(
            f"[{self._tag(info['stage'])}] eval at step {info['step']} "
            f"(global {info['global_step']}): val loss {info['eval_loss']:.4f}"
        )

    def on_stage_end(self, record: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        val = record.get("eval_loss")
        self.line(
            f"[{self._tag(record['stage'])}] done: {record['steps']} steps in "
            f"{format_duration(record['wall_s'])}, {record['tokens_per_s']:.0f} tok/s, peak "
            f"memory {format_bytes(record['peak_memory_bytes'])}"
            + (f", val loss {val:.4f}" if val is not None else "")
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
