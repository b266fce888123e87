"""Watches what each rank of a distributed worker makes: imported as a plugin, it records in every
rank the largest tensor any operation produced and every request for input rows, and writes them
to $RINGBENCH_SHARD_WATCH/rank-N.json when the rank exits."""

import atexit
import json
import os
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ringbench.attention import inputs
from ringbench.run import calibrate

SEEN = {"largest": 0, "largest_op": "", "requests": []}
WATCHING = [True]


class _Largest(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0] if WATCHING[0] else ():
            if isinstance(value, torch.Tensor) and value.numel() > SEEN["largest"]:
                SEEN["largest"], SEEN["largest_op"] = value.numel(), f"{func} {tuple(value.shape)}"
        return out


def _watched(method, heads):
    def watched(self, name, *args):
        positions = args[-1]
        SEEN["requests"].append([method.__name__, name, len(positions) * heads(self)])
        return method(self, name, *args)

    return watched


def _whole(self, name):  # the whole of one input, every head
    SEEN["requests"].append(["everything", name, self.shape[1] * self.shape[2]])
    return inputs.Inputs.everything(self, name)


def _unwatched(measure):
    """The worker's link measurements, before its first cell, use buffers of their own sizes: not watched."""

    def unwatched(group):
        WATCHING[0] = False
        try:
            return measure(group)
        finally:
            WATCHING[0] = True

    return unwatched


def _write():
    folder = Path(os.environ["RINGBENCH_SHARD_WATCH"])
    (folder / f"world-{os.environ['WORLD_SIZE']}-rank-{os.environ['RANK']}.json").write_text(json.dumps(SEEN))


if "RANK" in os.environ and "RINGBENCH_SHARD_WATCH" in os.environ:  # the ranks of a worker, not the supervisor
    inputs.Generated.rows = _watched(inputs.Generated.rows, lambda self: self.shape[0] * self.shape[1])
    inputs.Generated.head_rows = _watched(inputs.Generated.head_rows, lambda self: 1)
    inputs.Generated.everything = _whole
    calibrate.measure = _unwatched(calibrate.measure)
    _Largest().__enter__()
    atexit.register(_write)
