import pytest
import torch

from ringbench.attention import inputs
from ringbench.attention.inputs import Generated, Given

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(inputs, "CHUNK", 8)  # a sequence of 30 positions in 4 blocks, the last one short


def made(seed=0, dtype=torch.float32, requires_grad=False):
    return Generated((2, 3, 30, 4), dtype, CPU, seed, requires_grad)


@pytest.mark.parametrize("name", inputs.NAMES)
def test_any_rows_equal_the_same_rows_of_the_whole_tensor(name):
    whole = made().everything(name)
    assert whole.shape == (2, 3, 30, 4) and whole.std() > 0.5
    for positions in ([0], [29, 3, 8, 7, 16], list(range(5, 23)), [24, 25, 26, 27, 28, 29]):
        at = torch.tensor(positions)
        assert torch.equal(made().rows(name, at), whole[:, :, at])
        assert torch.equal(made().head_rows(name, 1, 2, at), whole[1, 2, at])
    # Spans, made without asking the device which blocks they need.
    for span in (range(0, 1), range(5, 23), range(8, 16), range(24, 30), range(0, 30)):
        assert torch.equal(made().rows(name, span), whole[:, :, span.start : span.stop])
        assert torch.equal(made().head_rows(name, 1, 2, span), whole[1, 2, span.start : span.stop])


def test_tensors_seeds_batches_and_heads_draw_apart_and_the_same_seed_draws_alike():
    q = made().everything("q")
    assert not torch.equal(q, made().everything("k")) and not torch.equal(q, made(seed=1).everything("q"))
    assert not torch.equal(q[0, 0], q[0, 1]) and not torch.equal(q[0, 0], q[1, 0])
    assert torch.equal(q, made().everything("q"))


def test_whole_inputs_require_gradients_in_backward_passes_and_the_output_gradient_never():
    backward = made(requires_grad=True)
    assert backward.everything("q").requires_grad and not backward.everything("dout").requires_grad
    assert not made().everything("v").requires_grad


def test_given_tensors_are_handed_back_as_they_are_and_their_rows_are_copies():
    q, k, v = (torch.randn(1, 2, 6, 3) for _ in range(3))
    given = Given(q, k, v)
    assert given.everything("q") is q and given.shape == (1, 2, 6, 3)
    rows = given.rows("k", torch.tensor([4, 1]))
    assert torch.equal(rows, k[:, :, [4, 1]]) and rows.data_ptr() != k.data_ptr()
    span = given.head_rows("v", 0, 1, range(2, 5))
    assert torch.equal(span, v[0, 1, 2:5]) and span.data_ptr() != v[0, 1, 2].data_ptr()
    with pytest.raises(ValueError, match="no dout was given"):
        given.rows("dout", torch.tensor([0]))
