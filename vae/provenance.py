"""What made a result: the code's commit, the date, the versions and the machine.

Every entry point appends one line to `provenance.jsonl` in its output directory each time a
process writes there (a resumed training adds a line), so a number can be traced back to the
code and the hardware that produced it.
"""
from __future__ import annotations

import json
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyro
import torch

PROJECT_DIR = Path(__file__).resolve().parents[1]
PROVENANCE_NAME = "provenance.jsonl"


def git(*args: str) -> str | None:
    """The output of a git command in the project, or None outside a checkout."""
    try:
        result = subprocess.run(["git", *args], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def provenance(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The commit (and whether tracked files differed from it), the time, the versions of
    Python, torch and Pyro, the CPU, torch's thread count, the device and its GPU."""
    device = torch.device(device)
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(status) if status is not None else None,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def record_provenance(out_dir: Path, device: torch.device | str = "cpu", **extra: Any) -> dict[str, Any]:
    """Append this process's provenance (and `extra`, e.g. the epoch a run starts at) to
    out_dir/provenance.jsonl; return it."""
    entry = {**provenance(device), **extra}
    with open(Path(out_dir) / PROVENANCE_NAME, "a") as f:
        f.write(json.dumps(entry) + "\n")
    return entry


def read_provenance(out_dir: Path) -> list[dict[str, Any]]:
    """Every line of out_dir/provenance.jsonl, oldest first ([] when there is none)."""
    path = Path(out_dir) / PROVENANCE_NAME
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
