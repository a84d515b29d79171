"""The compile gate's summary, from ``python -m fusedres.aot --json PATH`` run in its own process.

The gate must run without ``TRITON_INTERPRET`` (the interpreter patches ``triton.language``), so it
is a subprocess with that variable removed. It can start in the background while the
interpreter measures traffic, and be collected at the end.
"""
from __future__ import annotations

import collections
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# --gate quick: the forward kernel's shipped configs on sm_90 in bf16 (the Hopper advisories
# are the leads a CPU machine can find); --gate full: fusedres.aot's own defaults (everything).
PRESETS = {
    "quick": ["--kernels", "fwd", "--archs", "sm_90", "--dtypes", "bf16", "--features", "base"],
    "full": [],
}


@dataclass
class GateRun:
    preset: str
    args: list
    proc: subprocess.Popen | None = None
    json_path: str | None = None
    stdout_path: str | None = None
    started: float = field(default_factory=time.perf_counter)
    note: str | None = None          # why there is no gate result


def available() -> bool:
    try:
        return importlib.util.find_spec("fusedres.aot") is not None
    except (ImportError, ValueError):
        return False


def start(preset: str = "quick", extra_args: list | None = None, jobs: int = 1) -> GateRun:
    """Start the gate in the background (a subprocess without TRITON_INTERPRET)."""
    args = list(PRESETS[preset]) + list(extra_args or []) + ["-j", str(jobs)]
    run = GateRun(preset, args)
    if not available():
        run.note = "fusedres.aot is not in this checkout: compile gate summary skipped"
        return run
    fd, run.json_path = tempfile.mkstemp(prefix="fusedres_gate_", suffix=".json")
    os.close(fd)
    fd, run.stdout_path = tempfile.mkstemp(prefix="fusedres_gate_", suffix=".log")
    os.close(fd)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fusedres.aot", "--json", run.json_path, *args]
    try:
        run.proc = subprocess.Popen(cmd, env=env, stdout=open(run.stdout_path, "w"), stderr=subprocess.PIPE,
                                    text=True, cwd=str(Path(__file__).resolve().parents[1]))
    except OSError as exc:
        run.note = f"could not start the compile gate: {exc}"
    return run


def collect(run: GateRun, timeout: float = 600, progress: bool = True) -> tuple[list | None, str]:
    """Wait for the gate, with a progress bar fed by its ``[n/total]`` lines. Returns
    ``(records or None, note)``."""
    if run.proc is None:
        return None, run.note or "compile gate not run"
    bar = None
    pattern = re.compile(r"^\[(\d+)/(\d+)\]")
    tail = collections.deque(maxlen=20)
    from .report import progress_bar
    deadline = time.perf_counter() + timeout
    for line in run.proc.stderr:
        tail.append(line.rstrip())
        m = pattern.match(line)
        if m and progress:
            n, total = int(m.group(1)), int(m.group(2))
            if bar is None:
                bar = progress_bar(total=total, desc="compile gate (fusedres.aot)", unit="compile", leave=False)
                progress = bar is not None      # no tqdm: no bar
            if bar is not None:
                bar.n = n
                bar.refresh()
        if time.perf_counter() > deadline:
            run.proc.kill()
            break
    try:
        rc = run.proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        run.proc.kill()
        rc = None
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - run.started
    records = None
    try:
        with open(run.json_path) as f:
            text = f.read()
        records = json.loads(text) if text.strip() else None
    except (OSError, json.JSONDecodeError):
        records = None
    finally:
        for p in (run.json_path, run.stdout_path):
            try:
                os.unlink(p)
            except OSError:
                pass
    if records is None:
        why = "timed out" if rc is None else f"exit status {rc}"
        detail = " | ".join(list(tail)[-3:])
        return None, f"compile gate produced no records ({why}): {detail}"
    return records, f"python -m fusedres.aot {' '.join(run.args)}: {wall:.0f} s"


def load(path: str) -> list:
    with open(path) as f:
        return json.load(f)


def summarize(records: list[dict]) -> str:
    """A few lines: counts, registers, spills, shared memory, tensor cores, advisories, failures."""
    if not records:
        return "compile gate: no records"
    ok = [r for r in records if r.get("ok")]
    failed = [r for r in records if not r.get("ok")]
    compiled = [r for r in records if r.get("registers") is not None]
    groups = collections.Counter((r.get("kernel"), r.get("arch"), r.get("dtype")) for r in records)
    lines = [f"compile gate: {len(records)} compiles ({len(groups)} kernel x arch x dtype groups), "
             f"{len(ok)} ok, {len(failed)} failed"]
    if compiled:
        regs = [r["registers"] for r in compiled]
        spills = sum(int(r.get("spill_bytes") or 0) for r in compiled)
        smem = max(compiled, key=lambda r: (r.get("shared_bytes") or 0) / max(1, r.get("shared_limit") or 1))
        tc_expected = [r for r in compiled if r.get("tensor_core_expected", True)]
        tc_present = [r for r in tc_expected if r.get("tensor_core")]
        lines.append(f"  registers/thread {min(regs)}-{max(regs)}; spill bytes total {spills}; largest shared "
                     f"memory {smem.get('shared_bytes', 0) / 1024:.0f} KB of {smem.get('shared_limit', 0) / 1024:.0f} KB "
                     f"({smem.get('kernel')} {smem.get('arch')} {smem.get('config_name') or smem.get('config')})")
        lines.append(f"  tensor-core instruction present in {len(tc_present)}/{len(tc_expected)} compiles that "
                     "should use tensor cores")
    adv = collections.Counter()
    for r in records:
        for a in r.get("advisories") or []:
            m = re.search(r"C\d{4}", a)
            adv[m.group(0) if m else a[:40]] += 1
    lines.append("  ptxas advisories: " + (", ".join(f"{k} x{v}" for k, v in adv.most_common()) or "none"))
    by = collections.defaultdict(list)
    for r in records:
        by[(r.get("kernel"), r.get("arch"), r.get("dtype"))].append(r)
    rows = []
    for (k, a, d), rs in sorted(by.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        regs = [r["registers"] for r in rs if r.get("registers") is not None]
        rows.append([k, a, d, len(rs), sum(bool(r.get("ok")) for r in rs),
                     f"{min(regs)}-{max(regs)}" if regs else "-",
                     sum(int(r.get("spill_bytes") or 0) for r in rs)])
    from .report import markdown_table
    lines.append(markdown_table(["kernel", "arch", "dtype", "configs", "ok", "registers", "spill B"], rows))
    for r in failed:
        why = ", ".join(r.get("failures") or []) or next(iter((r.get("error") or "").splitlines()), "")
        lines.append(f"  FAIL {r.get('kernel')} {r.get('arch')} {r.get('dtype')} "
                     f"{r.get('config_name') or r.get('config')}: {why}")
    return "\n".join(lines)
