import sys
import textwrap
import types

import pytest
from conftest import PLUGINS

from ringbench.attention import registry
from ringbench.errors import ConfigError, Invalid
from ringbench.sweep import config


def test_register_and_resolve_options():
    @registry.register(
        "test-registry-demo", options={"tile": registry.Option(64, choices=(32, 64)), "scale": registry.Option(1.0)}
    )
    def setup(problem):
        return lambda: problem.q

    demo = registry.Registry()
    demo.add_module(types.SimpleNamespace(setup=setup))
    impl = demo.get("test-registry-demo")
    assert impl.setup is setup and not impl.uses_ring
    assert impl.resolve_options({"scale": 2}, "x") == {"scale": 2.0, "tile": 64}
    with pytest.raises(Invalid, match=r"x.tile: must be one of 32, 64 \(got 48\)"):
        impl.resolve_options({"tile": 48}, "x")
    with pytest.raises(ValueError, match="already registered"):
        demo.add_module(types.SimpleNamespace(other=registry.register("test-registry-demo")(lambda problem: None)))


def test_registries_are_independent():
    """A registry holds what it was given: one config's plugins are not another's implementations."""
    with_plugin = registry.Registry.bundled()
    with_plugin.load_plugins(("fake_impls",), PLUGINS)
    assert "test-wrong" in with_plugin.known()
    assert "test-wrong" not in registry.Registry.bundled().known()


def test_roles_are_declared_at_registration():
    bundled = registry.Registry.bundled()
    assert [name for name in bundled.known() if bundled.get(name).roles] == ["sdpa", "standard"]
    assert bundled.get("standard").roles == ("baseline",) and bundled.get("sdpa").roles == ("peer",)
    with pytest.raises(ValueError, match="unknown roles"):
        registry.register("test-role", roles=("fastest",))


def test_plugin_module_beside_the_config_registers_implementations(write_config):
    (write_config().parent / "beside_config_attention.py").write_text(
        textwrap.dedent("""
        from ringbench import register

        @register("test-mine", uses_ring=True)
        def setup(problem):
            return lambda: problem.v
    """)
    )
    path = write_config(
        "plugins: [beside_config_attention]\nimplementations: [test-mine]\nseq_lens: [8]\nheads: [1]\nhead_dims: [4]\ndtypes: [float32]\n"
    )
    mine = registry.Registry.bundled()
    sweep = config.load(path, mine)
    assert sweep.implementations[0].name == "test-mine"
    assert mine.get("test-mine").uses_ring


def test_plugin_that_raises_on_import_is_a_config_error(write_config):
    (write_config().parent / "broken_plugin.py").write_text("raise RuntimeError('no GPU here')\n")
    path = write_config(
        "plugins: [broken_plugin]\nimplementations: [standard]\nseq_lens: [8]\nheads: [1]\nhead_dims: [4]\ndtypes: [float32]\n"
    )
    with pytest.raises(
        ConfigError,
        match=r"plugins\[0\]: plugin broken_plugin \(.*broken_plugin.py\) failed on import: RuntimeError: no GPU here$",
    ):
        config.load(path)


def test_entry_points_load_only_when_named(tmp_path, monkeypatch):
    # An installed distribution, as pip would lay it out, declaring the entry point.
    (tmp_path / "ep_attention.py").write_text(
        textwrap.dedent("""
        from ringbench import register

        @register("test-entry-point")
        def setup(problem):
            return lambda: problem.q
    """)
    )
    dist = tmp_path / "ep_attention-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-attention\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\ntest-entry-point = ep_attention\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    bundled = registry.Registry.bundled()
    assert "test-entry-point" in bundled.known()
    assert "ep_attention" not in sys.modules  # listed, not imported
    assert bundled.get("test-entry-point").name == "test-entry-point"
    assert "ep_attention" in sys.modules
    monkeypatch.delitem(sys.modules, "ep_attention")  # its folder leaves sys.path with the test: so does it
