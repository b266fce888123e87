"""The environment stamp of a run: when, which code, which machine, which libraries.

Every probe degrades to ``"unknown"`` or None rather than failing: a stamp must
never stop a run.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ringbench import __version__

UNKNOWN = "unknown"


def git_state(start: Path) -> dict[str, Any]:
    """Commit and dirty flag of the checkout holding ``start``; "unknown" outside one."""
    try:
        import git

        repo = git.Repo(start, search_parent_directories=True)
        return {"commit": repo.head.commit.hexsha, "dirty": repo.is_dirty(untracked_files=False)}
    except Exception:  # no git binary, no checkout, no commits yet: all mean "unknown"
        return {"commit": UNKNOWN, "dirty": None}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or UNKNOWN


def _nvidia_driver() -> str:
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        )
        return result.stdout.strip().splitlines()[0]
    except Exception:  # no nvidia-smi, no driver, or an unexpected answer
        return UNKNOWN


def _gpus() -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append({
            "index": index,
            "name": props.name,
            "memory_mib": props.total_memory // 2**20,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
        })
    return gpus


def _nccl_version() -> str | None:
    try:
        return ".".join(str(part) for part in torch.cuda.nccl.version())
    except Exception:  # built without NCCL
        return None


def snapshot(device: torch.device) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": git_state(Path.cwd()),
        "ringbench_version": __version__,
        "device": str(device),
        "hostname": socket.gethostname(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpus": _gpus(),
        "driver": _nvidia_driver() if cuda else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "nccl": _nccl_version() if cuda else None,
        "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    }
