"""Output of the benchmark: CSV (upserted), markdown tables, PNG plots, environment metadata."""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import subprocess
from pathlib import Path

# The CSV key: one row per (impl, mode, M, D, dtype, gpu, fp32 matmul precision); a new run
# replaces its own rows. fp32 under 'highest' (IEEE) and under 'high' (tf32) are different rows.
CSV_KEY = ("impl", "mode", "M", "D", "dtype", "gpu", "fp32_precision")


# ---------------------------------------------------------------------------------------------
# Environment


def git_commit(repo: Path | None = None) -> str:
    """HEAD's commit, with ``-dirty`` when the work tree differs. Read-only: no optional locks."""
    repo = repo or Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "-C", str(repo), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("-dirty" if dirty else "")


def versions() -> dict[str, str]:
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return {"torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
            "cuda": str(torch.version.cuda), "git_commit": git_commit()}


# ---------------------------------------------------------------------------------------------
# CSV


def _key(row: dict) -> tuple:
    # the fp32 matmul precision changes only fp32 rows: 16-bit rows share one key whatever it was
    return tuple("" if k == "fp32_precision" and str(row.get("dtype")) != "fp32" else str(row.get(k, ""))
                 for k in CSV_KEY)


def upsert_csv(path: Path, rows: list[dict], columns: list[str]) -> list[dict]:
    """Merge ``rows`` into the CSV at ``path``: a row whose key (:data:`CSV_KEY`) is already there
    replaces it; the rest are appended. Returns every row now in the file."""
    path = Path(path)
    existing: list[dict] = []
    if path.exists():
        with open(path, newline="") as f:
            existing = list(csv.DictReader(f))
    fresh = {_key(r): r for r in rows}
    merged = [fresh.pop(_key(r)) if _key(r) in fresh else r for r in existing]
    merged += [r for r in rows if _key(r) in fresh]
    cols = list(columns) + sorted({k for r in merged for k in r} - set(columns))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in merged:
            w.writerow({k: _csv_value(r.get(k)) for k in cols})
    os.replace(tmp, path)
    return merged


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def write_json(path: Path, records: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(records, f, indent=1, default=str)


# ---------------------------------------------------------------------------------------------
# Markdown


def markdown_table(headers: list[str], rows: list[list]) -> str:
    cells = [[_md(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join([line, sep] + body)


def _md(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


# ---------------------------------------------------------------------------------------------
# Plots


#: What to print when the plots are skipped for want of matplotlib (the ``bench`` extra).
PLOTS_HINT = "plots skipped: matplotlib is not installed; for the plots: pip install -e '.[bench]'"


def have_matplotlib() -> bool:
    """Whether the plots can be drawn. Plots are optional: without matplotlib (the ``bench``
    extra) the bench still writes its JSON, CSV and markdown, prints :data:`PLOTS_HINT` and exits 0."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def progress_bar(**kwargs):
    """A tqdm bar, or None without tqdm (the ``bench`` extra). ``disable=None``: tqdm turns the bar
    off when its stream (stderr) is not a TTY, so CI logs and redirected output get no
    carriage-return updates."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    kwargs.setdefault("disable", None)
    return tqdm(**kwargs)


def slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s).strip("_").lower() or "x"


def plot_gpu(rows: list[dict], out_dir: Path, gpu: str) -> list[Path]:
    """Per (dtype, mode): fused speedup over each peer against D, and TFLOP/s of each impl against D.
    None drawn (``[]``) without matplotlib."""
    if not have_matplotlib():
        return []
    plt = _pyplot()
    # fp32 timed under tf32 is its own plot ("tf32"), not points among the IEEE ones
    rows = [dict(r, dtype="tf32") if r.get("dtype") == "fp32" and r.get("fp32_precision") not in (None, "", "highest")
            else r for r in rows if r.get("gpu") == gpu and _f(r.get("ms")) is not None]
    paths = []
    for dtype in sorted({r["dtype"] for r in rows}):
        for mode in sorted({r["mode"] for r in rows if r["dtype"] == dtype}):
            sel = [r for r in rows if r["dtype"] == dtype and r["mode"] == mode]
            if not sel:
                continue
            fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
            Ms = sorted({int(r["M"]) for r in sel})
            peers = sorted({k[len("speedup_vs_"):] for r in sel for k in r
                            if k.startswith("speedup_vs_") and _f(r.get(k)) is not None})
            for M in Ms:
                fused = sorted((int(r["D"]), r) for r in sel if r["impl"] == "fused" and int(r["M"]) == M)
                for peer in peers:
                    pts = [(d, _f(r.get(f"speedup_vs_{peer}"))) for d, r in fused]
                    pts = [(d, v) for d, v in pts if v is not None]
                    if pts:
                        ax1.plot(*zip(*pts), marker="o", label=f"vs {peer}, M={M}")
                for impl in sorted({r["impl"] for r in sel}):
                    pts = sorted((int(r["D"]), _f(r.get("tflops"))) for r in sel
                                 if r["impl"] == impl and int(r["M"]) == M and _f(r.get("tflops")) is not None)
                    if pts:
                        ax2.plot(*zip(*pts), marker="o", label=f"{impl}, M={M}")
            for ax in (ax1, ax2):
                ax.set_xscale("log", base=2)
                ax.set_xlabel("D")
                ax.grid(True, alpha=0.3)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7)
            ax1.axhline(1.0, color="gray", lw=0.8)
            ax1.set_ylabel("speedup of fused (x)")
            ax2.set_ylabel("TFLOP/s (GEMM FLOPs)")
            real = all(str(r.get("measured")) == "True" for r in sel)
            how = ("measured on the GPU (triton.testing.do_bench, median)" if real
                   else "NOT a GPU measurement (CPU stand-in timer)")
            fig.suptitle(f"{gpu}: {dtype} {mode}, {how}")
            fig.tight_layout()
            p = Path(out_dir) / f"{slug(gpu)}_{dtype}_{mode}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(p, dpi=110)
            plt.close(fig)
            paths.append(p)
    return paths


def _f(v):
    if v is None or v == "":
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x
