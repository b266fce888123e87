import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

PLUGINS = Path(__file__).parent / "plugins"
ROOT = Path(__file__).parents[1]


def registry_with_fakes():
    """A registry of the bundled implementations and the misbehaving ones of tests/plugins."""
    from ringbench.attention.registry import Registry

    registry = Registry.bundled()
    registry.load_plugins(("fake_impls",), PLUGINS)
    return registry


def measure(cell, device, budget, seed=0, skip_oversized=True):
    """One cell's record, measured in this process, its implementation found by name."""
    from ringbench.run import pipeline
    from ringbench.run.distributed import OneProcess

    return pipeline.run_cell(
        cell, registry_with_fakes().get(cell.implementation), OneProcess(device), budget, seed, skip_oversized
    )


def killed_run(config, output_root, chooser):
    """The run folder of ``ringbench run config``, SIGKILLed at a random moment (drawn by ``chooser``)
    within 1.5 s of its first record file appearing."""
    process = subprocess.Popen(
        [sys.executable, "-m", "ringbench", "run", str(config), "--output-root", str(output_root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    deadline = time.monotonic() + 60
    while not list(output_root.glob("*/records.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(chooser.uniform(0.0, 1.5))
    process.send_signal(signal.SIGKILL)
    process.wait()
    (run_dir,) = output_root.iterdir()
    return run_dir


# Triton kernels run on the CPU, interpreted: set before any kernel is defined (ringbench imports them).
os.environ.setdefault("TRITON_INTERPRET", "1")

# A complete, valid config for CPU: tests change one thing at a time.
BASE_CONFIG = """\
name: test
implementations:
  - name: standard
  - name: sdpa
    options:
      backend: auto
seq_lens: [64, 96]
heads: [2]
head_dims: [16]
dtypes: [float32]
timing:
  warmup_ms: 1
  rep_ms: 2
  min_reps: 2
  max_reps: 5
"""


@pytest.fixture
def write_config(tmp_path):
    """Write a config (plus the fake-implementations plugin beside it) and return its path."""
    shutil.copy(PLUGINS / "fake_impls.py", tmp_path / "fake_impls.py")

    def write(text: str = BASE_CONFIG, name: str = "sweep.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write
