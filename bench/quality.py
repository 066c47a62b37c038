"""Quality benchmark: is a progressively trained rack a better model than what the same memory
and time train end to end?

Every arm is a ``stackwise train`` configuration (:data:`quality_arms.ARMS`: the shared model
and optimizer, plus the arm's overrides) trained by :class:`ProgressiveTrainer` in its own
subprocess; the end-to-end baselines are racks of one stack (one stage trains everything).
All arms read the same global batch order (Shakespeare; stage k of a progressive run reads the
batches after those of stages 0..k-1) and are scored on the same held-out batches.

Budgets: ``tokens`` (every arm takes ``--steps`` optimizer steps) and ``time`` (each
progressive arm's steps are scaled by its speed relative to the shallow end-to-end arm, so both
train for about as long). The speed is calibrated first: short runs of the arm and of
e2e_shallow side by side, in rounds, so the load of a shared machine falls on both alike (the
median ratio of seconds per step; ``--calibrate-steps``, ``--calibrate-rounds``). Training time
is the sum of the optimizer steps and the cache fills; evaluation is not counted.

Memory, per stage, split into what would live on the accelerator (parameters and buffers of the
rack, gradients, optimizer state, the tensors autograd saves for the backward pass, counted with
``torch.autograd.graph.saved_tensors_hooks`` at every step) and what the activation cache holds
in host memory or on disk. The shallow end-to-end depth is the deepest whose accelerator-side
training memory does not exceed the progressive stage's (``--shallow-depth auto`` measures it).

    python bench/quality.py [--steps 400] [--tokenizer bytes|gpt2] [--arms e2e_full ...]
                            [--budgets tokens time] [--shallow-depth auto|N]
                            [--json bench/quality_results/bytes-400.json] [--plot docs/quality.png]
    python bench/quality.py --write-configs DIR [--steps 400]   # each arm as a YAML file
    stackwise train --config DIR/prog_copy_consolidate.yaml      # one arm, as a user runs it

The machine is shared: wall times are noisy, so compared arms run back to back in one call.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_arms import ARMS, arm_config  # noqa: E402
from quality_worker import run_arm  # noqa: E402


def _spawn(arm: str, steps: int, args, shallow: int, eval_every: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        arm,
        "--steps",
        str(steps),
        "--tokenizer",
        args.tokenizer,
        "--shallow-depth",
        str(shallow),
        "--eval-batches",
        str(args.eval_batches),
        "--eval-every",
        str(eval_every),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if res.returncode != 0:
        raise RuntimeError(f"arm {arm} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _probe_shallow(args) -> tuple[int, list[dict]]:
    """Accelerator-side memory of one step at each end-to-end depth and of the progressive
    stages; the deepest end-to-end rack that fits the largest stage."""
    stage = _spawn("prog_untied_copy", 4, args, 2, 0)
    budget = max(s["accel_bytes"] for s in stage["stages"])
    rows = [{"arm": "progressive stage", "accel_bytes": budget}]
    best = 1
    for depth in range(1, 9):
        r = _spawn("e2e_shallow", 1, args, depth, 0)
        need = r["stages"][0]["accel_bytes"]
        rows.append({"arm": f"end-to-end {depth} blocks", "accel_bytes": need})
        if need <= budget:
            best = depth
    return best, rows


def _calibrate(args, shallow: int, arms: list[str]) -> dict[str, dict]:
    """Each arm's training time per step relative to e2e_shallow's. In each of
    ``--calibrate-rounds`` rounds, every arm runs ``--calibrate-steps`` steps in its own process
    *at the same time* as an e2e_shallow run of as many steps (two processes side by side), so
    whatever else loads the machine slows both alike; the arm's factor is the median over rounds
    of (e2e_shallow's seconds per step) / (the arm's seconds per step)."""
    out: dict[str, dict] = {}
    n = args.calibrate_steps
    with ThreadPoolExecutor(max_workers=2) as pool:
        for arm in arms:
            ratios, pairs = [], []
            for _ in range(args.calibrate_rounds):
                ref_job = pool.submit(_spawn, "e2e_shallow", n, args, shallow, 0)
                arm_job = pool.submit(_spawn, arm, n, args, shallow, 0)
                ref, got = ref_job.result(), arm_job.result()
                ref_sps, arm_sps = ref["train_s"] / ref["steps"], got["train_s"] / got["steps"]
                ratios.append(ref_sps / arm_sps)
                pairs.append({"e2e_shallow_s_per_step": ref_sps, "arm_s_per_step": arm_sps})
            ratios.sort()
            out[arm] = {"scale": ratios[len(ratios) // 2], "rounds": pairs}
            print(f"calibration {arm}: {out[arm]['scale']:.3f} x the steps of e2e_shallow")
    return out


def _run_all(args, shallow: int, parser) -> tuple[list[dict], dict]:
    """Equal-time calibration (:func:`_calibrate`), then every arm at equal tokens and each
    non-end-to-end arm at equal time, ``--parallel`` arms at a time. Each result is appended to
    ``<json>.partial.jsonl`` as it arrives."""
    if "time" in args.budgets and "e2e_shallow" not in args.arms:
        parser.error("the 'time' budget needs the e2e_shallow arm")
    every = args.eval_every or max(1, args.steps // 8)
    timed_arms = [a for a in args.arms if not a.startswith("e2e")] if "time" in args.budgets else []
    calibration = _calibrate(args, shallow, timed_arms) if timed_arms else {}
    partial = Path(args.json + ".partial.jsonl")
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_text("")
    rows: list[dict] = []
    t0 = time.time()
    lock = threading.Lock()

    def record(r: dict, note: str) -> None:
        with lock:
            rows.append(r)
            with partial.open("a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"[{time.time() - t0:7.0f} s] {r['budget']} {r['arm']}: {note}", flush=True)

    def tokens(arm: str) -> dict:
        r = {**_spawn(arm, args.steps, args, shallow, every), "budget": "tokens"}
        record(r, f"{r['eval_bpb']:.3f} bpb, {r['train_s']:.0f} s")
        return r

    def timed(arm: str) -> None:
        scale = calibration[arm]["scale"]
        steps = max(4, int(round(args.steps * scale)))
        t = _spawn(arm, steps, args, shallow, max(1, steps // 8))
        t.update(budget="time", time_scale=scale)
        record(t, f"{steps} steps, {t['train_s']:.0f} s, {t['eval_bpb']:.3f} bpb")

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = {arm: pool.submit(tokens, arm) for arm in args.arms}
        timed_jobs = [pool.submit(timed, arm) for arm in timed_arms]
        for job in [*futures.values(), *timed_jobs]:
            job.result()
    if timed_arms:
        ref = next(r for r in rows if r["arm"] == "e2e_shallow")
        rows.append({**ref, "budget": "time"})
    order = {a: i for i, a in enumerate(args.arms)}
    rows.sort(key=lambda r: (r["budget"] != "tokens", order[r["arm"]]))
    return rows, calibration


def _print_table(rows: list[dict]) -> None:
    print(
        f"{'budget':<7} {'arm':<28} {'steps':>6} {'tokens':>9} {'eval bpb':>8} "
        f"{'train s':>8} {'accel MiB':>9} {'cache MiB':>9}  per-stage bpb"
    )
    for r in rows:
        stages = " > ".join(f"{s['eval_bpb']:.2f}" for s in r["stages"])
        print(
            f"{r['budget']:<7} {r['arm']:<28} {r['steps']:>6} {r['tokens']:>9} "
            f"{r['eval_bpb']:>8.3f} {r['train_s']:>8.1f} {r['accel_peak_bytes'] / 2**20:>9.1f} "
            f"{r['cache_peak_bytes'] / 2**20:>9.1f}  {stages}"
        )


def markdown_table(rows: list[dict]) -> str:
    """The README's table: one line per arm and budget."""
    out = [
        "| budget | arm | what it is | steps | held-out bpb | bpb after each stage | train s "
        "| accelerator MiB (params / grads / optimizer / saved) | cache MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    mib = 2**20
    for r in rows:
        peak = max(r["stages"], key=lambda s: s["accel_bytes"])
        parts = " / ".join(
            f"{peak[k] / mib:.1f}"
            for k in ("param_bytes", "grad_bytes", "optimizer_bytes", "saved_activation_bytes")
        )
        stages = " → ".join(f"{s['eval_bpb']:.2f}" for s in r["stages"])
        out.append(
            f"| {r['budget']} | `{r['arm']}` | {ARMS[r['arm']][0]} | {r['steps']} | "
            f"**{r['eval_bpb']:.3f}** | {stages} | {r['train_s']:.0f} | "
            f"{r['accel_peak_bytes'] / mib:.1f} ({parts}) | {r['cache_peak_bytes'] / mib:.1f} |"
        )
    return "\n".join(out)


def _plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for r in rows:
        r.setdefault("panel", f"equal {r['budget']}")
    panels = list(dict.fromkeys(r["panel"] for r in rows))
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 4.8 * nrows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for r in rows:
            if r["panel"] != panel:
                continue
            xs = [p["train_s"] for p in r["curve"]]
            ys = [p["eval_bpb"] for p in r["curve"]]
            style = "--" if r["arm"].startswith("e2e") else "-"
            ax.plot(xs, ys, style, marker=".", label=f"{r['arm']} ({r['eval_bpb']:.2f})")
        ax.set_xlabel("training time (s)")
        ax.set_ylabel("held-out bits per byte")
        ax.set_title(panel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=400, help="total optimizer steps (400-3200)")
    p.add_argument("--tokenizer", default="bytes", choices=("bytes", "gpt2"))
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--budgets", nargs="+", default=["tokens", "time"], choices=("tokens", "time"))
    p.add_argument("--shallow-depth", default="2", help="blocks of e2e_shallow, or 'auto'")
    p.add_argument("--eval-batches", type=int, default=16, help="held-out batches of 16 x 128")
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations")
    p.add_argument("--parallel", type=int, default=1, help="arms trained at the same time")
    p.add_argument(
        "--calibrate-steps", type=int, default=64, help="steps of each equal-time calibration run"
    )
    p.add_argument("--calibrate-rounds", type=int, default=3, help="calibration runs per arm")
    p.add_argument(
        "--json",
        default=None,
        help="result file (default: bench/quality_results/<tokenizer>-<steps>.json, committed)",
    )
    p.add_argument("--plot", default="docs/quality.png")
    p.add_argument(
        "--write-configs",
        metavar="DIR",
        help="write each arm's configuration as DIR/<arm>.yaml (for stackwise train) and exit",
    )
    p.add_argument(
        "--report",
        metavar="JSON",
        nargs="+",
        help="print result files (or .partial.jsonl files) as a markdown table and draw them "
        "all in --plot, one panel per file and budget",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.json is None:
        args.json = f"bench/quality_results/{args.tokenizer}-{args.steps}.json"
    if args.report:
        rows = []
        for path in args.report:
            text = Path(path).read_text()
            if path.endswith(".jsonl"):
                got = [json.loads(line) for line in text.splitlines() if line.strip()]
                name = Path(path).name.split(".")[0]
            else:
                doc = json.loads(text)
                got, name = doc["rows"], f"{doc['tokenizer']}, {doc['steps']} steps"
            for r in got:
                r["panel"] = f"{name}, equal {r['budget']}"
            rows += got
        print(markdown_table(rows))
        _plot(rows, args.plot, "Shakespeare, held-out bits per byte against training time")
        print(f"wrote {args.plot}")
        return 0
    if args.write_configs:
        shallow = 2 if args.shallow_depth == "auto" else int(args.shallow_depth)
        Path(args.write_configs).mkdir(parents=True, exist_ok=True)
        n = 0
        for arm in args.arms:
            cfg = arm_config(arm, args.steps, args.tokenizer, shallow)
            cfg.to_yaml(Path(args.write_configs) / f"{arm}.yaml")
            n += 1
            if arm in ("e2e_full", "e2e_shallow"):  # the same model, end-to-end trainer
                cfg.training.progressive.enabled = False
                cfg.training.mode = "rackwise"
                cfg.validate().to_yaml(Path(args.write_configs) / f"{arm}_rackwise.yaml")
                n += 1
        print(f"wrote {n} configurations to {args.write_configs}")
        return 0
    if args.worker:
        shallow = int(args.shallow_depth)
        print(json.dumps(run_arm(args.worker, args.steps, args, shallow, args.eval_every)))
        return 0
    if args.steps < 4:
        p.error("--steps must be at least 4 (one per stage)")
    probe = []
    if args.shallow_depth == "auto":
        shallow, probe = _probe_shallow(args)
        print(f"shallow end-to-end depth with the memory of one stage: {shallow} blocks")
    else:
        shallow = int(args.shallow_depth)
    rows, calibration = _run_all(args, shallow, p)
    if "tokens" not in args.budgets:
        rows = [r for r in rows if r["budget"] == "time" or r["arm"] == "e2e_shallow"]
    _print_table(rows)
    from harness import environment
    from stackwise._io import atomic_write_text

    env = environment("cpu")
    out = {
        "benchmark": "quality",
        "command": "python bench/quality.py " + " ".join(argv or sys.argv[1:]),
        "environment": env,
        "steps": args.steps,
        "tokenizer": args.tokenizer,
        "shallow_depth": shallow,
        "memory_probe": probe,
        "time_calibration": calibration,
        "configs": {a: arm_config(a, args.steps, args.tokenizer, shallow).to_dict() for a in ARMS},
        "rows": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.json, json.dumps(out, indent=2))
    title = (
        f"Shakespeare ({args.tokenizer}), {args.steps} steps, d_model 128, "
        f"{env.get('cpu_threads')} CPU threads"
    )
    _plot(rows, args.plot, title)
    print(f"wrote {args.json} and {args.plot}")
    return 0 if all(math.isfinite(r["eval_bpb"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
