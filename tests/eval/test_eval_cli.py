"""adapt-eval end to end: the smoke preset, the result schema, report rebuilds and bad input."""

import json
from pathlib import Path

import pytest
import yaml
from adapt_runtime.eval.cli import main
from adapt_runtime.eval.results import ROW_KEYS, validate_row
from adapt_runtime.eval.tasks import TASKS
from click.testing import CliRunner

RULES = ["none", "hebbian", "gradient"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    res = CliRunner().invoke(main, ["run", "--preset", "smoke", "--rules", ",".join(RULES), "--out", str(out),
                                    "--no-progress"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return out, res.output


def test_smoke_writes_every_output(smoke_run):
    out, printed = smoke_run
    for name in ("config.json", "env.json", "results.json", "results.csv", "samples.jsonl", "report.md"):
        assert (out / name).is_file(), name
    assert list((out / "curves").glob("*.csv"))
    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert any(p.startswith("loss_vs_position_") for p in plots) and any(p.startswith("acc_vs_shots_") for p in plots)
    assert "Δ gradient" in printed  # the summary table


def test_results_follow_the_schema(smoke_run):
    out, _ = smoke_run
    results = json.loads((out / "results.json").read_text())
    assert results["schema_version"] == 1 and results["config_hash"].startswith("sha256:")
    rows = results["results"]
    assert rows and all(set(ROW_KEYS) <= set(r) for r in rows)
    for r in rows:
        validate_row(r)
    assert {r["rule"] for r in rows} == set(RULES)
    assert {r["task"] for r in rows} == set(json.loads((out / "config.json").read_text())["config"]["tasks"])
    for r in rows:
        if r["rule"] == "none":
            assert r["delta_vs_none"]["value"] == 0.0


def test_every_rule_scored_identical_episodes(smoke_run):
    out, _ = smoke_run
    seen: dict[str, set] = {}
    for line in (out / "samples.jsonl").read_text().splitlines():
        s = json.loads(line)
        seen.setdefault(s["rule"], set()).add((s["task"], s["variant"], s["shots"], s["ctx_len"], s["episode"],
                                               s["fingerprint"]))
    assert seen["none"] == seen["hebbian"] == seen["gradient"]


def test_report_rebuild_is_reproducible(smoke_run):
    out, _ = smoke_run
    before = json.loads((out / "results.json").read_text())
    res = CliRunner().invoke(main, ["report", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "results.json").read_text()) == before
    assert "**" in (out / "report.md").read_text() or all(
        not (r["delta_vs_none"] or {}).get("excludes_zero") for r in before["results"])


def test_existing_run_is_not_overwritten(smoke_run):
    out, _ = smoke_run
    before = (out / "samples.jsonl").read_bytes()
    res = CliRunner().invoke(main, ["run", "--preset", "smoke", "--out", str(out), "--no-progress"])
    assert res.exit_code != 0 and "--overwrite" in res.output
    assert (out / "samples.jsonl").read_bytes() == before


@pytest.mark.parametrize(("args", "message"), [
    (["--rules", "hebbian,none"], "first rule"),
    (["--task", "nope"], "unknown task"),
    (["--task", "babi"], "--data"),
    (["--shots", "1,x"], "comma-separated integers"),
    (["--rule-config", "{not json"], "not JSON"),
    (["--rule-config", '{"gradient": {"lr": 1}}', "--rules", "none,hebbian"], "not in --rules"),
    (["--episodes", "0"], "--episodes"),
    (["--task", "niah", "--ctx-len", "1024"], "no episodes fit"),
], ids=["rule-order", "task", "babi-no-data", "shots", "rule-config-json", "rule-config-rule", "episodes",
        "over-context"])
def test_bad_input_gets_a_clear_error(tmp_path, args, message):
    res = CliRunner().invoke(main, ["run", "--preset", "smoke", "--out", str(tmp_path / "x"), *args])
    assert res.exit_code != 0 and message in res.output
    assert not (tmp_path / "x" / "samples.jsonl").exists()


def test_attention_window_run_is_recorded_and_scored(tmp_path):
    out = tmp_path / "window"
    res = CliRunner().invoke(main, ["run", "--task", "copy", "--rules", "none,gradient", "--attn-window", "32",
                                    "--ctx-len", "64", "--episodes", "2", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["config"]["attn_window"] == 32
    rows = json.loads((out / "results.json").read_text())["results"]
    assert {r["rule"] for r in rows} == {"none", "gradient"} and all(r["n"] == 2 for r in rows)


def test_tasks_lists_every_task():
    res = CliRunner().invoke(main, ["tasks"])
    assert res.exit_code == 0 and all(name in res.output for name in TASKS)


def test_lm_eval_pack_is_where_the_cli_says():
    res = CliRunner().invoke(main, ["lm-eval-tasks-dir"])
    pack = Path(res.output.strip())
    yamls = list(pack.glob("*.yaml"))
    assert res.exit_code == 0 and yamls
    loader = type("L", (yaml.SafeLoader,), {})
    loader.add_constructor("!function", lambda ld, node: ld.construct_scalar(node))
    for y in yamls:
        cfg = yaml.load(y.read_text(), Loader=loader)
        if "group" in cfg:
            continue
        module = cfg["custom_dataset"].split(".")[0]
        assert (pack / f"{module}.py").is_file() and cfg["task"].startswith("adapt_")


@pytest.mark.parametrize(("fn", "kwargs"), [
    ("assoc_recall_docs", {"shots": 4}),
    ("label_map_docs", {"shots": 4, "variant": "symbol"}),
    ("niah_docs", {"sentences": 12, "depth": 50}),
], ids=["assoc-recall", "label-map", "niah"])
def test_lm_eval_generators_make_valid_documents(fn, kwargs):
    pytest.importorskip("datasets")
    import importlib.util

    pack = Path(CliRunner().invoke(main, ["lm-eval-tasks-dir"]).output.strip())
    spec = importlib.util.spec_from_file_location("adapt_tasks_under_test", pack / "adapt_tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    docs = getattr(module, fn)(n=6, seed=0, version=1.0, model="llama", **kwargs)["test"]  # lm-eval merges extras
    assert len(docs) == 6
    for d in docs:
        assert 0 <= d["label"] < len(d["choices"]) and len(set(d["choices"])) == len(d["choices"])
        assert d["prompt"] and not d["prompt"].endswith(" ")
    again = getattr(module, fn)(n=6, seed=0, **kwargs)["test"]
    assert list(again) == list(docs)
