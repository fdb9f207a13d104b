"""``adapt-train`` end to end on a tiny model: --help, a few steps from scratch with a progress bar, --resume, and
the checkpoint served by the runtime with the learned rule (its state equals the training forward's)."""

from __future__ import annotations

import torch
from click.testing import CliRunner
from train_testing import write_text

import adapt_runtime as ar
from adapt_runtime.train import PlasticLM, RuleParams
from adapt_runtime.train.checkpoint import load_trainer_state, step_folders
from adapt_runtime.train.cli import main


def test_help_explains():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for words in ("backprop through S", "--resume", "--learn", "adapt-serve --model", "--window"):
        assert words in result.output


def test_trains_resumes_and_serves(tmp_path):
    write_text(tmp_path / "text.txt", words=400)
    out = tmp_path / "run"
    args = [
        "--data",
        str(tmp_path / "text.txt"),
        "--out",
        str(out),
        "--n-layers",
        "2",
        "--hidden",
        "16",
        "--heads",
        "4",
        "--ffn",
        "24",
        "--form",
        "gradient",
        "--modulation",
        "gate",
        "--chunk-size",
        "4",
        "--seq-len",
        "16",
        "--window",
        "8",
        "--batch",
        "2",
        "--steps",
        "2",
        "--eval-every",
        "2",
        "--eval-streams",
        "2",
        "--holdout",
        "0.2",
        "--seed",
        "1",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "held-out NLL plastic" in result.output and "adapt-train" in result.output
    result = CliRunner().invoke(main, ["--out", str(out), "--resume", "--steps", "3", "--no-progress"])
    assert result.exit_code == 0, result.output
    folder = step_folders(out)[-1][1]
    assert folder.name == "step-000003" and load_trainer_state(folder).step == 3

    model, tokenizer = ar.load_model(str(folder))
    ids = tokenizer("Lily saw a big ball and was happy with the cake.", return_tensors="pt").input_ids[0, :16]
    with torch.no_grad():
        out_train = PlasticLM(model, RuleParams.load(folder))(ids[None], window=8)
    rt = ar.patch(model, rule="learned")
    assert rt.config.chunk_size == 4 and rt.rule.plasticity.form == "gradient"
    state = rt.new_state()
    logits = []
    for a in (0, 8):
        state.drop_kv()
        logits.append(rt.forward(ids[a : a + 8], state)[0])
    torch.testing.assert_close(torch.cat(logits), out_train.logits[0], atol=2e-5, rtol=1e-4)
    for i in rt.config.layers:
        torch.testing.assert_close(state.S[i], out_train.S[i][0], atol=2e-5, rtol=1e-4)
    rt.unpatch()


def test_missing_data_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "--data" in result.output


def test_training_text_is_tokenized_as_the_runtime_reads_it(tmp_path):
    """The whole file in one call (blank lines kept, no dummy-prefix space at each line start), as adapt-eval and
    the benchmarks tokenize it."""
    from adapt_runtime.train.data import load_tokens

    _, tokenizer = ar.load_model("llama")
    text = "One day, Tom saw a cat.\n\nFrom that day on, they were friends.\nThe end.\n"
    path = tmp_path / "t.txt"
    path.write_text(text)
    split = load_tokens(path, tokenizer, 0.0)
    assert split.train.tolist() == tokenizer(text, add_special_tokens=False).input_ids
    assert split.heldout.numel() == 0
