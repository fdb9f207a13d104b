"""adapt-eval: measure where fast-weight plasticity helps, on identical episodes under each rule."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click
from adapt_runtime.eval.config import BASELINE, PRESETS, ConfigError, RunConfig
from adapt_runtime.eval.tasks import TASKS


def _ints(flag: str, text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=flag) from None


def _rule_config(text: str | None) -> dict | None:
    if text is None:
        return None
    src = Path(text)
    try:
        raw = json.loads(src.read_text() if src.suffix == ".json" and src.is_file() else text)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not JSON ({e.msg}): {text!r}", param_hint="--rule-config") from None
    if not isinstance(raw, dict):
        raise click.BadParameter('expected an object such as {"hebbian": {"lr": 0.01}}', param_hint="--rule-config")
    return raw


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """Offline harness for adapt-runtime: runs the same episodes under each fast-weight rule, scores them
    teacher-forced and strictly causally, and reports per-episode paired deltas vs the `none` rule with 95%
    CIs, as results.json, samples.jsonl, CSV curves, report.md and PNG plots.

    \b
    adapt-eval run --model llama --rules none,hebbian,gradient --task longdoc-ppl --data book.txt --out runs/a
    adapt-eval report runs/a          # rebuild results, report and plots from the samples
    adapt-eval tasks                  # what each task measures
    """


@main.command()
@click.option("--model", default="llama", show_default=True, help="Model alias, HF id or local folder.")
@click.option("--rules", default="none,hebbian,gradient", show_default=True,
              help="Comma-separated rules; the first must be `none` (the baseline every delta pairs with). A rule "
              "with `@vllm` (e.g. hebbian@vllm) is scored as `adapt-serve --engine vllm` generates: each turn after "
              "the first with S fixed as the turn began, then learned.")
@click.option("--rule-config", help='JSON object (or a .json file) of extra ar.patch options per rule, '
              'e.g. \'{"hebbian": {"lr": 0.01}, "gradient": {"layers": "last:2"}}\'.')
@click.option("--task", "tasks", help="Comma-separated tasks (see `adapt-eval tasks`); default: the preset's.")
@click.option("--data", type=click.Path(exists=True, dir_okay=True), help="Text file (longdoc-ppl, "
              "session-memory) or bAbI file/folder (babi).")
@click.option("--shots", help="Comma-separated shot counts, e.g. 0,1,2,4,8,16 (few-shot tasks).")
@click.option("--ctx-len", help="Comma-separated lengths in tokens: window length (longdoc-ppl, "
              "session-memory), haystack length (niah), filler delay (copy).")
@click.option("--episodes", type=int, help="Episodes per cell (default: the preset's).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed hashed into every random choice.")
@click.option("--chunk-size", type=int, help="Chunk size passed to ar.patch (default: the rule's).")
@click.option("--attn-window", type=int, help="Block-local attention: drop the KV cache every W tokens, so "
              "memory beyond a block must come from the fast weights.")
@click.option("--preset", type=click.Choice(list(PRESETS)), default="quick", show_default=True,
              help="smoke: CI-sized; quick: a first look; full: every task, more episodes.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Replace a run already in --out.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def run(model: str, rules: str, rule_config: str | None, tasks: str | None, data: str | None,
        shots: str | None, ctx_len: str | None, episodes: int | None, seed: int, chunk_size: int | None,
        attn_window: int | None, preset: str, out: str, overwrite: bool, no_progress: bool) -> None:
    """Run the tasks under each rule and write the report into --out."""
    from adapt_runtime.eval.harness import run as run_harness

    rule_list = tuple(r.strip() for r in rules.split(",") if r.strip())
    if rule_list and rule_list[0] != BASELINE and BASELINE not in rule_list:
        rule_list = (BASELINE, *rule_list)
        click.echo(f"note: added the baseline rule {BASELINE!r} in front of --rules", err=True)
    try:
        config = RunConfig.from_preset(
            preset, model=model, rules=rule_list, rule_config=_rule_config(rule_config),
            tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()) if tasks else None, data=data,
            shots=_ints("--shots", shots), ctx_lens=_ints("--ctx-len", ctx_len), episodes=episodes, seed=seed,
            chunk_size=chunk_size, attn_window=attn_window)
        command = "adapt-eval " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        run_harness(config, Path(out), overwrite=overwrite, progress=not no_progress, log=click.echo,
                    command=command)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"report: {Path(out) / 'report.md'}")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def report(run_dir: str) -> None:
    """Rebuild results.json, CSV curves, report.md and plots of RUN_DIR from its samples."""
    from adapt_runtime.eval.report import build_report

    path = Path(run_dir)
    for needed in ("config.json", "samples.jsonl"):
        if not (path / needed).is_file():
            raise click.ClickException(f"{path}: no {needed}; is this an adapt-eval run folder?")
    try:
        build_report(path, log=click.echo)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"report: {path / 'report.md'}")


@main.command()
def tasks() -> None:
    """List the tasks, what they measure and whether they read --data."""
    for name, t in TASKS.items():
        click.echo(f"{name:15s} headline {t.headline:<5s} data: {t.data:<8s} {t.summary}")


@main.command("lm-eval-tasks-dir")
def lm_eval_tasks_dir() -> None:
    """Print the folder of the lm-evaluation-harness task pack (for lm_eval --include_path)."""
    click.echo(str(Path(__file__).resolve().parent / "lm_eval_tasks"))
