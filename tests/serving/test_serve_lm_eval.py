"""lm-evaluation-harness's ``local-completions`` model scores a small local task against adapt-serve (offline),
and its loglikelihoods agree with the server's own echo logprobs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from serve_testing import MODEL, Server

import adapt_runtime as ar

pytest.importorskip("lm_eval")

DOCS = [
    ("Once upon a time, there was a little girl named Lily. She loved to play with her", ["toys", "moon", "engine"]),
    ("Tom went to the park with his mom. They played on the", ["swings", "ocean", "computer"]),
    ("The cat was very hungry. It wanted to eat some", ["food", "rocks", "music"]),
    ("It was a sunny day. The sun was shining in the", ["sky", "box", "shoe"]),
    ("Sam had a red ball. He liked to throw the", ["ball", "house", "river"]),
    ("Mia saw a big dog. The dog wagged its", ["tail", "book", "car"]),
]
TASK = """task: adapt_serve_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def server(launch) -> Server:
    return launch("--rule", "hebbian", keys=())


def _write_task(folder: Path) -> None:
    data = folder / "docs.jsonl"
    rows = [{"context": c, "choices": [" " + x for x in choices], "label": 0} for c, choices in DOCS]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "tiny.yaml").write_text(TASK.format(data=data))


def test_local_completions_scores_a_local_task(server: Server, tmp_path: Path) -> None:
    _write_task(tmp_path)
    out = tmp_path / "results"
    model_args = (f"base_url={server.url}/v1/completions,model={MODEL},tokenizer={ar.bundled_model_dir()},"
                  "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
           "--tasks", "adapt_serve_tiny", "--include_path", str(tmp_path), "--limit", "5",
           "--output_path", str(out), "--log_samples"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    acc = results["results"]["adapt_serve_tiny"]["acc,none"]
    samples = [json.loads(line) for line in next(out.rglob("samples_adapt_serve_tiny_*.jsonl")).open()]
    assert len(samples) == 5
    logliks = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    assert all(math.isfinite(v) and v < 0 for row in logliks for v in row)
    assert acc == sum(row.index(max(row)) == 0 for row in logliks) / 5

    context, choices = DOCS[0]
    with server.http(None) as http:
        ctx_ids = http.post("/tokenize", json={"prompt": context, "add_special_tokens": False}).json()["tokens"]
        ids = http.post("/tokenize", json={"prompt": context + " " + choices[0],
                                           "add_special_tokens": False}).json()["tokens"]
    echo = server.client().completions.create(model=MODEL, prompt=ids, max_tokens=1, echo=True, logprobs=1,
                                              temperature=0)
    ours = sum(echo.choices[0].logprobs.token_logprobs[len(ctx_ids):len(ids)])
    assert logliks[0][0] == pytest.approx(ours, abs=1e-4)
