"""What a committed result records about where it came from: the machine and the commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((x.split(":", 1)[1].strip() for x in f if x.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "arch": platform.machine(), "torch": torch.__version__,
            "python": platform.python_version()}


def amd_cpu() -> bool:
    """Whether this is an AMD CPU, where the kernels choose differently (kernels/gemv_rows.h,
    blas.h): the benchmarks those choices move write their results to a file of their own there."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return "AuthenticAMD" in f.read(4096)
    except OSError:
        return False


def result_path(stem: str) -> str:
    """bench/results/STEM.json, or STEM_amd.json on an AMD CPU (amd_cpu)."""
    return f"bench/results/{stem}{'_amd' if amd_cpu() else ''}.json"


def commit() -> str:
    """HEAD, with "+dirty" when the library measured (src/) has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], capture_output=True, text=True,
                               cwd=ROOT).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def write_result(path: Path, result: dict, script: str, argv: list[str], threads: int) -> None:
    """`result` as JSON at `path`, with where it came from: the commit, the command, the machine."""
    import json

    result.update(commit=commit(), command=" ".join([script, *argv]), machine=machine(), threads=threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
