"""``summary.json`` and ``summary.md``: the figures a finished run is judged by.

summary.json keys: ``val_loss``, ``perplexity``, ``bits_per_byte`` and
``bits_per_byte_quantity`` (what that figure measures, :mod:`stackwise.run.likelihood`: the
next-token cross entropy of causal racks, the masked-diffusion ELBO bound of diffusion racks;
both null for mlm racks), ``masked_accuracy``,
``unigram_loss`` (the validation tokens under training-split unigram frequencies),
``beats_unigram_by`` (unigram_loss - val_loss, nats), ``tokens_per_s`` (training tokens over
training time, all stages), ``wall_s`` (the whole command: data, training, evaluation),
``train_s``, ``peak_memory_bytes`` (largest stage peak), ``parameters``, ``tokenizer``,
``corpus``, ``device``, ``config``, ``stages`` (per stage: stage, stack_index, steps, wall_s,
tokens_per_s, train_loss, eval_loss, peak_memory_bytes).
"""

from __future__ import annotations

import json
from typing import Any

from stackwise._io import atomic_write_text
from stackwise.run.progress import format_bytes, format_duration
from stackwise.run.rundir import RunDirectory


def build_summary(
    records: list[dict[str, Any]], evaluation: dict[str, Any], extra: dict[str, Any]
) -> dict[str, Any]:
    ends = [r for r in records if r.get("type") == "stage_end"]
    stages = [
        {
            k: r.get(k)
            for k in (
                "stage",
                "stack_index",
                "steps",
                "wall_s",
                "tokens_per_s",
                "train_loss",
                "eval_loss",
                "peak_memory_bytes",
            )
        }
        for r in ends
    ]
    tokens = sum(r.get("tokens", 0) for r in ends)
    train_s = sum(r.get("wall_s", 0.0) for r in ends)
    val, uni = evaluation.get("loss"), evaluation.get("unigram_loss")
    return {
        "val_loss": val,
        "perplexity": evaluation.get("perplexity"),
        "bits_per_byte": evaluation.get("bits_per_byte"),
        "bits_per_byte_quantity": evaluation.get("bits_per_byte_quantity"),
        "masked_accuracy": evaluation.get("masked_accuracy"),
        "unigram_loss": uni,
        "beats_unigram_by": (uni - val) if val is not None and uni is not None else None,
        "val_tokens": evaluation.get("tokens"),
        "tokens_per_s": tokens / train_s if train_s > 0 else None,
        "train_s": train_s,
        "peak_memory_bytes": max((r.get("peak_memory_bytes", 0) for r in ends), default=None),
        "stages": stages,
        **extra,
    }


def summary_markdown(summary: dict[str, Any]) -> str:
    s = summary
    lines = [
        f"# Run summary: {s.get('config', '')}",
        "",
        f"- validation loss **{s['val_loss']:.4f}** nats/token (perplexity {s['perplexity']:.1f})"
        if s.get("val_loss") is not None
        else f"- validation loss {s.get('val_loss')}",
        f"- {s['bits_per_byte']:.3f} bits per byte: {s.get('bits_per_byte_quantity')}"
        if s.get("bits_per_byte") is not None
        else "- bits per byte: not reported (no likelihood for this objective)",
        f"- unigram baseline {s['unigram_loss']:.4f} nats/token; the rack is "
        f"{abs(s['beats_unigram_by']):.3f} nats "
        f"{'below' if s['beats_unigram_by'] > 0 else 'above (worse than)'} it"
        if s.get("beats_unigram_by") is not None
        else "- unigram baseline: n/a",
    ]
    if s.get("masked_accuracy") is not None:
        lines.append(f"- masked-token accuracy {100 * s['masked_accuracy']:.1f}%")
    lines += [
        f"- {s.get('parameters', 0) / 1e6:.2f} M parameters, tokenizer {s.get('tokenizer')}, "
        f"corpus {s.get('corpus')}, device {s.get('device')}",
        f"- wall time {format_duration(s.get('wall_s') or 0)} (training "
        f"{format_duration(s.get('train_s') or 0)}), {s.get('tokens_per_s') or 0:.0f} tokens/s, "
        f"peak memory {format_bytes(s.get('peak_memory_bytes') or 0)}",
        "",
        "| stage | stack position | steps | wall time | tokens/s | train loss | val loss "
        "| peak memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for st in s.get("stages", []):
        tl = f"{st['train_loss']:.4f}" if st.get("train_loss") is not None else "—"
        vl = f"{st['eval_loss']:.4f}" if st.get("eval_loss") is not None else "—"
        lines.append(
            f"| {st['stage'] + 1} | {st['stack_index']} | {st['steps']} | "
            f"{format_duration(st['wall_s'])} | {st['tokens_per_s']:.0f} | {tl} | {vl} | "
            f"{format_bytes(st['peak_memory_bytes'])} |"
        )
    lines += ["", "Plots: `plots/loss.png`, `plots/memory.png`.", ""]
    return "\n".join(lines)


def write_summary(run: RunDirectory, summary: dict[str, Any]) -> None:
    atomic_write_text(run.summary_json, json.dumps(summary, indent=2) + "\n")
    atomic_write_text(run.summary_md, summary_markdown(summary))
