"""Implementations that misbehave on purpose, for tests of the harness around them."""

import os
import time

import torch
import torch.distributed

from ringbench import Bench, Option, Problem, register


@register("test-oom", description="raises CUDA out-of-memory from the closure")
def oom(problem: Problem):
    def run():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1024.00 GiB")

    return run


@register("test-error", description="raises an ordinary exception during setup")
def error(problem: Problem):
    raise ValueError("bad | input\nsecond line")


@register("test-slow", options={"sleep_ms": Option(50.0)}, reference=None, description="sleeps, then returns q")
def slow(problem: Problem):
    seconds = problem.options["sleep_ms"] / 1e3

    def run():
        time.sleep(seconds)
        return problem.q

    return run


@register("test-ring", uses_ring=True, description="a ring-sharded stand-in: dense attention on the whole input")
def ring(problem: Problem):
    return lambda: torch.nn.functional.scaled_dot_product_attention(problem.q, problem.k, problem.v)


@register("test-wrong", description="returns v instead of attention: checked and marked wrong")
def wrong(problem: Problem):
    return lambda: problem.v.clone()


@register("test-nan", description="returns NaN everywhere")
def nan(problem: Problem):
    return lambda: torch.full_like(problem.q, float("nan"))


@register("test-rank-oom", distributed=True, description="rank 1 runs out of memory during setup")
def rank_oom(problem: Problem):
    if problem.rank == 1:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory on the second rank")
    return lambda: problem.q


@register(
    "test-rank-unmatched",
    distributed=True,
    reference=None,
    description="rank 1 posts a receive rank 0 never sends, then both fail, as ranks running out of memory at different points may",
)
def rank_unmatched(problem: Problem):
    if problem.rank == 1:
        torch.distributed.irecv(torch.empty(2, 1, 1, 16, 8), src=0)  # the size of ring's first message in the test
    raise torch.cuda.OutOfMemoryError(f"CUDA out of memory on rank {problem.rank}")


@register("test-rank-exit", distributed=True, reference=None, description="rank 1 dies inside the first call")
def rank_exit(problem: Problem):
    def run():
        if problem.rank == 1:
            os._exit(3)
        return problem.q

    return run


PASSES = ("forward", "backward", "forward+backward")
forward_calls = []


@register("test-counting", passes=PASSES, description="dense attention that counts its forward calls")
def counting(problem: Problem):
    def run():
        forward_calls.append(1)
        return torch.nn.functional.scaled_dot_product_attention(problem.q, problem.k, problem.v)

    return run


class _NoGradient(torch.autograd.Function):
    """The identity forward, a gradient of zero backward: a right output with wrong gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


@register("test-bad-grad", passes=PASSES, description="right forward, zero gradients")
def bad_grad(problem: Problem):
    return lambda: _NoGradient.apply(torch.nn.functional.scaled_dot_product_attention(problem.q, problem.k, problem.v))


_original_sdpa = torch.nn.functional.scaled_dot_product_attention


@register(
    "test-patching",
    options={"tag": Option(0)},
    distributed=True,
    description="patches F.scaled_dot_product_attention for its cell and undoes that in close()",
)
def patching(problem: Problem):
    if torch.nn.functional.scaled_dot_product_attention is not _original_sdpa:
        raise RuntimeError("F.scaled_dot_product_attention is still patched by an earlier cell")
    torch.nn.functional.scaled_dot_product_attention = lambda q, k, v, **_: torch.zeros_like(q)

    def close():
        torch.nn.functional.scaled_dot_product_attention = _original_sdpa

    return Bench(run=lambda: _original_sdpa(problem.q, problem.k, problem.v), close=close)


@register("test-bad-close", distributed=True, description="a right output, then close() raises")
def bad_close(problem: Problem):
    def close():
        raise RuntimeError("could not undo the setup")

    return Bench(
        run=lambda: torch.nn.functional.scaled_dot_product_attention(problem.q, problem.k, problem.v), close=close
    )


@register("test-segfault", reference=None, description="dereferences a null pointer: the worker process dies")
def segfault(problem: Problem):
    import ctypes

    return lambda: ctypes.string_at(0)


@register("test-exit", reference=None, description="calls os._exit inside the call")
def exits(problem: Problem):
    def run():
        os._exit(7)

    return run


@register("test-hang", reference=None, description="never returns")
def hang(problem: Problem):
    def run():
        time.sleep(3600)

    return run


@register("test-alloc", reference=None, description="allocates ever larger buffers, without bound")
def alloc(problem: Problem):
    def run():
        held, size = [], 2**30
        while True:  # until the allocator refuses
            held.append(torch.empty(size, dtype=torch.uint8))
            size *= 2

    return run


@register("test-rank-hang", distributed=True, reference=None, description="rank 1 never returns from its call")
def rank_hang(problem: Problem):
    def run():
        if problem.rank == 1:
            time.sleep(3600)
        return problem.q

    return run


@register(
    "test-limited",
    options={"limit": Option(1000, help="tokens per process that fit"), "dies_above": Option(0)},
    distributed=True,
    reference=None,
    description="runs out of memory above `limit` tokens per process; above `dies_above` (if set) its process dies",
)
def limited(problem: Problem):
    per_process = problem.seq_len // problem.world_size
    if problem.options["dies_above"] and per_process > problem.options["dies_above"]:
        os._exit(9)  # as the out-of-memory killer would end it
    if per_process > problem.options["limit"]:
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory: {per_process} tokens per process")
    rows = torch.arange(problem.rank * per_process, (problem.rank + 1) * per_process, device=problem.device)
    q, _, _ = problem.shard(rows)
    return Bench(run=lambda: q, rows=rows)


@register(
    "test-rank-oom-midway",
    distributed=True,
    reference=None,
    description="rank 1 runs out of memory inside the call while rank 0 waits for what it was to send",
)
def rank_oom_midway(problem: Problem):
    def run():
        if problem.rank == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory on the second rank, midway")
        torch.distributed.recv(torch.empty(1), src=1)  # never sent
        return problem.q

    return run
