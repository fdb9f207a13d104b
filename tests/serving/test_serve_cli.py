"""``adapt-serve``'s options are made from ``ServerConfig``'s fields: one default and one help text per knob."""

from __future__ import annotations

import dataclasses

import click
import pytest
from adapt_runtime.serving.cli import build_config, main
from adapt_runtime.serving.config import ServerConfig

FIELDS = {f.name: f for f in dataclasses.fields(ServerConfig)}


def _parse(*args: str) -> ServerConfig:
    params = dict(main.make_context("adapt-serve", list(args)).params)
    for name in ("log_level", "ray_mode", "replicas", "max_replicas", "redis_url", "state_store", "ray_address",
                 "lease_ttl"):
        params.pop(name)
    return build_config(params.pop("api_keys"), params.pop("api_key_file"), params.pop("rule_config"), params)


def test_every_config_field_is_an_option_with_the_fields_help() -> None:
    options = {p.name: p for p in main.params if isinstance(p, click.Option)}
    for name, field in FIELDS.items():
        assert name in options, f"no option for ServerConfig.{name}"
        assert options[name].help == field.metadata["help"]


def test_no_flags_give_the_configs_own_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ADAPT_SERVE_API_KEY", raising=False)
    assert _parse() == ServerConfig()


def test_sizes_durations_and_json_parse_to_the_fields_units(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ADAPT_SERVE_API_KEY", raising=False)
    config = _parse("--session-memory-budget", "512K", "--session-ttl", "30m", "--read-timeout", "2",
                    "--rule-config", '{"lr": 0.5}', "--api-key", "k-1", "--api-key", "k-2",
                    "--no-auto-create-sessions", "--dtype", "bfloat16", "--state-rank", "8", "--prefill-chunk", "0")
    assert config.session_memory_budget == 512 * 1024 and config.session_ttl == 1800.0
    assert config.read_timeout == 2.0 and config.rule_config == {"lr": 0.5} and config.api_keys == ("k-1", "k-2")
    assert not config.auto_create_sessions and config.dtype == "bfloat16"
    assert config.state_rank == 8 and config.prefill_chunk == 0


@pytest.mark.parametrize("args", [["--rule", "no-such-rule"], ["--session-ttl", "soon"], ["--rule-config", "[1]"],
                                  ["--max-sessions", "0"]], ids=["rule", "duration", "json", "validation"])
def test_bad_values_are_usage_errors(args: list[str]) -> None:
    with pytest.raises(click.UsageError):
        _parse(*args)
