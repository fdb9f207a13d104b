"""Training resumes exactly: N steps in one run give the same parameters, bit for bit, as k steps, a checkpoint,
and N - k more from it (model, rule, optimizer, step, sampler and RNG states all restored)."""

from __future__ import annotations

import torch
from train_testing import write_text

from adapt_runtime.train.checkpoint import step_folders
from adapt_runtime.train.loop import TrainConfig, train
from adapt_runtime.train.params import RuleParams


def config(tmp_path, out: str, steps: int) -> TrainConfig:
    return TrainConfig(
        data=str(tmp_path / "text.txt"),
        out=str(tmp_path / out),
        n_layers=2,
        hidden=16,
        heads=4,
        ffn=24,
        form="hebbian",
        target="error",
        modulation="gate",
        alpha=True,
        chunk_size=4,
        learn="all",
        steps=steps,
        batch=2,
        seq_len=16,
        window=8,
        holdout=0.1,
        seed=5,
    )


def weights(folder) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    rule = RuleParams.load(folder)
    return {
        **{f"model.{k}": v for k, v in model.state_dict().items()},
        **{f"rule.{k}": v for k, v in rule.state_dict().items()},
    }


def test_resume_is_exact(tmp_path):
    write_text(tmp_path / "text.txt", words=400)
    quiet = lambda line: None  # noqa: E731
    straight = train(config(tmp_path, "a", 4), progress=False, log=quiet)
    train(config(tmp_path, "b", 2), progress=False, log=quiet)
    resumed = train(config(tmp_path, "b", 4), resume=True, progress=False, log=quiet)
    assert [s for s, _ in step_folders(tmp_path / "b")] == [2, 4]
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    first = weights(step_folders(tmp_path / "b")[0][1])
    assert any(not torch.equal(first[k], a[k]) for k in a)  # training moved the weights
