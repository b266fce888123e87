"""Sweep configs: YAML in, a validated and frozen :class:`Sweep` out.

Every problem becomes a :class:`ConfigError` naming the file and the key path
(``implementations[1].options.backend``), so the CLI can print one line and stop
before anything is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ringbench.attention.registry import Registry
from ringbench.errors import ConfigError, Invalid, show
from ringbench.sweep.longest import SearchSpec
from ringbench.vocabulary import DTYPES, PASSES

GRAPH_MODES = ("auto", "always", "never")
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


@dataclass(frozen=True)
class TimingBudget:
    """How long to sample a cell: budgets in milliseconds, counts clamped to [min_reps, max_reps].

    After ``rep_ms`` worth of samples, sampling goes on while the relative noise
    (IQR / median) is above ``noise_target``, until ``max_ms`` of samples or
    ``max_reps`` samples. A sample is one call, or with ``sample_ms`` > 0 the mean
    per call of back-to-back calls lasting at least that long. ``cold_l2`` flushes
    the GPU's L2 cache before each repetition. ``cuda_graph``: ``auto`` times a
    call whose launch takes the host longer than half its GPU work as CUDA-graph
    replays (its plain calls are timed too, and kept), ``always`` every call that
    can be captured, ``never`` none.

    The defaults bring the sample grid's cells, 15 µs to 3 ms each, under the noise
    target on an H100 or H200.
    """

    warmup_ms: float = 100.0
    rep_ms: float = 300.0
    min_reps: int = 10
    max_reps: int = 5000
    noise_target: float = 0.02
    max_ms: float = 10_000.0
    sample_ms: float = 0.0
    cold_l2: bool = False
    cuda_graph: str = "auto"


@dataclass(frozen=True, repr=False)
class ImplementationChoice:
    """An implementation named in the config, with every option resolved (defaults filled in), and
    the label tables and figures show: the config's, or the name with the options set otherwise
    than by default."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()
    label: str = ""

    def __repr__(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class Sweep:
    name: str
    description: str
    implementations: tuple[ImplementationChoice, ...]
    plugins: tuple[str, ...]
    seq_lens: tuple[int, ...]
    ring_sizes: tuple[int, ...]
    world_sizes: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    heads: tuple[int, ...]
    head_dims: tuple[int, ...]
    dtypes: tuple[str, ...]
    causal: tuple[bool, ...]
    passes: tuple[str, ...]
    device: str
    seed: int
    shuffle: bool
    output_root: str
    cell_timeout_s: float  # a cell running longer is stopped with its worker and recorded as `timeout`
    skip_oversized_inputs: bool  # record a cell whose q, k, v alone exceed the device's memory as `skipped`
    threads: int | None  # torch intra-op threads per host; None: its physical cores
    timing: TimingBudget
    # Beside or instead of seq_lens: search each implementation's longest seq_len (see sweep.longest).
    longest: SearchSpec | None = None
    # Each worker's CUDA caching allocator is capped at this many GiB (see run.memory.cap).
    memory_cap_gib: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The normalised config as plain JSON types; what runs store and hash. The optional sections a
        config leaves out are left out here too, so that configs without them keep the hash that runs
        stored before those sections existed (and so can still be resumed)."""
        clean = json.loads(json.dumps(dataclasses.asdict(self)))
        if clean["longest"]:  # a search over every pass and causal setting, as before these keys existed
            clean["longest"] = {key: value for key, value in clean["longest"].items() if value != []}
        return {key: value for key, value in clean.items() if key not in _OPTIONAL or value is not None}

    @property
    def hash(self) -> str:
        """sha256 of the normalised config, 16 hex digits: equal hashes mean equal sweeps."""
        canonical = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


_OPTIONAL = ("longest", "memory_cap_gib")


# ---- value readers: each takes (value, where) and returns the clean value or raises Invalid


# No axis, count or duration of a sweep comes near this; larger integers are refused, not run.
MAX_INT = 2**53


def _positive_int(value: Any, where: str) -> int:
    if type(value) is not int or not 0 < value <= MAX_INT:
        raise Invalid(where, f"expected a positive integer up to 2^53, got {show(value)}")
    return value


def _non_negative_int(value: Any, where: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_INT:
        raise Invalid(where, f"expected a non-negative integer up to 2^53, got {show(value)}")
    return value


def _positive_number(value: Any, where: str) -> float:
    if type(value) not in (int, float) or not 0 < value <= MAX_INT:
        raise Invalid(where, f"expected a finite positive number, got {show(value)}")
    return float(value)


def _non_negative_number(value: Any, where: str) -> float:
    if type(value) not in (int, float) or not 0 <= value <= MAX_INT:
        raise Invalid(where, f"expected a finite non-negative number, got {show(value)}")
    return float(value)


def _boolean(value: Any, where: str) -> bool:
    if type(value) is not bool:
        raise Invalid(where, f"expected true or false, got {show(value)}")
    return value


def _string(value: Any, where: str) -> str:
    if type(value) is not str:
        raise Invalid(where, f"expected a string, got {show(value)}")
    return value


def _output_root(value: Any, where: str) -> str:
    """A folder for run folders, taken from where ringbench runs. An absolute path, or one that
    climbs with '..', is refused: a config must not steer writes outside the tree it is run in
    (``--output-root`` on the command line may point anywhere)."""
    value = _string(value, where)
    if not value.strip() or "\0" in value:
        raise Invalid(where, f"expected a folder path, got {show(value)}")
    if Path(value).is_absolute() or value.startswith("~"):
        raise Invalid(
            where,
            f"must be relative to where ringbench runs (got {show(value)}); give --output-root to write elsewhere",
        )
    if ".." in Path(value).parts:
        raise Invalid(where, f"must not climb out with '..' (got {show(value)}); name the folder itself")
    return value


def _threads(value: Any, where: str) -> int | None:
    """``auto`` (None: the host's physical cores) or a positive thread count."""
    if value == "auto":
        return None
    if type(value) is not int or value <= 0:
        raise Invalid(where, f"expected auto or a positive integer, got {show(value)}")
    return value


def _device(value: Any, where: str) -> str:
    if type(value) is not str or not _DEVICE.match(value):
        raise Invalid(where, f"expected auto, cpu, cuda or cuda:N, got {show(value)}")
    return value


def _one_of(choices: tuple[str, ...]) -> Callable[[Any, str], str]:
    def read(value: Any, where: str) -> str:
        if value not in choices:
            raise Invalid(where, f"must be one of {', '.join(choices)} (got {show(value)})")
        return value

    return read


def _list_of(read_item: Callable[[Any, str], Any]) -> Callable[[Any, str], tuple]:
    def read(value: Any, where: str) -> tuple:
        if not isinstance(value, list):
            raise Invalid(where, f"expected a list, got {show(value)}")
        if not value:
            raise Invalid(where, "must not be empty")
        items = tuple(read_item(item, f"{where}[{i}]") for i, item in enumerate(value))
        for i, item in enumerate(items):
            if item in items[:i]:
                raise Invalid(f"{where}[{i}]", f"duplicate value {show(item)}")
        return items

    return read


def _mapping(value: Any, where: str, allowed: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Invalid(where, f"expected a mapping, got {show(value)}")
    for key in value:
        if key not in allowed:
            path = f"{where}.{key}" if where else str(key)
            raise Invalid(path, f"unknown key (known: {', '.join(sorted(allowed))})")
    return value


_REQUIRED = object()


def _read_fields(raw: dict[str, Any], where: str, fields: dict[str, tuple[Callable, Any]]) -> dict[str, Any]:
    """Read every field of a mapping with its reader, filling defaults; unknown keys fail."""
    _mapping(raw, where, fields)
    clean = {}
    for key, (read, default) in fields.items():
        path = f"{where}.{key}" if where else key
        if key in raw:
            clean[key] = read(raw[key], path)
        elif default is _REQUIRED:
            raise Invalid(path, "required key is missing")
        else:
            clean[key] = default
    return clean


def _timing(value: Any, where: str) -> TimingBudget:
    defaults = TimingBudget()
    fields = {
        "warmup_ms": (_positive_number, defaults.warmup_ms),
        "rep_ms": (_positive_number, defaults.rep_ms),
        "min_reps": (_positive_int, defaults.min_reps),
        "max_reps": (_positive_int, defaults.max_reps),
        "noise_target": (_positive_number, defaults.noise_target),
        "max_ms": (_positive_number, defaults.max_ms),
        "sample_ms": (_non_negative_number, defaults.sample_ms),
        "cold_l2": (_boolean, defaults.cold_l2),
        "cuda_graph": (_one_of(GRAPH_MODES), defaults.cuda_graph),
    }
    budget = TimingBudget(**_read_fields(value, where, fields))
    if budget.min_reps > budget.max_reps:
        raise Invalid(f"{where}.min_reps", f"must not exceed max_reps ({budget.min_reps} > {budget.max_reps})")
    return budget


def _longest(value: Any, where: str) -> SearchSpec:
    fields = {
        "start": (_positive_int, _REQUIRED),
        "granularity": (_positive_int, _REQUIRED),
        "max": (_positive_int, None),
        "passes": (_list_of(_one_of(PASSES)), ()),
        "causal": (_list_of(_boolean), ()),
    }
    spec = SearchSpec(**_read_fields(value, where, fields))
    # Every probe is a multiple of the granularity: the lengths sharding needs (divisible by the
    # world size, by twice it for zigzag) then hold for every probe once they hold for one granule.
    for key in ("start", "max"):
        bound = getattr(spec, key)
        if bound is not None and bound % spec.granularity:
            raise Invalid(f"{where}.{key}", f"must be a multiple of granularity ({bound} % {spec.granularity})")
    if spec.max is not None and spec.max < spec.start:
        raise Invalid(f"{where}.max", f"must not be below start ({spec.max} < {spec.start})")
    return spec


def _check_scope(spec: SearchSpec, clean: dict[str, Any]) -> None:
    """The passes and causal settings a search is limited to are among the sweep's own."""
    for axis in ("passes", "causal"):
        for index, value in enumerate(getattr(spec, axis)):
            if value not in clean[axis]:
                among = ", ".join(map(str, clean[axis])).lower()
                message = f"{str(value).lower()} is not among the sweep's {axis} ({among})"
                raise Invalid(f"longest.{axis}[{index}]", message)


def _implementation(registry: Registry) -> Callable[[Any, str], ImplementationChoice]:
    def read(value: Any, where: str) -> ImplementationChoice:
        if isinstance(value, str):  # shorthand: "- sdpa"
            value = {"name": value}
        fields = {
            "name": (_string, _REQUIRED),
            "options": (lambda v, w: _mapping(v, w, _ANY_KEY), {}),
            "label": (_label, None),
        }
        clean = _read_fields(value, where, fields)
        implementation = registry.get(clean["name"], f"{where}.name")
        options = implementation.resolve_options(clean["options"], f"{where}.options")
        label = clean["label"] or implementation.label(options)
        return ImplementationChoice(clean["name"], tuple(options.items()), label)

    return read


def _label(value: Any, where: str) -> str:
    text = _string(value, where)
    if not text.strip() or "\n" in text:
        raise Invalid(where, f"expected a one-line label, got {show(value)}")
    return text.strip()


def _implementations(registry: Registry) -> Callable[[Any, str], tuple[ImplementationChoice, ...]]:
    """The implementations list, looked up in ``registry``: each entry a different computation under a
    label of its own."""

    def read(value: Any, where: str) -> tuple[ImplementationChoice, ...]:
        choices = _list_of(_implementation(registry))(value, where)
        for i, choice in enumerate(choices):
            for j, earlier in enumerate(choices[:i]):
                if (choice.name, choice.options) == (earlier.name, earlier.options):
                    raise Invalid(f"{where}[{i}]", f"same implementation and options as {where}[{j}]")
                if choice.label == earlier.label:
                    raise Invalid(f"{where}[{i}].label", f"{show(choice.label)} already labels {where}[{j}]")
        return choices

    return read


class _AnyKey(dict):
    """Allowed-keys table that accepts every key (options are checked by their implementation)."""

    def __contains__(self, key: object) -> bool:
        return True


_ANY_KEY = _AnyKey()


# Bounds on what a config's YAML may build, checked before anything is built from it: no sweep
# needs more, and past them an alias bomb or deep nesting would cost the host its memory or stack.
MAX_DEPTH = 32
MAX_VALUES = 100_000
MAX_DIGITS = 30


class _Oversized:
    """An integer literal too long to be a sweep's value: kept, so that its key can be named."""

    def __init__(self, digits: int):
        self.digits = digits

    def __repr__(self) -> str:
        return f"a {self.digits}-digit integer"


class _StrictLoader(yaml.SafeLoader):
    """A safe loader that also refuses duplicate keys, which plain YAML silently overwrites, keys
    that are not plain scalars, and nesting deeper than MAX_DEPTH."""

    depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nesting deeper than {MAX_DEPTH} levels", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a plain word, not a list or mapping", key_node.start_mark
                )
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {show(key)}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node):
        digits = sum(character.isdigit() for character in node.value)
        return _Oversized(digits) if digits > MAX_DIGITS else super().construct_yaml_int(node)


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


def _values(node: yaml.Node, counted: dict[int, int]) -> int:
    """How many values ``node`` stands for once its aliases are expanded (shared nodes counted once
    per use), stopping early past MAX_VALUES."""
    if id(node) in counted:
        return counted[id(node)]
    total = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    else:
        children = []
    for child in children:
        total += _values(child, counted)
        if total > MAX_VALUES:
            break
    counted[id(node)] = total
    return total


def _parse_yaml(text: str, source: str) -> Any:
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _values(node, {}) > MAX_VALUES:
            raise ConfigError(source, "", f"the YAML expands to more than {MAX_VALUES:,} values (aliases?)")
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(source, where, f"invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, "", f"invalid YAML: {exc}") from None
    finally:
        loader.dispose()


MAX_CONFIG_BYTES = 2**20
DEFAULT_CELL_TIMEOUT_S = 1800.0


def load(path: str | Path, registry: Registry | None = None) -> Sweep:
    """Read, parse and validate a sweep config; raise ConfigError on the first problem.

    Implementations are looked up in ``registry`` (by default a fresh one of the bundled
    implementations), and the config's plugins are added to it.
    """
    registry = registry or Registry.bundled()
    source = str(path)
    try:
        if Path(path).stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(
                source, "", f"config is larger than {MAX_CONFIG_BYTES // 2**20} MiB; is it the right file?"
            )
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, "", f"cannot read config: {exc}") from None
    raw = _parse_yaml(text, source)
    if not isinstance(raw, dict):
        raise ConfigError(source, "", "expected a mapping of config keys at the top level")
    try:
        plugins = _list_of(_string)(raw["plugins"], "plugins") if "plugins" in raw else ()
        # Plugins register implementations, so they load before implementation names are checked.
        registry.load_plugins(plugins, Path(path).resolve().parent)
        fields = {
            "name": (_string, Path(path).stem),
            "description": (_string, ""),
            "plugins": (lambda v, w: plugins, ()),
            "implementations": (_implementations(registry), _REQUIRED),
            # A config lists lengths, searches for the longest, or both.
            "seq_lens": (_list_of(_positive_int), () if "longest" in raw else _REQUIRED),
            "ring_sizes": (_list_of(_positive_int), (1,)),
            "world_sizes": (_list_of(_positive_int), (1,)),
            "batch_sizes": (_list_of(_positive_int), (1,)),
            "heads": (_list_of(_positive_int), _REQUIRED),
            "head_dims": (_list_of(_positive_int), _REQUIRED),
            "dtypes": (_list_of(_one_of(DTYPES)), _REQUIRED),
            "causal": (_list_of(_boolean), (False,)),
            "passes": (_list_of(_one_of(PASSES)), ("forward",)),
            "device": (_device, "auto"),
            "seed": (_non_negative_int, 0),
            "shuffle": (_boolean, False),
            "output_root": (_output_root, "results"),
            "cell_timeout_s": (_positive_number, DEFAULT_CELL_TIMEOUT_S),
            "skip_oversized_inputs": (_boolean, True),
            "threads": (_threads, None),
            "timing": (_timing, TimingBudget()),
            "longest": (_longest, None),
            "memory_cap_gib": (_positive_number, None),
        }
        clean = _read_fields(raw, "", fields)
        if clean["longest"]:
            _check_scope(clean["longest"], clean)
        return Sweep(**clean)
    except Invalid as exc:
        raise ConfigError(source, exc.where, exc.message) from None
