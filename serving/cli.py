"""``adapt-serve``: the command line. One option per ``ServerConfig`` field (its default and help are the field's),
then the server."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click
from adapt_runtime.serving.cluster.cli_ray import cluster_options, cluster_server
from adapt_runtime.serving.config import ServerConfig, parse_rule_config, read_api_key_file
from adapt_runtime.serving.types import CliOptions

F = TypeVar("F", bound=Callable[..., object])
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


class Json(click.ParamType):
    """A JSON object (``--rule-config``)."""

    name = "json"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> dict:
        if isinstance(value, dict):
            return value
        try:
            return parse_rule_config(str(value))
        except ValueError as err:
            self.fail(str(err), param, ctx)


class Bytes(click.ParamType):
    name = "bytes"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        return value if isinstance(value, int) else _bytes(str(value))


class Duration(click.ParamType):
    name = "duration"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float:
        return float(value) if isinstance(value, (int, float)) else _seconds(str(value))


def _option(f: dataclasses.Field) -> Callable[[F], F]:
    """The ``adapt-serve`` option of one ``ServerConfig`` field: its name, default and help come from the field."""
    meta, kind = f.metadata, f.metadata.get("kind")
    flag = meta.get("flag") or "--" + f.name.replace("_", "-")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]  # stubs: MISSING or a factory
    shown = meta.get("shown")  # a size or duration as written (it parses back to ``default``: tests)
    kwargs: CliOptions = {"help": meta["help"], "metavar": meta.get("metavar"),
                              "default": default if shown is None else shown, "show_default": default is not None}
    if kind == "switch":
        return click.option(f"{flag}/--no-{flag[2:]}", f.name, **kwargs)
    if kind == "keys":
        kwargs.update(multiple=True, show_default=False)
    elif kind == "rule":
        kwargs["type"] = RuleName()
    elif kind == "json":
        kwargs.update(type=Json(), default=None, show_default=False)
    elif kind == "bytes":
        kwargs["type"] = Bytes()
    elif kind == "duration":
        kwargs["type"] = Duration()
    elif kind == "dir":
        kwargs["type"] = click.Path(file_okay=False, path_type=Path)
    elif kind == "file":
        kwargs["type"] = click.Path(exists=True, dir_okay=False)
    elif kind and kind.startswith("choice:"):
        kwargs["type"] = click.Choice(kind.removeprefix("choice:").split("|"))
    elif f.type in ("int", "int | None"):
        kwargs["type"] = int
    return click.option(flag, f.name, **kwargs)


def config_options(fn: F) -> F:
    """One option per ``ServerConfig`` field, in the dataclass's order."""
    for f in reversed(dataclasses.fields(ServerConfig)):
        fn = _option(f)(fn)
    return fn


def build_config(api_keys: tuple[str, ...], api_key_file: Path | None, rule_config: dict | None,
                 options: CliOptions) -> ServerConfig:
    """The ``ServerConfig`` of parsed options: keys from the flags, ``ADAPT_SERVE_API_KEY`` and the key file."""
    keys = list(api_keys)
    if os.environ.get("ADAPT_SERVE_API_KEY"):
        keys.append(os.environ["ADAPT_SERVE_API_KEY"])
    if api_key_file is not None:
        keys.extend(read_api_key_file(api_key_file))
    json_fields = {f.name for f in dataclasses.fields(ServerConfig) if f.metadata.get("kind") == "json"}
    options = {name: ({} if value is None and name in json_fields else value) for name, value in options.items()}
    try:
        return ServerConfig(api_keys=tuple(dict.fromkeys(keys)), rule_config=rule_config or {}, **options)
    except (TypeError, ValueError) as err:
        raise click.UsageError(str(err)) from None


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@config_options
@click.option("--api-key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="File with one accepted key per line ('#' comments allowed).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="Server log verbosity.")
@cluster_options
def main(api_keys: tuple[str, ...], api_key_file: Path | None, rule_config: dict | None, log_level: str,
         **options: object) -> None:
    """Serve a model over the OpenAI API, with fast-weight memory per session.

    Each session (create one with POST /v1/sessions, then send its id in the X-Session-ID header or the
    session_id field) keeps its own fast weights: the model adapts to what the session reads and keeps it
    beyond the context window. Requests without a session adapt within themselves and keep nothing.
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ray_serve = cluster_server(options)
    config = build_config(api_keys, api_key_file, rule_config, options)
    from adapt_runtime.serving.server import serve

    try:
        (ray_serve or serve)(config, log_level=log_level)
    except (ValueError, LookupError) as err:
        click.echo(f"adapt-serve: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
