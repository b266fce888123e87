"""A cell's record, typed: one line of ``records.jsonl``, and the one place that reads every
version of it ringbench has written.

Field names are the JSON keys (``pass_name`` is stored as ``pass``). ``Record.to_json``
writes the current version; ``Record.from_json`` reads any version, upgrading older
ones in order, and refuses anything else with a ValueError saying why.

Versions:

1. The first. Fields were added under it without a new number, so a version-1 line
   may lack, by age: ``check``, ``flops``, ``tflops``, ``projected`` and
   ``memory.modelled_mib``; ``world_size`` and ``ranks``; ``noise``, ``modes``, ``comm``
   and ``stats.rel_iqr``; ``projected.modes``; ``memory.held_mib`` and
   ``projected.held_mib``; ``ranks[].held_mib``; ``modes.calls_per_sample``;
   ``check.seconds``, ``modes.launch_ms``, ``modes.device_ms`` and ``plain``;
   ``check.gradients.heads_checked`` and ``rows_checked``, and ``projected.plain``;
   ``label``. Gradients beyond 8192 tokens were not checked, and said so as
   ``{"checked": false, "passed": true, "reason": ...}``.
2. Every field in every record. What a version-1 line lacks reads as: ``world_size`` 1;
   ``label`` the implementation with its options (``sdpa(backend=flash)``);
   ``stats.rel_iqr`` (wherever statistics are) the IQR over the median, 0 at a zero
   median; ``modes.calls_per_sample`` 1; anything else None, as not measured or not
   recorded. Unchecked gradients carry None for each error; their reason (always the
   length) is dropped.

3. Facts name the block kernel an implementation ran ``kernel``, whichever it is; up to
   version 2 ``sdpa`` and ``torch-cp`` named theirs ``backend``, renamed on reading.

4. Communication is what a rank sends in a whole call, ``sent_bytes_per_call``, summed
   over every transfer the clock saw (ring steps and all-to-alls alike), so that
   strategies compare. Up to version 3 records held the mean bytes of one transfer
   (one ring step's message), ``sent_bytes_per_step``; they keep it, and read
   ``sent_bytes_per_call`` as None (not recorded). Records from version 4 on omit
   ``sent_bytes_per_step``.

5. ``gpus``: each rank's GPU while the cell's samples were timed (``GpuState``: SM clock,
   power, temperature, what held the clock down), and ``projected.gpu`` for a rank's share
   timed alone; both left out where nothing was read (on the CPU, without NVML). Older
   records read them as None.

``run.json`` carries the same number; version 3 adds ``roles`` to it (``records.read_run``
fills them in for older runs).
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeGuard

from ringbench.errors import show
from ringbench.vocabulary import DTYPES, PASSES, Cell, implementation_label

SCHEMA_VERSION = 5

OK, WRONG, OOM, ERROR, CRASHED, TIMEOUT, SKIPPED = "ok", "wrong", "oom", "error", "crashed", "timeout", "skipped"
STATUSES = (OK, WRONG, OOM, ERROR, CRASHED, TIMEOUT, SKIPPED)
# Statuses `--retry-failed` runs again (a skip is a decision, not a failure).
FAILED = (OOM, ERROR, CRASHED, TIMEOUT)
# Statuses whose records carry timings (a wrong output is still timed).
MEASURED = (OK, WRONG)

# Fields whose JSON key is not their name (``pass`` is a Python keyword), and back.
_KEYS = {"pass_name": "pass"}
_FIELDS = {key: name for name, key in _KEYS.items()}
# A field with this metadata is left out of the JSON where it is None, as it always has been.
_OMITTED_WHEN_NONE = {"omitted_when_none": True}


class _Stored:
    """What every part of a record shares: written as JSON by field name (``_build`` reads it back)."""

    if TYPE_CHECKING:
        # Every part is a dataclass; this says so to the type checker (``fields`` wants one).
        __dataclass_fields__: ClassVar[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {
            _KEYS.get(f.name, f.name): _json(getattr(self, f.name))
            for f in fields(self)
            if not (f.metadata.get("omitted_when_none") and getattr(self, f.name) is None)
        }


@dataclass(frozen=True)
class Stats(_Stored):
    """Summary statistics of timing samples, in milliseconds (see ``ringbench.run.stats.summarize``)."""

    n: int
    median_ms: float
    mean_ms: float
    std_ms: float
    q1_ms: float
    q3_ms: float
    iqr_ms: float
    rel_iqr: float
    min_ms: float
    max_ms: float


@dataclass(frozen=True)
class Noise(_Stored):
    """How noisy the samples ended, against the target sampling aimed for."""

    target: float
    rel_iqr: float
    reached: bool


@dataclass(frozen=True)
class Modes(_Stored):
    """How the call was timed: cache flushes, graph replays, the launch probe that chose them."""

    cold_l2: bool
    cuda_graph: bool
    launch_ms: float | None
    device_ms: float | None
    notes: tuple[str, ...]
    calls_per_sample: int


@dataclass(frozen=True)
class Plain(_Stored):
    """Plain calls' timing, kept beside graph replays' (launch included)."""

    samples_ms: tuple[float, ...]
    stats: Stats
    calls_per_sample: int


@dataclass(frozen=True)
class GradientCheck(_Stored):
    """dq, dk and dv against the float64 reference, each by its relative error."""

    checked: bool
    heads_checked: int | None
    rows_checked: int | None
    dq_rel_error: float | None
    dk_rel_error: float | None
    dv_rel_error: float | None
    rel_error: float | None
    passed: bool


@dataclass(frozen=True)
class Check(_Stored):
    """The output against the float64 reference; in backward passes its gradients too."""

    reference: str
    rows_checked: int
    max_abs_error: float | None
    rel_error: float | None
    tolerance: float
    passed: bool
    seconds: float | None
    gradients: GradientCheck | None = field(default=None, metadata=_OMITTED_WHEN_NONE)


@dataclass(frozen=True)
class Memory(_Stored):
    """Memory of the call in MiB; None where not measured (on the CPU) or not modelled."""

    inputs_mib: float
    peak_allocated_mib: float | None
    peak_reserved_mib: float | None
    held_mib: float | None
    modelled_mib: float | None


@dataclass(frozen=True)
class GpuState(_Stored):
    """One GPU while a cell's samples were timed, from NVML readings (``ringbench.run.clocks``):
    the SM clock's mean and lowest against the board's top, mean board power, highest die
    temperature, and every clock-event reason any reading named."""

    rank: int
    sm_clock_mhz: float
    sm_clock_min_mhz: float
    sm_clock_top_mhz: float
    power_w: float
    temperature_c: float
    held_by: tuple[str, ...]
    readings: int


@dataclass(frozen=True)
class Projected(_Stored):
    """One timed and memory-measured call: stored under ``projected`` for a rank's share of a
    one-device ring, and the form the pipeline measures the cell's own call in."""

    modes: Modes | None
    warmup_ms: tuple[float, ...]
    samples_ms: tuple[float, ...]
    stats: Stats
    plain: Plain | None
    peak_allocated_mib: float | None
    peak_reserved_mib: float | None
    held_mib: float | None
    gpu: GpuState | None = field(default=None, metadata=_OMITTED_WHEN_NONE)


@dataclass(frozen=True)
class RankFigures(_Stored):
    """One process's own figures in a cell run across processes."""

    rank: int
    median_ms: float
    peak_allocated_mib: float | None
    held_mib: float | None


@dataclass(frozen=True)
class RankTraffic(_Stored):
    """What one process sent to others in a call (None before version 4, which kept the mean
    per ring step instead), and its share of the call spent waiting."""

    rank: int
    sent_bytes_per_call: float | None
    wait_ms: float
    call_ms: float
    wait_share: float
    sent_bytes_per_step: float | None = field(default=None, metadata=_OMITTED_WHEN_NONE)


@dataclass(frozen=True)
class Comm(_Stored):
    """Communication in one instrumented call; the headline figures are the worst rank's."""

    sent_bytes_per_call: float | None
    wait_share: float
    ranks: tuple[RankTraffic, ...]
    sent_bytes_per_step: float | None = field(default=None, metadata=_OMITTED_WHEN_NONE)


@dataclass(frozen=True)
class Failure(_Stored):
    """Why a cell has no measurement: the exception's type (or the status, capitalized) and message."""

    type: str
    message: str


@dataclass(frozen=True)
class Record(_Stored):
    """A cell's parameters, where and when it ran, and what its measuring found; what was not
    measured stays None (or empty)."""

    cell_id: str
    implementation: str
    options: dict[str, Any]
    seq_len: int
    ring_size: int | None
    batch_size: int
    heads: int
    head_dim: int
    dtype: str
    causal: bool
    pass_name: str
    world_size: int
    label: str
    status: str
    device: str | None = None
    started_at: str | None = None
    duration_s: float | None = None
    error: Failure | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    check: Check | None = None
    warmup_ms: tuple[float, ...] = ()
    samples_ms: tuple[float, ...] = ()
    stats: Stats | None = None
    noise: Noise | None = None
    modes: Modes | None = None
    plain: Plain | None = None
    memory: Memory | None = None
    projected: Projected | None = None
    ranks: tuple[RankFigures, ...] | None = None
    comm: Comm | None = None
    flops: float | None = None
    tflops: float | None = None
    tokens_per_s: float | None = None
    gpus: tuple[GpuState, ...] | None = field(default=None, metadata=_OMITTED_WHEN_NONE)

    @classmethod
    def of_cell(cls, cell: Cell, status: str, **found: Any) -> Record:
        """The record of ``cell``; ``found`` holds what measuring it found, by field name (the rest
        stays None or empty)."""
        params = {_FIELDS.get(key, key): value for key, value in _json(cell.params()).items()}
        return cls(cell_id=cell.id, **params, label=cell.label, status=status, **found)

    @classmethod
    def from_json(cls, data: Any) -> Record:
        """The record a parsed line holds, whatever version wrote it; a ValueError says what is wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {show(data)}")
        version = data.get("schema_version")
        if type(version) is not int or version < 1:
            raise ValueError(f"schema_version: expected a version number, got {show(version)}")
        if version > SCHEMA_VERSION:
            raise ValueError(f"schema version {version}, newer than this ringbench reads ({SCHEMA_VERSION})")
        for upgrade in _UPGRADES[version - 1 :]:
            data = upgrade(data)
        record = _build(cls, {key: value for key, value in data.items() if key != "schema_version"}, "")
        for name, value, allowed in (
            ("status", record.status, STATUSES),
            ("pass", record.pass_name, PASSES),
            ("dtype", record.dtype, DTYPES),
        ):
            if value not in allowed:
                raise ValueError(f"{name}: {show(value)} is not a {name}")
        return record

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, **super().to_json()}

    @property
    def cell(self) -> Cell:
        """The cell measured. Its id is ``cell_id`` except in records from before world sizes,
        whose ids were taken without one."""
        # Lists (as JSON holds option values) become tuples, as the config gives them: a cell hashes.
        options = {key: tuple(value) if isinstance(value, list) else value for key, value in self.options.items()}
        params = {**{_KEYS.get(f.name, f.name): getattr(self, f.name) for f in fields(self)}, "options": options}
        return Cell.from_params(params, self.label)

    @property
    def display_label(self) -> str:
        """The label tables show: the record's, or for a cell built without one, the implementation
        with its options."""
        return self.label or implementation_label(self.implementation, self.options)

    @property
    def measured(self) -> bool:
        """Whether the record carries timings (a wrong output is still timed)."""
        return self.status in MEASURED

    @property
    def median_ms(self) -> float | None:
        return self.stats.median_ms if self.stats else None


def _json(value: Any) -> Any:
    """``value`` in JSON's types: parts as objects, tuples as lists."""
    if isinstance(value, _Stored):
        return value.to_json()
    if isinstance(value, (tuple, list)):
        return [_json(item) for item in value]
    if isinstance(value, dict):
        return {key: _json(item) for key, item in value.items()}
    return value


# Reading: a line is upgraded to the current version, then built, each field's type checked.


def _with(section: Any, **defaults: Any) -> Any:
    """``section`` with ``defaults`` under the keys it lacks; anything but an object is left for
    the checks to refuse."""
    return {**defaults, **section} if isinstance(section, dict) else section


def _amend(record: dict[str, Any], key: str, change: Callable[[Any], Any]) -> None:
    if key in record:
        record[key] = change(record[key])


def _is_number(value: Any) -> TypeGuard[float]:
    """Whether ``value`` is a JSON number (bool, an int to Python, is not)."""
    return type(value) in (int, float)


def _stats_1(stats: Any) -> Any:
    """Statistics from before the noise measure: it is the IQR over the median (0 at a zero median)."""
    if not isinstance(stats, dict) or "rel_iqr" in stats:
        return stats
    iqr, median = stats.get("iqr_ms"), stats.get("median_ms")
    if not (_is_number(iqr) and _is_number(median)):
        return stats
    return {**stats, "rel_iqr": iqr / median if median > 0 else 0.0}


def _modes_1(modes: Any) -> Any:
    # One call per sample before grouped samples; no launch probe before graphs were chosen by it.
    return _with(modes, calls_per_sample=1, launch_ms=None, device_ms=None)


def _plain_1(plain: Any) -> Any:
    plain = _with(plain)
    if isinstance(plain, dict):
        _amend(plain, "stats", _stats_1)
    return plain


def _gradients_1(gradients: Any) -> Any:
    """Gradients: unchecked ones (beyond 8192 tokens, once) have no errors; the reason, always that
    length, is dropped. Early checked ones did not say how much they checked."""
    if not isinstance(gradients, dict):
        return gradients
    if gradients.get("checked") is False:
        gradients = {key: value for key, value in gradients.items() if key != "reason"}
        gradients = _with(gradients, dq_rel_error=None, dk_rel_error=None, dv_rel_error=None, rel_error=None)
    return _with(gradients, heads_checked=None, rows_checked=None)


def _check_1(check: Any) -> Any:
    check = _with(check, seconds=None)  # the check's cost was not timed
    if isinstance(check, dict):
        _amend(check, "gradients", _gradients_1)
    return check


def _projected_1(projected: Any) -> Any:
    projected = _with(projected, modes=None, held_mib=None, plain=None)
    if isinstance(projected, dict):
        for key, upgrade in (("modes", _modes_1), ("stats", _stats_1), ("plain", _plain_1)):
            _amend(projected, key, upgrade)
    return projected


def _upgrade_1_to_2(old: dict[str, Any]) -> dict[str, Any]:
    """Fill what a version-1 line lacks with what its absence meant when it was written: one
    process, the label the implementation and options make, and None (not measured, not
    recorded) for everything measured since."""
    options = old.get("options")
    label = implementation_label(str(old.get("implementation")), options if isinstance(options, dict) else {})
    record = _with(
        old,
        world_size=1,
        label=label,
        check=None,
        flops=None,
        tflops=None,
        projected=None,
        ranks=None,
        comm=None,
        noise=None,
        modes=None,
        plain=None,
    )
    for key, upgrade in (
        ("stats", _stats_1),
        ("modes", _modes_1),
        ("plain", _plain_1),
        ("check", _check_1),
        ("projected", _projected_1),
    ):
        _amend(record, key, upgrade)
    _amend(record, "memory", lambda memory: _with(memory, modelled_mib=None, held_mib=None))
    _amend(
        record,
        "ranks",
        lambda ranks: [_with(rank, held_mib=None) for rank in ranks] if isinstance(ranks, list) else ranks,
    )
    return record


def _upgrade_2_to_3(old: dict[str, Any]) -> dict[str, Any]:
    """The kernel fact under one name: ``backend`` (sdpa's, torch-cp's) becomes ``kernel``."""
    facts = old.get("facts")
    if not isinstance(facts, dict) or "backend" not in facts or "kernel" in facts:
        return old
    renamed = {("kernel" if key == "backend" else key): value for key, value in facts.items()}
    return {**old, "facts": renamed}


def _upgrade_3_to_4(old: dict[str, Any]) -> dict[str, Any]:
    """Bytes per call were not recorded before version 4 (only the mean per ring step)."""
    comm = old.get("comm")
    if not isinstance(comm, dict):
        return old
    comm = _with(comm, sent_bytes_per_call=None)
    _amend(
        comm,
        "ranks",
        lambda ranks: [_with(rank, sent_bytes_per_call=None) for rank in ranks] if isinstance(ranks, list) else ranks,
    )
    return {**old, "comm": comm}


# _UPGRADES[v - 1] turns version v into v + 1; versions from 4 on only added fields, which older
# records read as None, so they need none.
_UPGRADES: tuple[Callable[[dict[str, Any]], dict[str, Any]], ...] = (
    _upgrade_1_to_2,
    _upgrade_2_to_3,
    _upgrade_3_to_4,
)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, data: Any, where: str) -> Any:
    """An instance of the dataclass ``cls`` from a JSON object holding exactly its fields."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'record'}: expected an object, got {show(data)}")
    values, keys = {}, set()
    for part in fields(cls):
        key = _KEYS.get(part.name, part.name)
        keys.add(key)
        path = f"{where}.{key}" if where else key
        if key in data:
            values[part.name] = _parse(_hints(cls)[part.name], data[key], path)
        elif not part.metadata.get("omitted_when_none"):
            raise ValueError(f"{path}: missing")
    unknown = sorted(str(key) for key in data if key not in keys)
    if unknown:
        raise ValueError(f"{where or 'record'}: unknown field {show(unknown[0])}")
    return cls(**values)


_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
# The JSON values each scalar type takes: bool is an int to Python, never to a record; a whole number is a number.
_ACCEPTED = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}


def _parse(kind: Any, value: Any, where: str) -> Any:
    """``value`` checked to be of the type ``kind`` annotates (as JSON holds it), and built."""
    origin, arguments = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        (kind,) = [argument for argument in arguments if argument is not type(None)]
        return _parse(kind, value, where)
    if isinstance(kind, type) and is_dataclass(kind):
        return _build(kind, value, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {show(value)}")
        # Samples run to many thousands a record: scalars are checked in one pass, and only a
        # list that fails it is gone through item by item, to name the item.
        accepted = _ACCEPTED.get(arguments[0])
        if accepted and all(type(item) in accepted for item in value):
            return tuple(value)
        return tuple(_parse(arguments[0], item, f"{where}[{index}]") for index, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected an object, got {show(value)}")
        return dict(value)
    if type(value) not in _ACCEPTED[kind]:
        raise ValueError(f"{where}: expected {_KINDS[kind]}, got {show(value)}")
    return value
