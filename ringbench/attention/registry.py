"""The registry of attention implementations: one contract for bundled and user code.

An implementation is a *setup* function. It receives a :class:`Problem` (the input
tensors, already on the device, and the cell's parameters) and returns a
zero-argument closure that computes the attention output. Setup runs outside the
timed region; only the closure is timed.

:func:`register` only marks a setup function with its :class:`Implementation`; a
:class:`Registry` collects the marked functions of the modules it is given: the
bundled ones (``ringbench.attention.impls``), a plugin file named under ``plugins:``
in the sweep YAML, or an installed package's module declared as an entry point in
the ``ringbench.implementations`` group, named after the implementation. No module
state is kept: each registry holds what it loaded, and nothing is imported before a
config names it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ringbench.attention.models import MemoryModel
from ringbench.attention.references import DENSE, Reference
from ringbench.errors import Invalid, show
from ringbench.vocabulary import ROLES, compact

if TYPE_CHECKING:
    import torch

    from ringbench.attention.comm import WaitClock
    from ringbench.attention.inputs import Inputs
    from ringbench.vocabulary import Cell

ENTRY_POINT_GROUP = "ringbench.implementations"


@dataclass(frozen=True)
class Option:
    """One option an implementation accepts in the YAML; its type is the default's type."""

    default: Any
    choices: tuple[Any, ...] | None = None
    help: str = ""
    short: str | None = None  # the option's name in labels, where it differs from the default

    def validate(self, value: Any, where: str) -> Any:
        if isinstance(self.default, tuple):  # a list of positive integers in the YAML
            if not isinstance(value, list) or not value:
                raise Invalid(where, f"expected a non-empty list of positive integers, got {show(value)}")
            for index, item in enumerate(value):
                if type(item) is not int or not 0 < item <= 2**53:
                    raise Invalid(f"{where}[{index}]", f"expected a positive integer, got {show(item)}")
            return tuple(value)
        expected = type(self.default)
        if expected is float and type(value) is int:
            value = float(value)
        if type(value) is not expected:
            raise Invalid(where, f"expected {expected.__name__}, got {show(value)}")
        if expected is float and not math.isfinite(value):
            raise Invalid(where, f"expected a finite number, got {show(value)}")
        if self.choices is not None and value not in self.choices:
            known = ", ".join(str(c) for c in self.choices)
            raise Invalid(where, f"must be one of {known} (got {show(value)})")
        return value


@dataclass(frozen=True)
class Problem:
    """What setup receives: the cell's inputs, shaped (batch, heads, seq_len, head_dim), and its knobs.

    In one process ``q``, ``k`` and ``v`` are the whole inputs (made on first use).
    With ``world_size`` > 1 this process is rank ``rank`` of a process group, and
    setup takes only the rows its rank holds, with :meth:`shard`: no rank ever makes
    the whole inputs, so the longest sequence a world size runs is not capped by one
    device. Rows are the same wherever they are made (``ringbench.attention.inputs``).

    ``facts`` is for the implementation to note what it actually chose (for example
    the SDPA kernel that ``backend: auto`` resolved to); it is stored in the record.
    ``cell`` is the cell being measured, for setup to consult its memory model, and
    ``memory_headroom`` the bytes this process may still allocate as setup starts (under
    the sweep's memory cap, on the device), None where unknown (a CPU, or a problem
    made by hand).
    """

    inputs: Inputs
    causal: bool
    ring_size: int | None
    options: Mapping[str, Any]
    facts: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1
    comm: WaitClock | None = None  # across processes: hand it sends and waits (see ringbench.attention.comm)
    cell: Cell | None = None
    memory_headroom: int | None = None

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **knobs: Any) -> Problem:
        """A problem over tensors that exist already (see ``inputs.Given``)."""
        from ringbench.attention.inputs import Given  # the registry loads without torch

        return cls(inputs=Given(q, k, v, knobs.pop("dout", None)), **knobs)

    @functools.cached_property
    def _whole(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.inputs.everything(name) for name in "qkv")

    @property
    def q(self) -> torch.Tensor:
        return self._whole[0]

    @property
    def k(self) -> torch.Tensor:
        return self._whole[1]

    @property
    def v(self) -> torch.Tensor:
        return self._whole[2]

    def shard(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k and v at ``positions`` (all batches and heads): leaves of this rank's own, requiring
        gradients in backward passes, so that gradients stop at them."""
        q, k, v = (self.inputs.rows(name, positions).requires_grad_(self.inputs.requires_grad) for name in "qkv")
        return q, k, v

    @property
    def seq_len(self) -> int:
        return self.inputs.shape[2]

    @property
    def device(self) -> torch.device:
        return self.inputs.device

    @property
    def dtype(self) -> torch.dtype:
        return self.inputs.dtype

    def probe(self, rows: int, heads: int | None = None) -> torch.Tensor:
        """An empty (B, heads, rows, D) tensor of the inputs' dtype on their device (all heads unless
        given): for asking a library which kernel would run a shape, without the inputs."""
        return self.inputs.empty(rows, heads)


@dataclass(frozen=True)
class Bench:
    """What setup may return instead of a bare closure.

    ``rank_share`` computes one rank's share of a sharded computation alone (its
    query shard against every K/V shard, with the buffers a rank would hold); it is
    timed and memory-measured separately and reported as a per-rank *projection*.
    ``close`` undoes what setup changed beyond its own tensors (a patched library
    function, say); the worker calls it once the cell is over, however it ended.
    """

    run: Callable[[], torch.Tensor]
    rank_share: Callable[[], object] | None = None
    rows: torch.Tensor | None = None  # sequence positions of run()'s output rows; None: all, in order
    close: Callable[[], None] = lambda: None
    # What backward passes differentiate run()'s output against; None: the problem's q, k, v.
    # Across processes, this rank's shards, so that gradients stop there.
    inputs: tuple[torch.Tensor, ...] | None = None


Setup = Callable[[Problem], "Callable[[], torch.Tensor] | Bench"]
# Hooks over a cell's parameters (a ringbench.vocabulary.Cell): they must not need a device.
CellHook = Callable[[Any], Any]


@dataclass(frozen=True)
class Implementation:
    name: str
    setup: Setup
    options: Mapping[str, Option]
    uses_ring: bool
    distributed: bool
    passes: tuple[str, ...]
    description: str
    reference: Reference | None
    accumulates: str | None
    flops: CellHook | None
    memory_model: MemoryModel | None
    setup_memory: CellHook | None
    excludes: CellHook | None
    check_options: Callable[[Mapping[str, Any]], str | None] | None
    roles: tuple[str, ...]

    def label(self, options: Mapping[str, Any]) -> str:
        """``ring-dilated w=1K,2K,4K r=1,2,4``: the name, and the options that differ from their
        defaults, in the order the implementation declares them."""
        changed = [
            f"{option.short or key}={compact(options[key])}"
            for key, option in self.options.items()
            if options[key] != option.default
        ]
        return " ".join([self.name, *changed])

    def resolve_options(self, given: Mapping[str, Any], where: str) -> dict[str, Any]:
        """Validate user options against the declared ones and fill in defaults."""
        for key in given:
            if key not in self.options:
                known = ", ".join(sorted(self.options)) or "none"
                raise Invalid(f"{where}.{key}", f"unknown option for '{self.name}' (known: {known})")
        options = {
            key: option.validate(given[key], f"{where}.{key}") if key in given else option.default
            for key, option in sorted(self.options.items())
        }
        problem = self.check_options(options) if self.check_options else None
        if problem:
            raise Invalid(where, problem)
        return options


# The attribute register() sets on a setup function.
_MARK = "__ringbench_implementation__"


# Over 60 lines: its docstring documents each of its arguments, which plugins read as the contract.
def register(
    name: str,
    *,
    options: Mapping[str, Option] | None = None,
    uses_ring: bool = False,
    distributed: bool = False,
    passes: tuple[str, ...] = ("forward",),
    description: str = "",
    reference: Reference | None = DENSE,
    accumulates: str | None = None,
    flops: CellHook | None = None,
    memory_model: MemoryModel | None = None,
    setup_memory: CellHook | None = None,
    excludes: CellHook | None = None,
    check_options: Callable[[Mapping[str, Any]], str | None] | None = None,
    roles: tuple[str, ...] = (),
) -> Callable[[Setup], Setup]:
    """Decorator: mark ``setup`` as the implementation ``name``, for a :class:`Registry` to collect.

    ``uses_ring`` says the implementation splits the sequence into ``ring_size``
    shards; the plan then makes one cell per ring size, others get one cell in all.
    ``distributed`` says it also runs one shard per process, for world sizes above 1.
    ``passes`` lists the passes it supports; backward ones need its output to be
    differentiable with respect to q, k and v.
    ``reference`` is the float64 :class:`Reference` its output is checked against
    (dense attention by default; a plugin may bring its own; None: not checked);
    ``accumulates`` the dtype it sums partial
    results in, if coarser than the inputs may be (``float32`` for float32 merges):
    the check's tolerance is then the coarser one's. ``flops(cell)`` gives the modelled
    work in FLOPs (without it dense attention's count is assumed), ``memory_model(cell,
    facts)`` the bytes a call of the cell's pass allocates beyond what it starts with, at
    its peak, for the path setup took as its ``facts`` say, or None where that is not
    modelled (``ringbench.attention.models``); ``setup_memory(cell)`` the bytes setup keeps
    beyond the inputs, buffers it makes once per cell, where there are any. ``excludes(cell)``
    returns a reason to leave a cell out of the plan, ``check_options(options)`` a
    reason to reject a combination of options. ``roles`` names what the report may
    measure others against it as (``baseline``, ``peer``; see ``vocabulary.ROLES``).
    """
    unknown = [role for role in roles if role not in ROLES]
    if unknown:
        raise ValueError(f"implementation '{name}': unknown roles {unknown} (known: {', '.join(ROLES)})")

    def decorate(setup: Setup) -> Setup:
        setattr(
            setup,
            _MARK,
            Implementation(
                name=name,
                setup=setup,
                options=dict(options or {}),
                uses_ring=uses_ring,
                distributed=distributed,
                passes=tuple(passes),
                description=description or (setup.__doc__ or "").strip().split("\n")[0],
                reference=reference,
                accumulates=accumulates,
                flops=flops,
                memory_model=memory_model,
                setup_memory=setup_memory,
                excludes=excludes,
                check_options=check_options,
                roles=tuple(roles),
            ),
        )
        return setup

    return decorate


def _installed() -> dict[str, Any]:
    """Entry points of installed plugins, by implementation name (the entry point's name)."""
    return {entry.name: entry for entry in entry_points(group=ENTRY_POINT_GROUP)}


class Registry:
    """The implementations one config may name: the bundled ones, and those its plugins bring."""

    def __init__(self) -> None:
        self._implementations: dict[str, Implementation] = {}

    @classmethod
    def bundled(cls) -> Registry:
        registry = cls()
        for module in importlib.import_module("ringbench.attention.impls").MODULES:
            registry.add_module(module)
        return registry

    def add_module(self, module: ModuleType) -> None:
        """Collect the implementations ``module`` marked with :func:`register`."""
        for value in vars(module).values():
            implementation = getattr(value, _MARK, None)
            if isinstance(implementation, Implementation):
                self.add(implementation)

    def add(self, implementation: Implementation) -> None:
        known = self._implementations.get(implementation.name)
        if known is not None and known.setup is not implementation.setup:
            raise ValueError(f"implementation '{implementation.name}' is already registered")
        self._implementations[implementation.name] = implementation

    def load_plugins(self, names: tuple[str, ...], folder: Path) -> None:
        """Add the implementations of the plugin files a config names, ``folder/NAME.py`` (the config's folder).

        A plugin is loaded by its file under a name of ringbench's own, never through
        ``sys.path``: it cannot shadow an installed module, and nothing else in the
        folder is imported. A file is run once per process (by content: a copy of one
        elsewhere is the same plugin). Whatever a plugin raises, ``SystemExit`` and
        ``KeyboardInterrupt`` included, becomes one line naming it.
        """
        for index, name in enumerate(names):
            where = f"plugins[{index}]"
            if not name.isidentifier():
                raise Invalid(
                    where, f"expected the name of a Python file beside the config, without .py, got {show(name)}"
                )
            path = folder / f"{name}.py"
            try:
                source = path.read_bytes()
            except OSError as exc:
                raise Invalid(where, f"cannot read {path}: {exc.strerror or exc}") from None
            module_name = f"ringbench_plugin_{hashlib.sha256(source).hexdigest()[:16]}_{name}"
            module = sys.modules.get(module_name) or _run_plugin(module_name, path, name, where)
            try:
                self.add_module(module)
            except ValueError as exc:
                raise Invalid(where, f"plugin {name} ({path}): {exc}") from None

    def known(self) -> list[str]:
        return sorted(set(self._implementations) | set(_installed()))

    def get(self, name: str, where: str = "name") -> Implementation:
        if name not in self._implementations and name in _installed():
            try:  # an installed plugin is imported only once a config names it
                loaded = _installed()[name].load()  # a module, or one marked setup function
                if isinstance(loaded, ModuleType):
                    self.add_module(loaded)
                else:
                    self.add(getattr(loaded, _MARK))
            except Exception as exc:
                raise Invalid(where, f"cannot load the plugin for {show(name)}: {type(exc).__name__}: {exc}") from None
        if name not in self._implementations:
            raise Invalid(where, f"unknown implementation {show(name)} (known: {', '.join(self.known())})")
        return self._implementations[name]


def _run_plugin(module_name: str, path: Path, name: str, where: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None, "a .py file always has a spec with a loader"
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # so that pickling and dataclasses can find its classes
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:  # noqa: B036 - a plugin may fail in any way, exiting included
        del sys.modules[module_name]
        raise Invalid(
            where, f"plugin {name} ({path}) failed on import: {type(exc).__name__}: {show(str(exc))[1:-1]}"
        ) from None
    return module
