"""``adapt-serve --rule`` takes whatever the rule registry holds: a rule put in ``RULES``, or a package's
``adapt_runtime.rules`` entry point (how a rule reaches every server process without code of its own)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from adapt_runtime.serving.config import ServerConfig
from serve_testing import Server

from adapt_runtime.rules import RULES, Rule

RECALL = '''
import torch
import adapt_runtime as ar
from adapt_runtime.rules import Write


class Recall(ar.Rule):  # each position's next-token embedding, written at its key (the README's example)
    name, capture = "recall", frozenset({"x"})

    def bind(self, model, arch, config):
        self.U = model.get_output_embeddings().weight.detach()

    def write(self, chunk):
        beta = torch.full((len(chunk),), chunk.lr / len(chunk), device=chunk.labels.device)
        return [Write(i, self.U[chunk.labels].float(), chunk.x[i], beta) for i in chunk.layers]
'''


def test_a_rule_put_in_the_registry_is_a_server_rule() -> None:
    with pytest.raises(ValueError, match="rule"):
        ServerConfig(rule="echo-chamber")

    class EchoChamber(Rule):
        name = "echo-chamber"

    RULES["echo-chamber"] = EchoChamber
    try:
        assert ServerConfig(rule="echo-chamber").rule == "echo-chamber"
    finally:
        del RULES["echo-chamber"]


def test_a_plugin_rule_is_served_by_adapt_serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "recall_rule.py").write_text(textwrap.dedent(RECALL))
    meta = plugin / "recall_rule-0.1.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: recall-rule\nVersion: 0.1\n")
    (meta / "entry_points.txt").write_text("[adapt_runtime.rules]\nrecall = recall_rule:Recall\n")
    monkeypatch.setenv("PYTHONPATH", str(plugin))
    server = Server(["--rule", "recall", "--session-dir", str(tmp_path / "sessions")], tmp_path / "server.log")
    try:
        with server.http() as http:
            prompt = " ".join(["Once upon a time there was a little girl who liked to play."] * 6)
            done = http.post("/v1/completions", headers={"X-Session-ID": "plugin"},
                             json={"model": "llama", "prompt": prompt, "max_tokens": 4})
            assert done.status_code == 200, done.text
        info = server.session_info("plugin")
        assert info["writes"] > 0 and info["tokens_seen"] > 32, info
    finally:
        server.stop()
