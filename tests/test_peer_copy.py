"""Copy-engine transfers keep the buffers the travelling gradient sums arrive in from setup: the memory models move them."""

import pytest

from ringbench.attention.impls import ring
from ringbench.attention.peer_copy import FREE, READY, flag_word
from ringbench.attention.registry import Registry
from ringbench.vocabulary import Cell

BUNDLED = Registry.bundled()


def _cell(pass_name: str, transfers: str, seq_len: int = 1 << 17) -> Cell:
    options = (("kernel", "cudnn"), ("transfers", transfers), ("zigzag", True))
    return Cell("ring", options, seq_len, 2, 1, 16, 128, "bfloat16", True, pass_name, world_size=2)


@pytest.mark.parametrize("seq_len", [1 << 13, 1 << 17])
def test_copy_engine_moves_what_the_sums_arrive_in_from_the_call_to_setup(seq_len):
    facts = {"kernel": "cudnn"}
    nccl, copy_engine = _cell("forward+backward", "nccl", seq_len), _cell("forward+backward", "copy-engine", seq_len)
    moved = ring.setup_memory(copy_engine) - ring.setup_memory(nccl)
    rows = seq_len // 2
    part_heads = ring.blocks.backward_part_heads(1, rows, 16)
    # A ring of two has one hop: dK and dV of one part of heads, bf16, in one buffer.
    part = 2 * part_heads * rows * 128 * 2
    assert moved == part
    called = ring.memory_model(nccl, facts, 1) - ring.memory_model(
        copy_engine, {**facts, "transfers": "copy-engine"}, 1
    )
    # The call no longer allocates the arrival: the previous part's, beside the next part's first
    # block, where there are several; else the one part's, whose kernel then holds more.
    several = part_heads < 16
    assert called == (part if several else part // 2)
    # A rank that fell back to NCCL allocates the sums in the call, as the model then says.
    assert ring.memory_model(copy_engine, {**facts, "transfers": "nccl: the ranks span hosts"}, 1) == ring.memory_model(
        nccl, facts, 1
    )


def test_rings_of_more_than_two_keep_two_float32_buffers_for_their_sums():
    def cell(transfers):
        options = (("kernel", "cudnn"), ("transfers", transfers), ("zigzag", True))
        return Cell("ring", options, 1 << 17, 4, 1, 16, 128, "bfloat16", True, "forward+backward", world_size=4)

    rows = (1 << 17) // 4
    part_heads = ring.blocks.backward_part_heads(1, rows, 16)
    moved = ring.setup_memory(cell("copy-engine")) - ring.setup_memory(cell("nccl"))
    assert moved == 2 * (2 * part_heads * rows * 128 * 4)


def test_forward_passes_keep_no_sums():
    assert ring.setup_memory(_cell("forward", "copy-engine")) == ring.setup_memory(_cell("forward", "nccl"))


def test_usp_keeps_its_rings_sums_and_leaves_out_copy_engine_transfers_with_no_ring():
    usp = BUNDLED.get("usp")
    options = {"kernel": "cudnn", "transfers": "copy-engine", "ulysses_degree": 2, "zigzag": True}

    def cell(transfers, world_size=4, pass_name="forward+backward"):
        chosen = tuple(sorted({**options, "transfers": transfers}.items()))
        return Cell("usp", chosen, 1 << 17, world_size, 1, 16, 128, "bfloat16", True, pass_name, world_size=world_size)

    moved = usp.setup_memory(cell("copy-engine")) - usp.setup_memory(cell("nccl"))
    rows, heads = (1 << 17) * 2 // 4, 16 // 2  # the ring's shard: u times the rows, H/u heads
    part_heads = ring.blocks.backward_part_heads(1, rows, heads)
    # Its rings are of two: one buffer of dK and dV of one part, bf16.
    assert moved == 2 * part_heads * rows * 128 * 2 == ring.sums_buffer_bytes(cell("nccl"), 2)
    facts = {"kernel": "cudnn"}
    called = usp.memory_model(cell("nccl"), facts) - usp.memory_model(
        cell("copy-engine"), {**facts, "transfers": "copy-engine"}
    )
    assert called == moved
    assert usp.excludes(cell("copy-engine", world_size=2)) == (
        "at ulysses_degree P there is no ring: copy-engine transfers have nothing to carry"
    )
    assert usp.excludes(cell("nccl", world_size=2)) is None
    assert usp.excludes(cell("auto", world_size=2)) is None  # auto asks for no transfers, only how to send any
    assert usp.setup_memory(cell("auto")) == usp.setup_memory(cell("copy-engine"))


def test_the_sums_buffers_kept_follow_the_parts_the_backward_runs_in():
    nccl, copy_engine = _cell("forward+backward", "nccl"), _cell("forward+backward", "copy-engine")
    rows = (1 << 17) // 2
    for part_heads in (16, 8):
        moved = ring.setup_memory(copy_engine, part_heads=part_heads) - ring.setup_memory(nccl, part_heads=part_heads)
        assert moved == 2 * part_heads * rows * 128 * 2  # one buffer of dK and dV of the part, bf16


@pytest.mark.parametrize("ranks", [2, 4, 8])
@pytest.mark.parametrize("slots", [1, 2])
def test_every_flag_of_every_writer_has_a_word_of_its_own_and_they_fill_the_front_of_the_pad(ranks, slots):
    words = [
        flag_word(slot, kind, writer, ranks)
        for slot in range(slots)
        for kind in (FREE, READY)
        for writer in range(ranks)
    ]
    assert sorted(words) == list(range(2 * slots * ranks))
