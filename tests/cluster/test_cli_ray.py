"""``adapt-serve --ray`` flags: checked before anything starts (no Ray cluster is started here)."""

from __future__ import annotations

import importlib.util

import pytest
from adapt_runtime.serving.cli import main
from click.testing import CliRunner

HAS_EXTRA = all(importlib.util.find_spec(m) is not None for m in ("ray", "redis"))


def test_ray_needs_redis_and_a_state_store():
    result = CliRunner().invoke(main, ["--ray", "--redis", "redis://127.0.0.1:1/0"])
    assert result.exit_code == 2
    assert "--ray needs --redis URL and --state-store URL" in result.output


def test_without_ray_the_flags_are_inert(monkeypatch):
    served = []
    monkeypatch.setattr("adapt_runtime.serving.server.serve", lambda config, log_level: served.append(config))
    result = CliRunner().invoke(main, ["--replicas", "3", "--port", "8123"])
    assert result.exit_code == 0, result.output
    assert served[0].port == 8123


@pytest.mark.skipif(HAS_EXTRA, reason="the ray extra is installed here")
def test_ray_without_the_extra_says_what_to_install(tmp_path):
    args = ["--ray", "--redis", "redis://127.0.0.1:1/0", "--state-store", str(tmp_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "pip install 'adapt-runtime[ray]'" in result.output


@pytest.mark.skipif(not HAS_EXTRA, reason="needs the ray extra: pip install -e '.[ray]'")
def test_ray_with_redis_unreachable_fails_at_start(tmp_path):
    args = ["--ray", "--redis", "redis://127.0.0.1:1/0", "--state-store", str(tmp_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "redis at redis://127.0.0.1:1/0 is unreachable" in result.output
