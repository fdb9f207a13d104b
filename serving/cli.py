"""``adapt-serve``: the command line. Maps flags onto ServerConfig by keyword and starts the server."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click
from adapt_runtime.serving.cluster.cli_ray import cluster_options, cluster_server
from adapt_runtime.serving.config import (
    DEFAULT_PREFILL_CHUNK,
    ServerConfig,
    parse_rule_config,
    read_api_key_file,
)

_SIZE_UNITS = {"k": 2**10, "m": 2**20, "g": 2**30}


def _bytes(value: str) -> int:
    """``2097152``, ``512K``, ``2M``, ``1G`` (powers of 1024)."""
    text = value.strip().lower().removesuffix("ib").removesuffix("b")
    scale = _SIZE_UNITS.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in _SIZE_UNITS else text
    try:
        return int(float(number) * scale)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a size like 2097152, 512K, 2M or 1G") from None


def _seconds(value: str) -> float:
    """``3600``, ``90s``, ``30m``, ``24h``, ``7d``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = value.strip().lower()
    scale = units.get(text[-1:], 1)
    try:
        return float(text[:-1] if text[-1:] in units else text) * scale
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a duration like 3600, 30m, 24h or 7d") from None


class RuleName(click.ParamType):
    """A name in the rule registry (``adapt_runtime.rules.RULES`` and its entry-point plugins), read when parsed."""

    name = "rule"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        from adapt_runtime.rules import rule_names

        return "[" + "|".join(rule_names()) + "]"

    def convert(self, value: str, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from adapt_runtime.rules import rule_names

        if value not in rule_names():
            self.fail(f"{value!r} is not a registered rule (one of {', '.join(rule_names())})", param, ctx)
        return value


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--model", default="llama", show_default=True,
              help="Model to serve: 'llama' (the bundled stories260K, offline), a local HF directory or a hub id.")
@click.option("--rule", type=RuleName(), default="hebbian", show_default=True,
              help="How each session's fast weights learn while it reads; 'none' serves the plain model. Any rule "
                   "in the registry: adapt_runtime.rules.RULES, and packages' 'adapt_runtime.rules' entry points.")
@click.option("--rule-config", default=None, metavar="JSON",
              help='Rule settings as a JSON object, e.g. \'{"lr": 0.01, "chunk_size": 32, "layers": "last:2"}\'.')
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind. The default answers only this machine; use 0.0.0.0 with --api-key.")
@click.option("--port", default=8000, show_default=True, type=int, help="TCP port.")
@click.option("--api-key", "api_keys", multiple=True, metavar="KEY",
              help="Accepted bearer key (repeat for several). Also read from ADAPT_SERVE_API_KEY. With any key "
                   "set, every route but /health needs one; sessions belong to the key that made them.")
@click.option("--api-key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="File with one accepted key per line ('#' comments allowed).")
@click.option("--served-model-name", default=None, help="Model id shown in /v1/models (default: --model).")
@click.option("--max-model-len", type=int, default=None,
              help="Longest context (prompt + answer) in tokens; default: the model's own maximum.")
@click.option("--max-sessions", type=int, default=1024, show_default=True,
              help="Most sessions held (in memory and on disk); creating more answers 429.")
@click.option("--auto-create-sessions/--no-auto-create-sessions", default=True, show_default=True,
              help="Create a session on first use of an unknown X-Session-ID (any id of 1-128 characters "
                   "[A-Za-z0-9_.:-]), in the caller's own namespace; with --no-..., only POST /v1/sessions creates.")
@click.option("--session-memory-budget", default="256M", show_default=True, metavar="BYTES",
              help="Bytes of session state kept in memory; least recently used sessions go to disk beyond it.")
@click.option("--session-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory where sessions are persisted (written on every turn, reloaded on restart). "
                   "Without it, evicted sessions go to a temporary directory deleted at exit.")
@click.option("--session-ttl", default="7d", show_default=True, metavar="DURATION",
              help="Sessions unused for this long are deleted, files included (e.g. 3600, 30m, 24h, 7d).")
@click.option("--max-request-bytes", default="2M", show_default=True, metavar="BYTES",
              help="Largest request body; bigger ones answer 413 (state imports get room for one state).")
@click.option("--max-concurrent-requests", type=int, default=64, show_default=True,
              help="Inference requests in flight at once; more answer 429 with Retry-After.")
@click.option("--chat-template", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Jinja chat template file; default: the tokenizer's, or a plain 'User:/Assistant:' layout.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Model weight dtype; default: the checkpoint's own. Fast weights stay float32.")
@click.option("--device", default=None, help="Torch device, e.g. cpu or cuda:0; default cpu.")
@click.option("--threads", type=int, default=None,
              help="Torch CPU threads; default: torch's own. Small models decode fastest with 1 (extra threads "
                   "mostly spin, and starve when the machine is shared).")
@click.option("--max-read-tokens", type=int, default=262144, show_default=True,
              help="Most tokens one request may read into a session's memory (POST /v1/sessions/{id}/read, and "
                   "the overflow of a long_prompt request).")
@click.option("--max-choices-per-request", type=int, default=64, show_default=True,
              help="Most choices (prompts x n) one request may ask for; more answer 400.")
@click.option("--max-tokens-per-request", type=int, default=262144, show_default=True,
              help="Most tokens one request may cost (its prompt tokens plus choices x max_tokens); more answer 400.")
@click.option("--max-sessions-per-key", type=int, default=None,
              help="Most sessions one API key may hold; more answer 429. Default: a quarter of --max-sessions when "
                   "several keys are set, else --max-sessions.")
@click.option("--read-timeout", default="30s", show_default=True, metavar="DURATION",
              help="Time a client has to send a request's headers, and then its body; slower ones are cut off.")
@click.option("--send-timeout", default="60s", show_default=True, metavar="DURATION",
              help="Time a client may leave a response (or a stream) unread before the server drops it and frees "
                   "its slot.")
@click.option("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, show_default=True,
              help="Most prompt tokens read between two decode steps, so a long prompt does not stall the "
                   "streams that are decoding (read in pieces, round-robin); 0 reads each prompt whole.")
@click.option("--state-rank", type=int, default=None,
              help="Hold each session's fast weights as rank-R factors B A (R (d + f) numbers per plastic layer "
                   "instead of d f): many more sessions fit in --session-memory-budget, at a small quality cost "
                   "(README, 'Compact state'). Their state files and adapters hold the factors. Default: dense.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="Server log verbosity.")
@cluster_options
def main(api_keys: tuple[str, ...], api_key_file: Path | None, rule_config: str | None,
         session_memory_budget: str, session_ttl: str, max_request_bytes: str, log_level: str,
         read_timeout: str, send_timeout: str, **options: object) -> None:
    """Serve a model over the OpenAI API, with fast-weight memory per session.

    Each session (create one with POST /v1/sessions, then send its id in the X-Session-ID header or the
    session_id field) keeps its own fast weights: the model adapts to what the session reads and keeps it
    beyond the context window. Requests without a session adapt within themselves and keep nothing.
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ray_serve = cluster_server(options)
    keys = list(api_keys)
    if os.environ.get("ADAPT_SERVE_API_KEY"):
        keys.append(os.environ["ADAPT_SERVE_API_KEY"])
    if api_key_file is not None:
        keys.extend(read_api_key_file(api_key_file))
    try:
        config = ServerConfig(
            api_keys=tuple(dict.fromkeys(keys)),
            rule_config=parse_rule_config(rule_config),
            session_memory_budget=_bytes(session_memory_budget),
            session_ttl=_seconds(session_ttl),
            max_request_bytes=_bytes(max_request_bytes),
            read_timeout=_seconds(read_timeout),
            send_timeout=_seconds(send_timeout),
            **options,  # type: ignore[arg-type]
        )
    except (TypeError, ValueError) as err:
        raise click.UsageError(str(err)) from None
    from adapt_runtime.serving.server import serve

    try:
        (ray_serve or serve)(config, log_level=log_level)
    except (ValueError, LookupError) as err:
        click.echo(f"adapt-serve: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
