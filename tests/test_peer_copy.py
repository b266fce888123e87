"""Copy-engine transfers keep the travelling gradient sums from setup: the memory models move them."""

import pytest

from ringbench.attention.impls import ring
from ringbench.vocabulary import Cell


def _cell(pass_name: str, transfers: str, seq_len: int = 1 << 17) -> Cell:
    options = (("kernel", "cudnn"), ("transfers", transfers), ("zigzag", True))
    return Cell("ring", options, seq_len, 2, 1, 16, 128, "bfloat16", True, pass_name, world_size=2)


@pytest.mark.parametrize("seq_len", [1 << 13, 1 << 17])
def test_copy_engine_moves_the_travelling_sums_from_the_call_to_setup(seq_len):
    facts = {"kernel": "cudnn"}
    nccl, copy_engine = _cell("forward+backward", "nccl", seq_len), _cell("forward+backward", "copy-engine", seq_len)
    moved = ring.setup_memory(copy_engine) - ring.setup_memory(nccl)
    rows = seq_len // 2
    part_heads = ring.blocks.backward_part_heads(1, rows, 16)
    # dK and dV of one part of heads, float32, and the spare they arrive in.
    assert moved == 2 * 2 * part_heads * rows * 128 * 4
    called = ring.memory_model(nccl, facts, 1) - ring.memory_model(
        copy_engine, {**facts, "transfers": "copy-engine"}, 1
    )
    assert called == moved
    # A rank that fell back to NCCL allocates the sums in the call, as the model then says.
    assert ring.memory_model(copy_engine, {**facts, "transfers": "nccl: the ranks span hosts"}, 1) == ring.memory_model(
        nccl, facts, 1
    )


def test_forward_passes_keep_no_sums():
    assert ring.setup_memory(_cell("forward", "copy-engine")) == ring.setup_memory(_cell("forward", "nccl"))
