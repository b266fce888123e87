"""The environment stamp of a run: when, which code, which machine, which libraries.

Every probe degrades to ``"unknown"`` or None rather than failing: a stamp must
never stop a run.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
import torch

from ringbench import __version__
from ringbench.errors import ConfigError
from ringbench.run import clocks

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


def _nvidia_smi(*arguments: str) -> str | None:
    """nvidia-smi's output, or None where there is no nvidia-smi or it fails."""
    try:
        result = subprocess.run(["nvidia-smi", *arguments], capture_output=True, text=True, timeout=20, check=True)
        return result.stdout.strip()
    except Exception:  # no nvidia-smi, no driver, a hung query: the stamp goes on without it
        return None


def _query(fields: list[str]) -> list[dict[str, str]]:
    """One row per GPU of nvidia-smi --query-gpu, keyed by field; empty without nvidia-smi."""
    output = _nvidia_smi(f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits")
    if not output:
        return []
    return [dict(zip(fields, (value.strip() for value in line.split(",")))) for line in output.splitlines()]


def gpu_state() -> list[dict[str, str]]:
    """What can change a GPU's speed between runs: clocks, throttle reasons, temperature, power."""
    return _query(
        [
            "index",
            "clocks.sm",
            "clocks.mem",
            "clocks_throttle_reasons.active",
            "temperature.gpu",
            "power.draw",
            "power.limit",
        ]
    )


def _foreign_processes() -> list[dict[str, str]] | None:
    """Other processes computing on the GPUs, which would share them with the benchmark."""
    output = _nvidia_smi("--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader,nounits")
    if output is None:
        return None
    rows = [
        dict(zip(("pid", "name", "memory_mib"), (v.strip() for v in line.split(",")))) for line in output.splitlines()
    ]
    return [row for row in rows if row["pid"] != str(os.getpid())]


# Settings known to stop communication overlapping computation, with what they do.
OVERLAP_BREAKERS = {
    "CUDA_DEVICE_MAX_CONNECTIONS": ("1", "one hardware queue: NCCL kernels and compute kernels serialise"),
    "TORCH_NCCL_ENABLE_TIMING": ("1", "NCCL timing events add synchronisation to every collective"),
    "NCCL_LAUNCH_MODE": ("GROUP", "group launch mode serialises NCCL kernel launches"),
}


def overlap_warnings() -> list[str]:
    return [
        f"{name}={os.environ[name]}: {why}"
        for name, (value, why) in OVERLAP_BREAKERS.items()
        if os.environ.get(name) == value
    ]


def _gpus() -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append(
            {
                "index": index,
                "name": props.name,
                "memory_mib": props.total_memory // 2**20,
                "capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count,
            }
        )
    return gpus


def _nccl_version() -> str | None:
    try:
        return ".".join(str(part) for part in torch.cuda.nccl.version())
    except Exception:  # built without NCCL
        return None


def default_threads() -> int:
    """The physical cores this process may use, less one: threads beyond the physical cores share
    them (hyperthreads, or cores the scheduler has not given us), and a parallel region waits for
    its slowest thread, so one core is left to the runner and the system, whose interruptions
    would otherwise stall every region (on two cores, two threads timed the smoke sweep up to
    1.75× apart between runs; one thread, within 3%)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(psutil.cpu_count(logical=False) or usable, usable) - 1)


# A process using more than this share of one core while the run starts or ends is named:
# it competes with the benchmark for the CPU (and, on a GPU, for launching kernels).
BUSY_CPU_PERCENT = 20.0
LOAD_SAMPLE_S = 0.5


def host_load() -> dict[str, Any]:
    """The host's load average (1, 5, 15 minutes) and the other processes busy on its CPUs now."""
    ours = {os.getpid(), *(child.pid for child in psutil.Process().children(recursive=True))}
    processes = [p for p in psutil.process_iter(["pid", "name"]) if p.pid not in ours]
    for process in processes:  # the first reading only starts each process's clock
        try:
            process.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(LOAD_SAMPLE_S)
    busy = []
    for process in processes:
        try:
            percent = process.cpu_percent(None)
        except psutil.Error:  # ended meanwhile, or not ours to read
            continue
        if percent > BUSY_CPU_PERCENT:
            busy.append({"pid": process.pid, "name": process.info["name"], "cpu_percent": round(percent, 1)})
    return {
        "load_average": [round(value, 2) for value in os.getloadavg()],
        "busy_processes": sorted(busy, key=lambda p: -p["cpu_percent"]),
    }


# glibc adjusts its mmap and trim thresholds to the allocations it has seen, so a tensor of a
# few MiB can come from fresh pages, faulted in on every call, in one worker and from the heap
# in another, with what ran before deciding: on the CPU that moved a cell 2.5× between runs.
# Fixed thresholds switch the adjustment off: blocks under 32 MiB (glibc's largest threshold)
# always come from the heap, which is never trimmed. A user's own settings win.
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def worker_environment() -> dict[str, str]:
    return {**FIXED_MALLOC, **os.environ}


def resolve_device(spec: str, source: str) -> torch.device:
    """Turn the config's device into a usable torch.device, or fail before anything is written."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(source, "device", f"'{spec}' requested but no CUDA device is available")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ConfigError(
                source, "device", f"'{spec}' requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        device = torch.device("cuda", index)
    return device


def snapshot_time() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def ringbench_source() -> dict[str, Any]:
    """ringbench's own version and, when it runs from a checkout, that checkout's commit and dirty flag."""
    package = Path(__file__).resolve().parents[1]  # ringbench/, beside pyproject.toml in a checkout
    checkout = git_state(package) if (package.parent / "pyproject.toml").is_file() else {"commit": None, "dirty": None}
    return {"version": __version__, **checkout}


# Environment variables that change what the measured libraries do: NCCL's channels and protocols,
# the priority of PyTorch's NCCL streams, symmetric memory, the caching allocator, cuDNN's and
# cuBLAS's choices, which GPUs are visible. The stamp keeps every one that is set, so two runs
# that differ only there read apart.
LIBRARY_SETTING_PREFIXES = (
    "NCCL_",
    "TORCH_NCCL_",
    "TORCH_SYMM_MEM_",
    "PYTORCH_",
    "CUDA_",
    "CUBLAS_",
    "CUDNN_",
    "TORCH_CUDNN_",
)


def library_settings() -> dict[str, str]:
    """The environment's library settings (``LIBRARY_SETTING_PREFIXES``), by name."""
    return {name: value for name, value in sorted(os.environ.items()) if name.startswith(LIBRARY_SETTING_PREFIXES)}


def snapshot(device: torch.device, threads: int, config_folder: Path) -> dict[str, Any]:
    """The stamp; ``threads`` is the intra-op thread count the workers use. ``git`` is the repository
    holding the config and its plugins; ``ringbench`` the code that measured."""
    cuda = torch.cuda.is_available()
    return {
        "date_utc": snapshot_time(),
        "git": git_state(config_folder),
        "ringbench": ringbench_source(),
        "ringbench_version": __version__,
        "device": str(device),
        "hostname": socket.gethostname(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "threads": threads,
        "host_load": host_load(),
        "gpus": _gpus(),
        "driver": (_query(["driver_version"]) or [{"driver_version": UNKNOWN}])[0]["driver_version"] if cuda else None,
        "gpu_state": gpu_state() if cuda else [],
        "clocks_unreadable": clocks.unreadable(device),
        "foreign_processes": _foreign_processes() if cuda else None,
        "topology": _nvidia_smi("topo", "-m") if cuda and torch.cuda.device_count() > 1 else None,
        "overlap_warnings": overlap_warnings(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "nccl": _nccl_version() if cuda else None,
        "library_settings": library_settings(),
        "worker_malloc": {name: worker_environment()[name] for name in FIXED_MALLOC},
    }
