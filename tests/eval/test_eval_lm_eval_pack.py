"""The lm-eval task pack end to end: lm-eval's local-completions client scores a live adapt-serve."""

import math
import os
from pathlib import Path

import pytest

# Before lm_eval imports `datasets`, which reads these once: no hub look-ups (tests never use the network).
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm-eval[api]
httpx = pytest.importorskip("httpx")

PACK = Path(__file__).resolve().parents[2] / "eval" / "lm_eval_tasks"
TASKS = ["adapt_assoc_recall_mc", "adapt_label_map_symbol", "adapt_niah_mc"]


@pytest.fixture(scope="module")
def server():
    from adapt_runtime.serving.launch import ServerProcess

    proc = ServerProcess(["--model", "llama", "--rule", "hebbian"], startup_timeout=60)
    try:
        yield f"{proc.url}/v1/completions"
    finally:
        proc.stop()


def test_lm_eval_scores_adapt_serve_with_the_pack(server):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model="local-completions",
                          model_args=f"model=llama,base_url={server},num_concurrent=1,max_retries=1,max_length=512",
                          tasks=TASKS, task_manager=TaskManager(include_path=str(PACK)),
                          limit=4, bootstrap_iters=0, log_samples=True)
    for task in TASKS:
        assert out["n-samples"][task]["effective"] == 4
        samples = out["samples"][task]
        assert len(samples) == 4
        for sample in samples:
            # one (loglikelihood, is_greedy) per choice, as the server scored them
            lls = [float(resp[0]) for resp in sample["filtered_resps"]]
            assert len(lls) >= 2 and all(math.isfinite(x) and x < 0 for x in lls), lls
            assert len(set(lls)) > 1, f"every choice scored the same: {lls}"
            gold = int(sample["target"])
            assert sample["acc"] == float(max(range(len(lls)), key=lls.__getitem__) == gold)
        assert out["results"][task]["acc,none"] == pytest.approx(sum(x["acc"] for x in samples) / 4)
