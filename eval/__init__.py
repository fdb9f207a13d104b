"""adapt-eval: the offline harness. Runs identical episodes under each fast-weight rule and reports paired deltas.

    from adapt_runtime.eval import RunConfig, run
    cfg = RunConfig.from_preset("quick", model="llama", rules=("none", "gradient"), tasks=("longdoc-ppl",),
                                data="book.txt")
    run(cfg, Path("runs/book"))          # config.json, samples.jsonl, results.json, curves, report.md, plots
"""

from adapt_runtime.eval.config import PRESETS, ConfigError, RunConfig
from adapt_runtime.eval.harness import run
from adapt_runtime.eval.report import build_report
from adapt_runtime.eval.tasks import TASKS, get_task

__all__ = ["PRESETS", "TASKS", "ConfigError", "RunConfig", "build_report", "get_task", "run"]
