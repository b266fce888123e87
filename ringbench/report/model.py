"""The scaling model: the time of a call of `ring`, `ulysses` or `usp` at any world size and sequence
length, and its per-GPU efficiency, from measured parts and stated ones.

Measured: single-GPU block times (the peer's cells, `sdpa`, at each sequence length it ran, read as
the time of a block of that many rows and keys), the merge's cost, the ring step's transfer and the
all-to-all at each message size, and how much a block kernel slows while a transfer runs beside it
(``run.calibrate``, stored per world size). Stated: the bandwidth between nodes and the GPUs per
node. ``usp`` of Ulysses degree u on P GPUs is the general form: u = 1 is `ring`, u = P `ulysses`.
The README's "Scaling model" writes out the equations this module computes; ``report.scaling``
sets them beside a run's cells and projects them, ``report.predictions`` applies them to a sweep
before it runs.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd

from ringbench import records
from ringbench.vocabulary import DTYPE_BYTES, PEER

MIB = 2**20
FORWARD, BACKWARD, BOTH = "forward", "backward", "forward+backward"
GPUS_PER_NODE = 8
INTER_NODE_GBIT_S = 400.0  # one 400 Gb/s InfiniBand port per GPU
# What the all-to-alls carry, in shards of one tensor, (in, back): q, k, v in and the output back;
# backward, the output gradient in and dq, dk, dv back, and where Ulysses runs alone (no ring), which
# attends in parts of heads, q, k, v and the output once more.
ALL_TO_ALL_TENSORS = {FORWARD: (3, 1), BACKWARD: (1, 3)}
ULYSSES_ALONE_BACKWARD = (5, 3)


@dataclass(frozen=True)
class Link:
    """A transfer's time: a latency plus its bytes over a bandwidth."""

    latency_ms: float
    bytes_per_ms: float

    def ms(self, nbytes: float) -> float:
        return self.latency_ms + nbytes / self.bytes_per_ms if nbytes > 0 else 0.0

    @property
    def gb_per_s(self) -> float:
        return self.bytes_per_ms / 1e6


def fit_link(curve: dict[str, list]) -> Link:
    """Latency: the smallest message's time; bandwidth: the largest message's bytes over its time
    beyond that latency. (A least-squares line lets the many small messages pull the bandwidth.)"""
    sizes, times = curve["bytes"], curve["ms"]
    latency = times[0]
    return Link(latency, sizes[-1] / max(times[-1] - latency, 1e-9))


@dataclass(frozen=True)
class Machine:
    """The measured machine, and the stated one it is projected onto."""

    world_size: int  # the calibration's
    device: str
    ring_step: Link  # within a node
    all_to_all: Link  # within a node, bytes sent per rank
    inter_node: Link  # stated bandwidth, the ring step's latency
    gpus_per_node: int
    merge_ms_per_mib: float  # of float32 accumulator
    contention: float  # a block's slowdown while a transfer runs beside it

    @classmethod
    def from_calibration(
        cls,
        entry: dict[str, Any],
        inter_node_gbit_s: float = INTER_NODE_GBIT_S,
        gpus_per_node: int = GPUS_PER_NODE,
        copy_engine: bool = False,
    ) -> Machine:
        """The machine a calibration measured, its ring steps by NCCL or, with ``copy_engine``, by the
        copy engine (where the calibration has them: :func:`transfers_calibrated`); between nodes
        always NCCL's latency at the stated bandwidth."""
        ring, nccl_step = entry["copy_engine"] if copy_engine else entry, fit_link(entry["ring_step"])
        contended = ring["contention"]
        return cls(
            world_size=entry["world_size"],
            device=entry["device"],
            ring_step=fit_link(ring["ring_step"]) if copy_engine else nccl_step,
            all_to_all=fit_link(entry["all_to_all"]),
            inter_node=Link(nccl_step.latency_ms, inter_node_gbit_s / 8 * 1e6),
            gpus_per_node=gpus_per_node,
            merge_ms_per_mib=entry["merge"]["ms"] / entry["merge"]["accumulator_mib"],
            # A kernel cannot run faster beside transfers: a negative figure is noise, and reads as none.
            contention=max(0.0, contended["beside_transfers_ms"] / contended["alone_ms"] - 1) if contended else 0.0,
        )

    def all_to_all_ms(self, nbytes: float, degree: int) -> float:
        """An all-to-all among ``degree`` ranks sending ``nbytes`` from each: the pieces to ranks on
        other nodes (where the degree exceeds a node) go at the inter-node rate, at the same time."""
        if degree <= self.gpus_per_node:
            return self.all_to_all.ms(nbytes)
        within = nbytes * (self.gpus_per_node - 1) / (degree - 1)
        return max(self.all_to_all.ms(within), self.inter_node.ms(nbytes - within))


@dataclass(frozen=True)
class Shape:
    batch_size: int
    heads: int
    head_dim: int
    element_bytes: int

    def tensor_bytes(self, rows: float, heads: float) -> float:
        return self.batch_size * heads * rows * self.head_dim * self.element_bytes


@dataclass(frozen=True)
class Blocks:
    """Single-GPU attention times of one kernel and shape, per (pass, causal): (rows, ms) by rows. The
    peer's cells time every block; ``ring_times``, `ring`'s own calls as a ring of one (its block with
    the log-sum-exp, and the accumulator made and cast back), where a run has them, time a ring
    step's block at the lengths they span."""

    times: dict[tuple[str, bool], tuple[tuple[int, float], ...]]
    ring_times: dict[tuple[str, bool], tuple[tuple[int, float], ...]] = field(default_factory=dict)
    # The same kernel and shape on fewer heads, by head count, where the peer ran them too.
    fewer_heads: Mapping[int, Blocks] = field(default_factory=dict)

    def on(self, heads: float, all_heads: int) -> tuple[Blocks, float]:
        """What times a block of ``heads`` of the ``all_heads`` heads these blocks are for, and the share
        of its time they take: the peer's own cells on that many heads where it ran them (a kernel on
        fewer heads can run slower per head: ``results/evidence/probes/probe_heads.txt``), else these,
        in proportion."""
        fewer = self.fewer_heads.get(int(heads)) if float(heads).is_integer() else None
        return (fewer, 1.0) if fewer else (self, heads / all_heads)

    def ms(self, rows: float, causal: bool, pass_name: str, ring_step: bool = False) -> tuple[float, bool] | None:
        """The time of a block of ``rows`` queries and keys, all heads, and whether ``rows`` lies below
        the lengths measured; None where the pass was not run. Between measured lengths the time is
        interpolated on log-log axes; beyond them the nearest measured rate holds. That is optimistic
        only below (shorter blocks run at lower rates), which is why only there it is marked."""
        points = self.times.get((pass_name, causal))
        own = self.ring_times.get((pass_name, causal)) if ring_step else None
        if own and own[0][0] <= rows <= own[-1][0]:
            points = own
        if not points:
            return None
        lengths = [length for length, _ in points]
        outside = rows < lengths[0] * (1 - 1e-9)
        if rows <= lengths[0] or rows >= lengths[-1]:
            length, ms = points[0] if rows <= lengths[0] else points[-1]
            return ms * (rows / length) ** 2, outside
        upper = next(index for index, length in enumerate(lengths) if length >= rows)
        (l0, t0), (l1, t1) = points[upper - 1], points[upper]
        slope = math.log(t1 / t0) / math.log(l1 / l0)
        return t0 * (rows / l0) ** slope, outside

    def backward_ms(self, rows: float, causal: bool, ring_step: bool = False) -> tuple[float, bool] | None:
        """A block's backward: measured, or forward+backward less forward."""
        measured = self.ms(rows, causal, BACKWARD, ring_step)
        if measured:
            return measured
        both, forward = self.ms(rows, causal, BOTH, ring_step), self.ms(rows, causal, FORWARD, ring_step)
        if both is None or forward is None:
            return None
        return both[0] - forward[0], both[1] or forward[1]


@dataclass(frozen=True)
class Prediction:
    ms: float
    efficiency: float
    exposed: bool  # a transfer outlasts the block it should hide behind (a ring step's, ulysses' own rows)
    extrapolated: bool  # a block shorter than any measured: its rate is the shortest's, optimistic


class _Tally:
    """Adds up a modelled call: blocks with the transfers beside them, and what runs alone."""

    def __init__(self, contention: float):
        self.contention, self.ms, self.exposed, self.extrapolated = contention, 0.0, False, False

    def block(self, timed: tuple[float, bool], share: float) -> float:
        self.extrapolated |= timed[1]
        return timed[0] * share

    def step(self, compute_ms: float, transfer_ms: float) -> None:
        """A block computed while a transfer runs beside it, the longer of the two. The block runs
        slower only while the transfer runs: the calibration times a kernel with transfers beside it
        throughout (``run.calibrate``), and a long block outlasts its transfer."""
        slowed = compute_ms + self.contention * min(compute_ms, transfer_ms)
        self.exposed |= transfer_ms > slowed
        self.ms += max(slowed, transfer_ms)

    def alone(self, ms: float) -> None:
        """A merge, or a transfer nothing hides."""
        self.ms += ms


def _ring_steps(
    blocks: Blocks, rows: float, causal: bool, pass_name: str, ring: int
) -> list[tuple[float, bool]] | None:
    """Each ring step's block time for all heads: a ring of one (Ulysses alone) attends its whole rows
    as the peer does; otherwise, as the ring's own calls take them, non-causal every step is a square
    block, and causal (zigzag) step 0 is a causal square and every later step half a square
    (rows × rows/2), timed as a square of equal work, rows/√2."""
    if pass_name == BACKWARD:
        timed = functools.partial(blocks.backward_ms, ring_step=ring > 1)
    else:
        timed = functools.partial(blocks.ms, pass_name=FORWARD, ring_step=ring > 1)
    if ring == 1 or not causal:
        first = timed(rows, causal)
        return None if first is None else [first] * ring
    first, later = timed(rows, True), timed(rows / math.sqrt(2), False)
    return None if first is None or later is None else [first] + [later] * (ring - 1)


@dataclass(frozen=True)
class Layout:
    """Where `usp` at ``degree`` on ``world`` GPUs puts the work, and what it sends, per rank."""

    ring: int  # ranks in each ring (world / degree)
    heads: float  # heads each rank attends (heads / degree)
    rows: float  # rows each rank holds in its ring (seq_len / ring)
    all_to_all_bytes: float  # per tensor an all-to-all carries: the shard less the part kept
    kv_bytes: float  # a ring step's K and V
    sums_bytes: float  # float32 dK and dV sums, as a backward's hops after the first carry them

    @classmethod
    def of(cls, degree: int, world: int, seq_len: int, shape: Shape) -> Layout:
        ring, heads = world // degree, shape.heads / degree
        rows = seq_len / ring
        return cls(
            ring=ring,
            heads=heads,
            rows=rows,
            all_to_all_bytes=shape.tensor_bytes(seq_len / world, shape.heads) * (degree - 1) / degree,
            kv_bytes=2 * shape.tensor_bytes(rows, heads),
            sums_bytes=2 * shape.batch_size * heads * rows * shape.head_dim * 4,
        )

    def all_to_all_tensors(self, pass_name: str) -> tuple[int, int]:
        """The tensors the all-to-alls of one pass carry, in and back."""
        return ULYSSES_ALONE_BACKWARD if pass_name == BACKWARD and self.ring == 1 else ALL_TO_ALL_TENSORS[pass_name]

    def hop_bytes(self, hop: int) -> float:
        """What a backward's gradient sums carry in hop ``hop`` (1 on): the first, one block's dK and dV
        in the blocks' dtype; later ones float32 sums (``comm.TravellingSums``)."""
        return self.kv_bytes if hop == 1 else self.sums_bytes

    def sent_bytes(self, pass_name: str) -> float:
        """What one rank sends to others in a call of ``pass_name``."""
        passes = [FORWARD, BACKWARD] if pass_name == BOTH else [pass_name]
        total = 0.0
        for part in passes:
            total += sum(self.all_to_all_tensors(part)) * self.all_to_all_bytes + (self.ring - 1) * self.kv_bytes
            if part == BACKWARD:  # each block's sums travel from the next rank round to its owner
                total += sum(self.hop_bytes(hop) for hop in range(1, self.ring))
        return total


def _pass(
    tally: _Tally,
    pass_name: str,
    degree: int,
    world: int,
    seq_len: int,
    causal: bool,
    shape: Shape,
    blocks: Blocks,
    machine: Machine,
    own_rows_first: bool = False,
) -> bool:
    """Add one pass (forward or backward) of `usp` at ``degree`` to ``tally``; False where a block time is missing."""
    layout = Layout.of(degree, world, seq_len, shape)
    ring = layout.ring
    attended, share = blocks.on(layout.heads, shape.heads)
    if own_rows_first and pass_name == FORWARD and ring == 1:
        return _own_rows_first(tally, layout, world, causal, shape, attended, share, machine)
    steps = _ring_steps(attended, layout.rows, causal, pass_name, ring)
    if steps is None:
        return False
    tensors_in, tensors_out = layout.all_to_all_tensors(pass_name)
    link = machine.ring_step if world <= machine.gpus_per_node else machine.inter_node
    merged_rows = layout.rows * (0.75 if causal else 1.0)  # zigzag: half the steps merge half the rows
    merged_mib = shape.batch_size * layout.heads * merged_rows * shape.head_dim * 4 / MIB
    tally.alone(machine.all_to_all_ms(tensors_in * layout.all_to_all_bytes, degree))
    for step, timed in enumerate(steps):
        compute = tally.block(timed, share)
        if pass_name == FORWARD:
            tally.step(compute, link.ms(layout.kv_bytes) if step < ring - 1 else 0.0)
            tally.alone(machine.merge_ms_per_mib * merged_mib if step else 0.0)
        else:  # the next block's K/V and the last block's gradient sums travel during this block
            sums = layout.hop_bytes(step - 1) if step > 1 else 0.0
            tally.step(compute, link.ms(layout.kv_bytes * (step < ring - 1) + sums))
    if pass_name == BACKWARD and ring > 1:
        tally.alone(link.ms(layout.hop_bytes(ring - 1)))  # the last hop brings the sums home
    tally.alone(machine.all_to_all_ms(tensors_out * layout.all_to_all_bytes, degree))
    return True


def _own_rows_first(
    tally: _Tally,
    layout: Layout,
    world: int,
    causal: bool,
    shape: Shape,
    blocks: Blocks,
    share: float,
    machine: Machine,
) -> bool:
    """`ulysses`' forward attending its own rows first (``own_rows_first``): of the head shard's P
    blocks of n rows, the rank's own block attends itself while the inbound all-to-all runs; then
    every block attends the keys it has left, in as few calls as are contiguous, each block of more
    than one call merging into a float32 accumulator. Causal: every other block's diagonal, and
    block j's keys before it (n × j·n), P − 1 merges. Non-causal: every other block over every key,
    and the own block over the keys before and after it, one merge each: a middle block's rank,
    the slowest. A rectangle is timed as the square of equal work. ``blocks`` take ``share`` of their
    time for the rank's heads."""
    n = layout.rows / world
    squares: list[tuple[float, bool]] = []  # each call after the own diagonal: (rows of its square, causal)
    if causal:
        squares += [(n, True)] * (world - 1) + [(n * math.sqrt(j), False) for j in range(1, world)]
        merges = world - 1
    else:
        own = world // 2
        sides = [count for count in (own, world - 1 - own) if count]
        squares += [(n * math.sqrt(world), False)] * (world - 1) + [(n * math.sqrt(count), False) for count in sides]
        merges = len(sides)
    diagonal = blocks.ms(n, causal, FORWARD, ring_step=True)
    if diagonal is None:
        return False
    tally.step(tally.block(diagonal, share), machine.all_to_all_ms(3 * layout.all_to_all_bytes, world))
    for rows, square_causal in squares:
        timed = blocks.ms(rows, square_causal, FORWARD, ring_step=True)
        if timed is None:
            return False
        tally.alone(tally.block(timed, share))
    tally.alone(machine.merge_ms_per_mib * merges * shape.batch_size * layout.heads * n * shape.head_dim * 4 / MIB)
    tally.alone(machine.all_to_all_ms(layout.all_to_all_bytes, world))
    return True


def predict(
    degree: int,
    world: int,
    seq_len: int,
    causal: bool,
    pass_name: str,
    shape: Shape,
    blocks: Blocks,
    machine: Machine,
    own_rows_first: bool = False,
) -> Prediction | None:
    """`usp` at Ulysses ``degree`` on ``world`` GPUs (1: `ring`, ``world``: `ulysses`, whose forward
    may attend its ``own_rows_first``); None where the single-GPU times it needs were not measured."""
    tally = _Tally(machine.contention)
    passes = [FORWARD, BACKWARD] if pass_name == BOTH else [pass_name]
    single = blocks.ms(seq_len, causal, pass_name) if pass_name != BACKWARD else blocks.backward_ms(seq_len, causal)
    if single is None or not all(
        _pass(tally, part, degree, world, seq_len, causal, shape, blocks, machine, own_rows_first) for part in passes
    ):
        return None
    return Prediction(
        ms=tally.ms,
        efficiency=single[0] / (world * tally.ms),
        exposed=tally.exposed,
        extrapolated=tally.extrapolated,
    )


def strategy_name(degree: int, world: int) -> str:
    if degree == 1:
        return "ring"
    return "ulysses" if degree == world else f"usp {degree}×{world // degree}"


def cell_degree(implementation: str, options: Mapping[str, Any], world_size: int, causal: bool) -> int | None:
    """The Ulysses degree of a cell the model covers: `ring` 1, `ulysses` its world size, `usp` its
    option; None for any other implementation, and for a causal ring without zigzag, whose ranks
    wait on each other's unequal work."""
    if causal and implementation in ("ring", "usp") and not options.get("zigzag"):
        return None
    degrees = {"ring": 1, "ulysses": world_size, "usp": options.get("ulysses_degree")}
    return degrees.get(implementation)


def attends_own_rows_first(implementation: str, options: Mapping[str, Any], world_size: int, causal: bool) -> bool:
    """Whether a cell's forward attends its own rows first: `ulysses` in one chunk, by its
    ``own_rows_first`` option (``ulysses.attends_own_rows_first``; cells recorded before the
    option ran the plain form, and for a while it was yes or no); `usp` as a ring of one (its
    Ulysses degree the world size) in causal attention, as its setup runs `ulysses`."""
    if implementation == "usp":
        return causal and options.get("ulysses_degree") == world_size
    if implementation != "ulysses" or options.get("chunks", 1) != 1:
        return False
    mode = options.get("own_rows_first", "never")
    return mode is True or mode == "always" or (mode == "causal" and causal)


def degree_of(row: pd.Series) -> int | None:
    """:func:`cell_degree` of a recorded cell."""
    return cell_degree(row["implementation"], json.loads(row["options"]), int(row["world_size"]), bool(row["causal"]))


def planned_kernel(options: Mapping[str, Any]) -> str | None:
    """The kernel a cell's options name (``kernel`` for the ring's, ``backend`` for SDPA's); None
    where it is chosen only when the cell runs (``auto``)."""
    kernel = options.get("kernel", options.get("backend"))
    return None if kernel in (None, "auto") else str(kernel)


def transfers_calibrated(entry: dict[str, Any], copy_engine: bool) -> bool:
    """Whether a calibration measured the ring's transfers of a kind: NCCL's always; copy-engine
    transfers where its ranks could use them (calibrations before them never measured them)."""
    return not copy_engine or bool(entry.get("copy_engine"))


def plans_copy_engine(options: Mapping[str, Any], entry: dict[str, Any]) -> bool:
    """Whether a cell with ``options`` will send its ring steps by copy engine on the ranks the
    calibration ``entry`` measured: where it names them, or leaves them ``auto`` and the calibration
    measured them (it does wherever the ranks can use them)."""
    transfers = options.get("transfers")
    return transfers == "copy-engine" or (transfers == "auto" and transfers_calibrated(entry, copy_engine=True))


def calibration_for(calibration: dict[int, dict[str, Any]], world: int) -> dict[str, Any]:
    """The calibration measured at ``world`` processes, else at the most processes below it, else
    at the fewest above it."""
    below = [size for size in calibration if size <= world]
    return calibration[max(below) if below else min(calibration)]


KERNEL_SHAPE = ["kernel", "dtype", "batch_size", "heads", "head_dim"]


def _times(cells: pd.DataFrame) -> dict[tuple[str, bool], tuple[tuple[int, float], ...]]:
    """(rows, ms) by rows per (pass, causal); where several cells share a length, the fastest."""
    fastest = cells.groupby(["pass", "causal", "seq_len"])["median_ms"].min()
    found: dict[tuple[str, bool], list[tuple[int, float]]] = {}
    for (pass_name, causal, seq_len), ms in fastest.items():
        found.setdefault((pass_name, bool(causal)), []).append((int(seq_len), float(ms)))
    return {key: tuple(sorted(points)) for key, points in found.items()}


def blocks_of(frame: pd.DataFrame) -> dict[tuple, Blocks]:
    """Per kernel and shape the single-GPU peer ran: its times, and `ring`'s as a ring of one."""
    ok = frame[(frame["world_size"] == 1) & (frame["status"] == records.OK)]
    rings = ok[(ok["implementation"] == "ring") & (ok["ring_size"] == 1)]
    found: dict[tuple, Blocks] = {}
    for key, peer in ok[ok[PEER]].groupby(KERNEL_SHAPE, sort=False):
        ring = rings[(rings[KERNEL_SHAPE] == pd.Series(key, index=KERNEL_SHAPE)).all(axis=1)]
        found[key] = Blocks(_times(peer), _times(ring) if not ring.empty else {})
    return {key: replace(blocks, fewer_heads=_fewer_heads(key, found)) for key, blocks in found.items()}


def _fewer_heads(key: tuple, found: dict[tuple, Blocks]) -> dict[int, Blocks]:
    """The blocks of ``found`` whose kernel and shape are ``key``'s but for fewer heads, by head count."""
    heads = KERNEL_SHAPE.index("heads")

    def but_heads(shape: tuple) -> tuple:
        return shape[:heads] + shape[heads + 1 :]

    return {
        int(other[heads]): blocks
        for other, blocks in found.items()
        if but_heads(other) == but_heads(key) and other[heads] < key[heads]
    }


def shape_of(key: tuple) -> Shape:
    _, dtype, batch_size, heads, head_dim = key
    return Shape(int(batch_size), int(heads), int(head_dim), DTYPE_BYTES[dtype])
