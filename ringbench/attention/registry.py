"""The registry of attention implementations: one contract for bundled and user code.

An implementation is a *setup* function. It receives a :class:`Problem` (the input
tensors, already on the device, and the cell's parameters) and returns a
zero-argument closure that computes the attention output. Setup runs outside the
timed region; only the closure is timed.

Users add implementations without editing ringbench, either from a module named
under ``plugins:`` in the sweep YAML or from an installed package that declares an
entry point in the ``ringbench.implementations`` group, named after the
implementation. Both simply import a module whose top level calls :func:`register`,
and neither is imported before a config names it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ringbench.errors import Invalid, show
from ringbench.vocabulary import compact

if TYPE_CHECKING:
    import torch

    from ringbench.attention.comm import WaitClock

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
    """What setup receives: inputs shaped (batch, heads, seq_len, head_dim) and the cell's knobs.

    ``facts`` is for the implementation to note what it actually chose (for example
    the SDPA kernel that ``backend: auto`` resolved to); it is stored in the record.

    With ``world_size`` > 1 this process is rank ``rank`` of a process group: q, k, v
    are the whole (identical on every rank) inputs, and setup must keep only what
    its rank holds, since the worker frees them after setup.
    """

    q: "torch.Tensor"
    k: "torch.Tensor"
    v: "torch.Tensor"
    causal: bool
    ring_size: int | None
    options: Mapping[str, Any]
    facts: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1
    comm: "WaitClock | None" = None  # across processes: hand it sends and waits (see ringbench.attention.comm)


@dataclass(frozen=True)
class Bench:
    """What setup may return instead of a bare closure.

    ``rank_share`` computes one rank's share of a sharded computation alone (its
    query shard against every K/V shard, with the buffers a rank would hold); it is
    timed and memory-measured separately and reported as a per-rank *projection*.
    ``close`` undoes what setup changed beyond its own tensors (a patched library
    function, say); the worker calls it once the cell is over, however it ended.
    """

    run: Callable[[], "torch.Tensor"]
    rank_share: Callable[[], object] | None = None
    rows: "torch.Tensor | None" = None  # sequence positions of run()'s output rows; None: all, in order
    close: Callable[[], None] = lambda: None
    # What backward passes differentiate run()'s output against; None: the problem's q, k, v.
    # Across processes, this rank's shards, so that gradients stop there.
    inputs: "tuple[torch.Tensor, ...] | None" = None


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
    reference: str
    accumulates: str | None
    flops: CellHook | None
    memory_model: Callable[[Any, Mapping[str, Any]], int] | None
    excludes: CellHook | None
    check_options: Callable[[Mapping[str, Any]], str | None] | None

    def label(self, options: Mapping[str, Any]) -> str:
        """``ring-dilated w=1K,2K,4K r=1,2,4``: the name, and the options that differ from their
        defaults, in the order the implementation declares them."""
        changed = [f"{option.short or key}={compact(options[key])}" for key, option in self.options.items()
                   if options[key] != option.default]
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


_implementations: dict[str, Implementation] = {}
_discovered = False


def register(
    name: str,
    *,
    options: Mapping[str, Option] | None = None,
    uses_ring: bool = False,
    distributed: bool = False,
    passes: tuple[str, ...] = ("forward",),
    description: str = "",
    reference: str = "dense",
    accumulates: str | None = None,
    flops: CellHook | None = None,
    memory_model: Callable[[Any, Mapping[str, Any]], int] | None = None,
    excludes: CellHook | None = None,
    check_options: Callable[[Mapping[str, Any]], str | None] | None = None,
) -> Callable[[Setup], Setup]:
    """Decorator: register ``setup`` under ``name``.

    ``uses_ring`` says the implementation splits the sequence into ``ring_size``
    shards; the plan then makes one cell per ring size, others get one cell in all.
    ``distributed`` says it also runs one shard per process, for world sizes above 1.
    ``passes`` lists the passes it supports; backward ones need its output to be
    differentiable with respect to q, k and v.
    ``reference`` names the float64 reference its output is checked against
    (``dense``, ``dilated``, or ``none``); ``accumulates`` the dtype it sums partial
    results in, if coarser than the inputs may be (``float32`` for float32 merges):
    the check's tolerance is then the coarser one's. ``flops(cell)`` and ``memory_model(cell, facts)``
    give the modelled work and memory beyond the inputs, in FLOPs and bytes, the
    memory for the path setup took as its ``facts`` say; without ``flops`` dense
    attention's count is assumed. ``excludes(cell)``
    returns a reason to leave a cell out of the plan, ``check_options(options)`` a
    reason to reject a combination of options.
    """

    def decorate(setup: Setup) -> Setup:
        if name in _implementations and _implementations[name].setup is not setup:
            raise ValueError(f"implementation '{name}' is already registered")
        _implementations[name] = Implementation(
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
            excludes=excludes,
            check_options=check_options,
        )
        return setup

    return decorate


def _discover() -> None:
    """Import the bundled implementations, once. Installed plugins wait until named."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    importlib.import_module("ringbench.attention.impls")


def _installed() -> dict[str, Any]:
    """Entry points of installed plugins, by implementation name (the entry point's name)."""
    return {entry.name: entry for entry in entry_points(group=ENTRY_POINT_GROUP)}


# Plugin files already run in this process, by content: a copy of one elsewhere is the same plugin.
_loaded_plugins: set[str] = set()


def load_plugins(names: tuple[str, ...], folder: Path) -> None:
    """Run the plugin files a config names, ``folder/NAME.py`` (the config's folder), each once.

    A plugin is loaded by its file under a name of ringbench's own, never through
    ``sys.path``: it cannot shadow an installed module, and nothing else in the
    folder is imported. Whatever a plugin raises, ``SystemExit`` and
    ``KeyboardInterrupt`` included, becomes one line naming it.
    """
    _discover()
    for index, name in enumerate(names):
        where = f"plugins[{index}]"
        if not name.isidentifier():
            raise Invalid(where, f"expected the name of a Python file beside the config, without .py, got {show(name)}")
        path = folder / f"{name}.py"
        try:
            source = path.read_bytes()
        except OSError as exc:
            raise Invalid(where, f"cannot read {path}: {exc.strerror or exc}") from None
        digest = hashlib.sha256(source).hexdigest()
        if digest in _loaded_plugins:
            continue
        spec = importlib.util.spec_from_file_location(f"ringbench_plugin_{digest[:16]}_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # so that pickling and dataclasses can find its classes
        try:
            spec.loader.exec_module(module)
        except BaseException as exc:  # noqa: B036 - a plugin may fail in any way, exiting included
            del sys.modules[spec.name]
            raise Invalid(where, f"plugin {name} ({path}) failed on import: {type(exc).__name__}: "
                                 f"{show(str(exc))[1:-1]}") from None
        _loaded_plugins.add(digest)


def known() -> list[str]:
    _discover()
    return sorted(set(_implementations) | set(_installed()))


def get(name: str, where: str = "name") -> Implementation:
    _discover()
    if name not in _implementations and name in _installed():
        try:  # an installed plugin is imported only once a config names it
            _installed()[name].load()
        except Exception as exc:
            raise Invalid(where, f"cannot load the plugin for {show(name)}: {type(exc).__name__}: {exc}") from None
    if name not in _implementations:
        raise Invalid(where, f"unknown implementation {show(name)} (known: {', '.join(known())})")
    return _implementations[name]
