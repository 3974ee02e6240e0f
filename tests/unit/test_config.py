"""The one config object: TOML, environment, validation with the key named, and a documented example."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from aobd.config import Config, load_config, masked
from aobd.errors import ConfigError
from tests.conftest import ROOT

EXAMPLE = ROOT / "configs" / "aobd.toml"


def _keys(struct: type[msgspec.Struct], prefix: str = "") -> list[str]:
    keys = []
    for field in msgspec.structs.fields(struct):
        kind = field.type
        if isinstance(kind, type) and issubclass(kind, msgspec.Struct):
            keys += _keys(kind, f"{prefix}{field.name}.")
        else:
            keys.append(prefix + field.name)
    return keys


def test_example_config_loads_to_the_defaults() -> None:
    assert load_config(EXAMPLE, env={}) == Config()


def test_example_config_documents_every_key() -> None:
    text = EXAMPLE.read_text()

    def documented(key: str) -> bool:
        return f"{key.rsplit('.', 1)[-1]} =" in text or f"[{key}" in text or f"[[{key}" in text

    missing = [key for key in _keys(Config) if not documented(key)]
    assert not missing, f"configs/aobd.toml does not document: {missing}"


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text('data_dir = "/from/file"\n[security]\nhttp_allow = ["10.0.0.0/8"]\n')
    config = load_config(path, env={"AOBD_DATA_DIR": "/from/env", "AOBD_HTTP_ALLOW": "127.0.0.1:8080, ::1"})
    assert config.data_dir == "/from/env"
    assert config.security.http_allow == ["127.0.0.1:8080", "::1"]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[api]\nlisten = 7070\n", "api.listen"),
        ("[engine]\nfidelity = 'turbo'\n", "engine.fidelity"),
        ("[apii]\nlisten = 'x'\n", "apii"),
        ("data_dir = \n", "not valid TOML"),
        ("[daemon]\ngc_thresholds = [700, 10, 10, 10]\n", "daemon.gc_thresholds"),
        ("[daemon]\ngc_thresholds = [0]\n", "daemon.gc_thresholds"),
        ("[daemon]\nswitch_interval_ms = -1\n", "daemon.switch_interval_ms"),
        ("[api]\nbacklog = 10\n", "api.backlog"),
        ("[api]\nmax_concurrent_requests = 0\n", "api.max_concurrent_requests"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=says.replace(".", r"\.")):
        load_config(path, env={})


def test_masked_hides_tokens_and_workspace_policy_merges(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(
        '[[auth.tokens]]\ntoken = "s3cret"\nworkspace = "acme"\nrole = "admin"\n'
        '[workspaces.acme]\npatches = "approve"\n'
    )
    config = load_config(path, env={})
    assert "s3cret" not in str(masked(config))
    assert config.workspace_policy("acme") == {"patches": "approve"}
    assert config.workspace_policy("other") is None


def test_gc_thresholds_apply_and_an_empty_list_leaves_them_alone(tmp_path: Path) -> None:
    import gc

    from aobd.gctune import tune_gc

    before = gc.get_threshold()
    try:
        path = tmp_path / "gc.toml"
        path.write_text("[daemon]\ngc_thresholds = [5000, 15, 30]\n")
        tune_gc(load_config(path, env={}).daemon.gc_thresholds)
        assert gc.get_threshold() == (5000, 15, 30)
        path.write_text("[daemon]\ngc_thresholds = []\n")
        tune_gc(load_config(path, env={}).daemon.gc_thresholds)
        assert gc.get_threshold() == (5000, 15, 30)  # untouched
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_the_switch_interval_applies_and_zero_leaves_it_alone(tmp_path: Path) -> None:
    import sys

    from aobd.gctune import tune_switch_interval

    before = sys.getswitchinterval()
    try:
        path = tmp_path / "switch.toml"
        path.write_text("[daemon]\nswitch_interval_ms = 2.5\n")
        tune_switch_interval(load_config(path, env={}).daemon.switch_interval_ms)
        assert sys.getswitchinterval() == pytest.approx(0.0025)
        path.write_text("[daemon]\nswitch_interval_ms = 0\n")
        tune_switch_interval(load_config(path, env={}).daemon.switch_interval_ms)
        assert sys.getswitchinterval() == pytest.approx(0.0025)  # untouched
        assert load_config(None, env={}).daemon.switch_interval_ms == 1.0  # the default aobd's processes use
    finally:
        sys.setswitchinterval(before)


def test_the_engine_section_defaults_are_the_engines_own() -> None:
    """The engine's limits are literals in both places (the config must not import the engine, which imports
    asyncio); a run through the library and one through the daemon get the same limits."""
    from aobd.engine.driver import Engine
    from aobd.store.memory import MemoryCas, MemoryEventLog

    engine = Engine(MemoryEventLog(), MemoryCas())
    assert Config().engine.max_inflight == engine.max_inflight
    assert Config().engine.max_computing_runs == engine.admission.limit
