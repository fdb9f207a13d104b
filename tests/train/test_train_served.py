"""Trained, then served: the runtime's ``learned`` rule computes what the training forward computed, in logits and
in the fast-weight state, for every form (the gradient form's window ends included), from parameters in memory and
from a checkpoint folder loaded the way adapt-serve loads it."""

from __future__ import annotations

import pytest
import torch
from train_testing import CASES, learned_rule, runtime_read, stream, tiny_llama

import adapt_runtime as ar
from adapt_runtime.rules.learned import LearnedRule
from adapt_runtime.train import PlasticLM

WINDOW, T = 8, 24


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("form,target,modulation,alpha", CASES)
def test_runtime_equals_training_forward(form, target, modulation, alpha):
    model = tiny_llama()
    params = learned_rule(model, form, target, modulation, alpha)
    ids = stream(T, rows=2)
    with torch.no_grad():
        out = PlasticLM(model, params)(ids, window=WINDOW)
    rt = ar.patch(model, rule=LearnedRule(params=params))
    assert rt.config.chunk_size == 4 and rt.config.layers == (0, 1)  # the trained ones, by default
    for row in range(2):
        logits, state = runtime_read(rt, ids[row], WINDOW)
        assert state.writes == out.writes == T // 4 - 1
        close(logits, out.logits[row])
        for i in (0, 1):
            assert out.S[i][row].abs().max() > 1e-3
            close(state.S[i], out.S[i][row])
    rt.unpatch()


def test_checkpoint_folder_serves_the_learned_rule(tmp_path):
    """save_pretrained + the rule's files; ar.load_model(DIR) + ar.patch(model, rule="learned") finds them."""
    model = tiny_llama()
    params = learned_rule(model, "hebbian", "error", "gate", True)
    model.save_pretrained(tmp_path)
    params.config.save(tmp_path)
    params.save(tmp_path)
    ids = stream(T)
    with torch.no_grad():
        out = PlasticLM(model, params)(ids)
    served, _ = ar.load_model(str(tmp_path)) if (tmp_path / "tokenizer.json").exists() else (None, None)
    if served is None:  # no tokenizer in this folder: load the model as load_model does
        from transformers import AutoModelForCausalLM

        served = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    rt = ar.patch(served, rule="learned")
    assert isinstance(rt.rule, LearnedRule) and rt.rule.checkpoint == str(tmp_path)
    state = rt.new_state()
    logits = rt.forward(ids[0], state)[0]
    close(logits, out.logits[0])
    for i in (0, 1):
        close(state.S[i], out.S[i][0])
    rt.unpatch()


def test_a_folder_without_the_rule_is_refused(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="adapt-train"):
        ar.patch(AutoModelForCausalLM.from_pretrained(str(tmp_path)), rule="learned")
