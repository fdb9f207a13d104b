"""``long_memory_sweep.py`` with a trained checkpoint (``learned@DIR``) beside the frozen model's rules, on tiny
settings, and ``heldout_split.py``'s cut: the tune file is a prefix of the sweep's tune part."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from adapt_runtime.eval.text_source import synthetic_story

import adapt_runtime as ar
from adapt_runtime.train import PlasticityConfig, RuleParams
from adapt_runtime.train.forward import down_shapes

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


def data_dir(tmp_path: Path, stories: int = 60) -> Path:
    folder = tmp_path / "data"
    (folder / "tinystories").mkdir(parents=True)
    text = "".join(synthetic_story(0, i) + "\n\n" for i in range(stories))
    (folder / "tinystories" / "tinystories_val.txt").write_text(text, encoding="utf-8")
    return folder


def checkpoint(tmp_path: Path) -> Path:
    """The bundled model with a learned rule on its top two layers, saved as adapt-train saves a checkpoint."""
    model, tokenizer = ar.load_model("llama")
    config = PlasticityConfig(form="delta", target="error", alpha=True, chunk_size=32, layers=(3, 4), init_rate=0.5)
    params = RuleParams(config, down_shapes(model, config.layers))
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config.save(folder)
    params.save(folder)
    return folder


def test_the_sweep_takes_a_trained_checkpoint_and_pairs_it_with_the_frozen_rules(tmp_path: Path) -> None:
    ckpt, out = checkpoint(tmp_path), tmp_path / "rows.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "long_memory_sweep.py"), "--data-dir", str(data_dir(tmp_path)),
           "--sources", "tinystories", "--split", "heldout", "--lengths", "200,400", "--probe", "64",
           "--episodes", "2", "--window", "128", "--rules", f"none,hebbian,learned@{ckpt},none@{ckpt}",
           "--versus", "hebbian", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["rule"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"none", "hebbian", f"learned@{ckpt}", f"none@{ckpt}"}
    assert rows[f"learned@{ckpt}"]["model"] == str(ckpt) and rows["none"]["model"] == "llama"
    for n in ("200", "400"):
        # the same base weights: no writes is the fresh state, whichever folder they were loaded from
        for rule in ("none", f"none@{ckpt}"):
            assert all(abs(e[n]["seen"]) < 1e-5 and abs(e[n]["unseen"]) < 1e-5 for e in rows[rule]["episodes"])
        assert any(abs(e[n]["seen"]) > 1e-4 for e in rows[f"learned@{ckpt}"]["episodes"])  # it wrote
    assert rows["hebbian"]["fresh"] == rows[f"learned@{ckpt}"]["fresh"]  # every row against one fresh state
    assert "paired difference from hebbian" in done.stdout
    assert f"| tinystories | learned@{ckpt} |" in done.stdout.split("paired difference")[1]


def test_the_held_out_file_holds_the_sweeps_held_out_part(tmp_path: Path) -> None:
    from heldout_split import cut_offset
    from long_memory_sweep import TUNE_FRACTION

    _, tokenizer = ar.load_model("llama")
    encode = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    text = (data_dir(tmp_path, stories=12) / "tinystories" / "tinystories_val.txt").read_text()
    ids = encode(text)
    at = cut_offset(text, encode)
    assert 0 < at < len(text) and text[at - 1] == "\n"
    tune = encode(text[:at])
    assert tune == ids[: len(tune)] and len(tune) <= int(len(ids) * TUNE_FRACTION)  # tune text only
    assert len(tune) > 0.6 * len(ids)  # and not much less
    assert torch.tensor(ids[len(tune):]).numel() >= len(ids) - int(len(ids) * TUNE_FRACTION)


def test_paired_runs_pairs_a_trained_checkpoint_with_the_frozen_models_rules(tmp_path: Path, capsys) -> None:
    from paired_runs import main as paired_main

    ckpt = checkpoint(tmp_path)
    text = data_dir(tmp_path, stories=30) / "tinystories" / "tinystories_val.txt"
    runs = {"frozen": ("llama", "none,hebbian"), "a": (str(ckpt), "none,learned")}
    for label, (model, rules) in runs.items():
        cmd = [str(Path(sys.executable).parent / "adapt-eval"), "run", "--model", model, "--rules", rules,
               "--task", "longdoc-ppl,session-memory", "--ctx-len", "128", "--episodes", "3", "--data", str(text),
               "--preset", "smoke", "--out", str(tmp_path / label), "--no-progress"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
    capsys.readouterr()
    paired_main([f"frozen={tmp_path / 'frozen'}", f"a={tmp_path / 'a'}", "--base", "frozen:none",
                 "--versus", "frozen:hebbian", "--rows", "frozen:none,frozen:hebbian,a:none,a:learned"])
    out = capsys.readouterr().out
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| longdoc-ppl")]
    by_row = {r[4]: r for r in rows}
    assert list(by_row) == ["frozen:none", "frozen:hebbian", "a:none", "a:learned"]
    assert by_row["a:none"][5] == "3" and by_row["a:none"][7].startswith("+0.0000")  # same weights, paired
    assert by_row["frozen:none"][7] == "" and by_row["frozen:hebbian"][8] == ""  # a row is not paired with itself
    assert "[" in by_row["a:learned"][7] and "[" in by_row["a:learned"][8]
    assert any(line.startswith("| session-memory") for line in out.splitlines())


def test_paired_runs_refuses_runs_on_other_episodes(tmp_path: Path) -> None:
    from paired_runs import collect

    row = {"task": "longdoc-ppl", "variant": "text", "shots": None, "ctx_len": 128, "episode": 0, "rule": "none",
           "metrics": {"nll": 1.0}}
    try:
        collect({"x": [{**row, "fingerprint": "aa"}], "y": [{**row, "fingerprint": "bb"}]})
    except SystemExit as e:
        assert "another episode" in str(e)
    else:
        raise AssertionError("collect paired episodes with other tokens")
