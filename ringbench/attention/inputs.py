"""A cell's input tensors — q, k, v and the gradient fed to backward passes — any rows of them
made on their own.

Across processes no rank may hold a whole input: ring attention exists so that a
sequence too long for one device fits on several. So values are drawn per block of
``CHUNK`` sequence positions of one (batch, head), each block from a generator
seeded by (seed, tensor, batch, head, block). The rows a rank makes are then
exactly the same rows of the whole tensor a single device would make, and the
float64 reference can stream any rows of them (``ringbench.run.correctness``)
without another rank's help.

:class:`Generated` is what the harness hands implementations; :class:`Given`
wraps tensors that already exist (tests, a caller's own data).
"""

from __future__ import annotations

import hashlib

import torch

NAMES = ("q", "k", "v", "dout")
# Positions per generated block: large enough that making a long shard takes few
# generator calls, small enough that a short shard wastes little making its block.
CHUNK = 4096

# Sequence positions: any of them as a tensor, or a span of them.
Positions = torch.Tensor | range


class Inputs:
    """Rows of the four (batch, heads, seq_len, head_dim) tensors of a cell.

    ``rows`` makes every (batch, head) at some positions; ``head_rows`` one
    (batch, head): the float64 reference streams those. Positions are a tensor, or a
    ``range`` for a span, which is made without waiting for the device.
    """

    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    device: torch.device

    @property
    def requires_grad(self) -> bool:
        """Whether q, k and v require gradients: backward passes differentiate against them."""
        raise NotImplementedError

    def head_rows(self, name: str, batch: int, head: int, positions: Positions) -> torch.Tensor:
        """(len(positions), D): tensor ``name`` of one (batch, head) at ``positions``; a new tensor."""
        raise NotImplementedError

    def rows(self, name: str, positions: Positions) -> torch.Tensor:
        """(B, H, len(positions), D): tensor ``name`` at ``positions``; a new tensor, never a view."""
        batches, heads = self.shape[:2]
        out = torch.empty(batches, heads, len(positions), self.shape[3], dtype=self.dtype, device=self.device)
        for batch in range(batches):
            for head in range(heads):
                out[batch, head] = self.head_rows(name, batch, head, positions)
        return out

    def everything(self, name: str) -> torch.Tensor:
        """The whole tensor, in one process only: q, k and v require gradients in backward passes."""
        whole = self.rows(name, torch.arange(self.shape[2], device=self.device))
        return whole.requires_grad_(self.requires_grad and name != "dout")

    def empty(self, rows: int, heads: int | None = None) -> torch.Tensor:
        """An uninitialised (B, heads, rows, D) tensor like the inputs (all heads unless given)."""
        batch, all_heads, _, head_dim = self.shape
        return torch.empty(batch, heads or all_heads, rows, head_dim, dtype=self.dtype, device=self.device)


class Generated(Inputs):
    """Standard normal values in the cell's dtype, the same for every implementation and rank."""

    def __init__(
        self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device, seed: int, requires_grad: bool
    ):
        self.shape, self.dtype, self.device, self.seed = shape, dtype, device, seed
        self._requires_grad = requires_grad
        self._generator = torch.Generator(device=device)

    @property
    def requires_grad(self) -> bool:
        return self._requires_grad

    def _block(self, name: str, batch: int, head: int, block: int) -> torch.Tensor:
        """Positions block·CHUNK … of one (batch, head): a seed of their own, so any block is made alone."""
        key = f"{self.seed}/{name}/{batch}/{head}/{block}".encode()
        self._generator.manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1)
        length = min(CHUNK, self.shape[2] - block * CHUNK)
        return torch.randn(length, self.shape[3], generator=self._generator, device=self.device, dtype=self.dtype)

    def head_rows(self, name: str, batch: int, head: int, positions: Positions) -> torch.Tensor:
        if isinstance(positions, range):  # its blocks are known here: no wait for the device to say which
            first, end = positions.start // CHUNK, -(-positions.stop // CHUNK)
            made = torch.cat([self._block(name, batch, head, block) for block in range(first, end)])
            return made[positions.start - first * CHUNK : positions.stop - first * CHUNK]
        blocks = positions // CHUNK
        needed = blocks.unique()  # sorted
        made = torch.cat([self._block(name, batch, head, block) for block in needed.tolist()])
        # Every made block but the sequence's last is CHUNK long: position p lies in made block
        # searchsorted(needed, p // CHUNK), at p % CHUNK.
        return made[torch.searchsorted(needed, blocks) * CHUNK + positions % CHUNK]


class Given(Inputs):
    """Tensors that exist already; ``dout`` is needed only where backward passes are checked."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor | None = None):
        self._tensors = {"q": q, "k": k, "v": v, "dout": dout}
        self.shape = (q.shape[0], q.shape[1], q.shape[2], q.shape[3])
        self.dtype, self.device = q.dtype, q.device

    @property
    def requires_grad(self) -> bool:
        return self.everything("q").requires_grad

    def everything(self, name: str) -> torch.Tensor:
        """The caller's own tensor, requiring gradients as it does."""
        tensor = self._tensors[name]
        if tensor is None:
            raise ValueError(f"no {name} was given")
        return tensor

    def rows(self, name: str, positions: Positions) -> torch.Tensor:
        return self.everything(name).detach().index_select(2, self._index(positions))

    def head_rows(self, name: str, batch: int, head: int, positions: Positions) -> torch.Tensor:
        return self.everything(name).detach()[batch, head].index_select(0, self._index(positions))

    def _index(self, positions: Positions) -> torch.Tensor:
        if isinstance(positions, range):
            return torch.arange(positions.start, positions.stop, device=self.device)
        return positions
