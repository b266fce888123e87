import dataclasses

import pytest
from conftest import BASE_CONFIG

from ringbench.attention.registry import Registry
from ringbench.errors import ConfigError
from ringbench.sweep import config


def replace(old: str, new: str) -> str:
    assert old in BASE_CONFIG
    return BASE_CONFIG.replace(old, new)


ERRORS = [
    (
        "yaml syntax",
        replace("heads: [2]", "heads: [2"),
        "line 9, column 10: invalid YAML: expected ',' or ']', but got ':'",
    ),
    (
        "yaml mapping in sequence",
        replace("seq_lens: [64, 96]", "seq_lens: [64, 96]\n  bad: indent"),
        "line 8, column 3: invalid YAML: expected <block end>, but found '<block mapping start>'",
    ),
    ("duplicate key", BASE_CONFIG + "heads: [4]\n", "line 16, column 1: invalid YAML: duplicate key 'heads'"),
    ("top level not a mapping", "- 1\n- 2\n", "expected a mapping of config keys at the top level"),
    (
        "unknown top-level key",
        BASE_CONFIG + "seq_len: [1]\n",
        "seq_len: unknown key (known: batch_sizes, causal, cell_timeout_s, description, device, dtypes, head_dims, heads, "
        "implementations, longest, memory_cap_gib, name, output_root, passes, plugins, ring_sizes, seed, seq_lens, "
        "shuffle, skip_oversized_inputs, threads, timing, world_sizes)",
    ),
    (
        "unknown timing key",
        replace("  max_reps: 5", "  max_reps: 5\n  reps: 3"),
        "timing.reps: unknown key (known: cold_l2, cuda_graph, max_ms, max_reps, min_reps, noise_target, rep_ms, sample_ms, warmup_ms)",
    ),
    (
        "unknown implementation key",
        replace("  - name: standard", "  - name: standard\n    option: {}"),
        "implementations[0].option: unknown key (known: label, name, options)",
    ),
    (
        "unknown option",
        replace("      backend: auto", "      backend: auto\n      tile: 64"),
        "implementations[1].options.tile: unknown option for 'sdpa' (known: backend)",
    ),
    (
        "bad option value",
        replace("backend: auto", "backend: flsh"),
        "implementations[1].options.backend: must be one of auto, flash, efficient, cudnn, math (got 'flsh')",
    ),
    (
        "bad option type",
        replace("backend: auto", "backend: 3"),
        "implementations[1].options.backend: expected str, got 3",
    ),
    (
        "options that contradict each other",
        replace("  - name: sdpa", "  - {name: ulysses, options: {chunks: 2}}\n  - name: sdpa"),
        "implementations[1].options: chunks > 1 pipelines heads, own_rows_first overlaps within one chunk: "
        "set own_rows_first: never",
    ),
    (
        "unknown implementation",
        replace("  - name: sdpa", "  - name: rign"),
        "implementations[1].name: unknown implementation 'rign' (known: {known})",
    ),
    (
        "missing implementation name",
        replace("  - name: standard", "  - {}"),
        "implementations[0].name: required key is missing",
    ),
    (
        "duplicate implementation",
        replace("  - name: standard", "  - name: standard\n  - standard"),
        "implementations[1]: duplicate value standard",
    ),
    ("empty list", replace("seq_lens: [64, 96]", "seq_lens: []"), "seq_lens: must not be empty"),
    ("not a list", replace("seq_lens: [64, 96]", "seq_lens: 64"), "seq_lens: expected a list, got 64"),
    ("zero size", replace("heads: [2]", "heads: [0]"), "heads[0]: expected a positive integer up to 2^53, got 0"),
    (
        "negative size",
        replace("seq_lens: [64, 96]", "seq_lens: [64, -96]"),
        "seq_lens[1]: expected a positive integer up to 2^53, got -96",
    ),
    (
        "float size",
        replace("head_dims: [16]", "head_dims: [16.0]"),
        "head_dims[0]: expected a positive integer up to 2^53, got 16.0",
    ),
    ("bool size", replace("heads: [2]", "heads: [true]"), "heads[0]: expected a positive integer up to 2^53, got True"),
    ("string size", replace("heads: [2]", "heads: ['2']"), "heads[0]: expected a positive integer up to 2^53, got '2'"),
    ("duplicate size", replace("seq_lens: [64, 96]", "seq_lens: [64, 64]"), "seq_lens[1]: duplicate value 64"),
    (
        "bad dtype",
        replace("dtypes: [float32]", "dtypes: [fp32]"),
        "dtypes[0]: must be one of float16, bfloat16, float32, float64 (got 'fp32')",
    ),
    ("bad causal", BASE_CONFIG + "causal: [yes please]\n", "causal[0]: expected true or false, got 'yes please'"),
    (
        "unknown pass",
        BASE_CONFIG + "passes: [sideways]\n",
        "passes[0]: must be one of forward, backward, forward+backward (got 'sideways')",
    ),
    ("bad device", BASE_CONFIG + "device: gpu\n", "device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
    ("negative seed", BASE_CONFIG + "seed: -1\n", "seed: expected a non-negative integer up to 2^53, got -1"),
    ("bad budget", replace("rep_ms: 2", "rep_ms: 0"), "timing.rep_ms: expected a finite positive number, got 0"),
    ("min above max", replace("min_reps: 2", "min_reps: 9"), "timing.min_reps: must not exceed max_reps (9 > 5)"),
    ("missing axis", replace("heads: [2]\n", ""), "heads: required key is missing"),
    (
        "output root climbing out",
        BASE_CONFIG + "output_root: results/../../elsewhere\n",
        "output_root: must not climb out with '..' (got 'results/../../elsewhere'); name the folder itself",
    ),
    ("empty output root", BASE_CONFIG + "output_root: ' '\n", "output_root: expected a folder path, got ' '"),
    (
        "zero cell timeout",
        BASE_CONFIG + "cell_timeout_s: 0\n",
        "cell_timeout_s: expected a finite positive number, got 0",
    ),
    (
        "missing plugin",
        BASE_CONFIG + "plugins: [no_such_module]\n",
        "plugins[0]: cannot read {folder}/no_such_module.py: No such file or directory",
    ),
]


@pytest.mark.parametrize("text, expected", [case[1:] for case in ERRORS], ids=[case[0] for case in ERRORS])
def test_config_errors_name_file_and_key(write_config, text, expected):
    path = write_config(text)
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert str(caught.value) == f"{path}: {expected}".replace("{known}", ", ".join(Registry.bundled().known())).replace(
        "{folder}", str(path.parent)
    )
    assert "\n" not in str(caught.value)


def test_bundled_implementations_are_known():
    assert {"dilated", "ring", "ring-dilated", "sdpa", "standard"} <= set(Registry.bundled().known())


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read config: .*No such file"):
        config.load(tmp_path / "nope.yaml")


def test_valid_config_is_frozen_and_filled_with_defaults(write_config):
    sweep = config.load(write_config())
    assert sweep.seq_lens == (64, 96)
    assert sweep.ring_sizes == (1,) and sweep.batch_sizes == (1,) and sweep.causal == (False,)
    assert sweep.passes == ("forward",) and sweep.device == "auto" and sweep.output_root == "results"
    assert sweep.implementations[1].options == (("backend", "auto"),)
    assert sweep.implementations[0].options == ()
    assert sweep.timing == config.TimingBudget(
        warmup_ms=1.0,
        rep_ms=2.0,
        min_reps=2,
        max_reps=5,
        noise_target=0.02,
        max_ms=10_000.0,
        cold_l2=False,
        cuda_graph="auto",
    )
    assert sweep.threads is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        sweep.seq_lens = (1,)


def test_string_shorthand_and_defaulted_options(write_config):
    sweep = config.load(
        write_config(BASE_CONFIG.replace("  - name: sdpa\n    options:\n      backend: auto\n", "  - sdpa\n"))
    )
    assert [repr(choice) for choice in sweep.implementations] == ["standard", "sdpa"]
    assert dict(sweep.implementations[1].options) == {"backend": "auto"}


def test_labels_name_the_options_set_otherwise_than_by_default_or_are_given(write_config):
    sweep = config.load(
        write_config(
            "implementations:\n"
            "  - {name: ring-dilated, options: {segment_lengths: [1024, 2048, 4096], dilation_rates: [1, 2, 4]}}\n"
            "  - {name: ring-dilated, options: {segment_lengths: [2048, 4096], kernel: math}}\n"
            "  - {name: ring, options: {zigzag: true}}\n"
            "  - {name: sdpa, options: {backend: math}, label: '  sdpa on the math path '}\n"
            "  - {name: dilated, options: {segment_lengths: [1048576, 1536]}}\n"
            "seq_lens: [64]\nheads: [1]\nhead_dims: [8]\ndtypes: [float32]\n"
        )
    )
    assert [choice.label for choice in sweep.implementations] == [
        "ring-dilated w=1K,2K,4K r=1,2,4",
        "ring-dilated kernel=math",
        "ring zigzag=true",
        "sdpa on the math path",
        "dilated w=1M,1536",
    ]


@pytest.mark.parametrize(
    "entries, message",
    [
        (
            "[{name: sdpa, label: fast}, {name: standard, label: fast}]",
            "implementations[1].label: 'fast' already labels implementations[0]",
        ),
        (
            "[{name: sdpa}, {name: sdpa, options: {backend: auto}, label: b}]",
            "implementations[1]: same implementation and options as implementations[0]",
        ),
        ("[{name: sdpa, label: ''}]", "implementations[0].label: expected a one-line label, got ''"),
        ("[{name: sdpa, label: [1]}]", "implementations[0].label: expected a string, got [1]"),
    ],
)
def test_labels_are_one_line_and_tell_implementations_apart(write_config, entries, message):
    path = write_config(f"implementations: {entries}\nseq_lens: [64]\nheads: [1]\nhead_dims: [8]\ndtypes: [float32]\n")
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert str(caught.value) == f"{path}: {message}"


def test_config_hash_ignores_formatting_but_not_values(write_config):
    first = config.load(write_config())
    reformatted = config.load(write_config("# comment\n" + BASE_CONFIG.replace("[64, 96]", "[64,   96]"), "b.yaml"))
    changed = config.load(write_config(BASE_CONFIG.replace("[64, 96]", "[64, 128]"), "c.yaml"))
    assert first.hash == reformatted.hash != changed.hash


def test_yaml_tags_that_build_objects_are_refused(write_config):
    path = write_config(BASE_CONFIG + "description: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="could not determine a constructor"):
        config.load(path)


def test_huge_and_non_utf8_files_are_refused(tmp_path):
    huge = tmp_path / "huge.yaml"
    huge.write_text("# padding\n" * 1_100_000)
    with pytest.raises(ConfigError, match=r"huge\.yaml: config is larger than 1 MiB; is it the right file\?$"):
        config.load(huge)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"binary\.yaml: cannot read config: 'utf-8' codec can't decode byte 0xff"):
        config.load(binary)
