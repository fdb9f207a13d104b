"""Chaudhary (2025)'s pieces of the learned rule: the clipped, gated eta (``norm="delta"``), the internal inner loss
of the gradient form (``inner="internal"``) and vector inputs (``embeds``), against direct computations and finite
differences (tiny float64 Llama)."""

from __future__ import annotations

import pytest
import torch
from train_testing import runtime_read, stream, tiny_llama

import adapt_runtime as ar
from adapt_runtime.rules.learned import LearnedRule
from adapt_runtime.train import PlasticityConfig, PlasticLM, RuleParams
from adapt_runtime.train.forward import down_shapes
from adapt_runtime.train.update import ChunkInputs, chunk_updates


def seed_config(form: str = "hebbian", chunk: int = 1, **kw) -> PlasticityConfig:
    base = dict(
        form=form,
        target="output",
        modulation="gate",
        eta_max=0.2,
        norm="delta",
        inner="internal",
        alpha=True,
        chunk_size=chunk,
        layers=(0, 1),
        init_rate=0.02,
        init_decay=1.0,
        learn_decay=False,
    )
    return PlasticityConfig(**(base | kw))


def perturbed(params: RuleParams, seed: int = 1, scale: float = 0.3) -> RuleParams:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return params


def test_eta_rule_is_their_formula_per_token():
    """One token: S' = (1 - eta_l) S + eta_l rate_l alpha_l . (y_l x_l^T), eta_l = 0.2 sigmoid(w_l.h_l + b_l) *
    min(1, 1/||Delta||), ||Delta||^2 = sum_l ||y_l||^2 ||x_l||^2 (both layers' outer products together)."""
    torch.manual_seed(0)
    d, f, B = 5, 7, 3
    params = perturbed(RuleParams(seed_config(), {0: (d, f), 1: (d, f)}))
    x = {i: torch.randn(B, 1, f) for i in (0, 1)}
    y = {i: torch.randn(B, 1, d) * (0.1 if i else 3.0) for i in (0, 1)}
    h = {i: torch.randn(B, 1, d) for i in (0, 1)}
    S = {i: torch.randn(B, d, f) for i in (0, 1)}
    updates = chunk_updates(params, ChunkInputs(x=x, y=y, h=h))
    norm = torch.sqrt(sum(y[i][:, 0].pow(2).sum(-1) * x[i][:, 0].pow(2).sum(-1) for i in (0, 1)) + 1e-8)
    clip = torch.clamp(1.0 / (norm + 1e-8), max=1.0)
    assert (clip < 1).any()
    for k, i in enumerate((0, 1)):
        eta = 0.2 * torch.sigmoid(h[i][:, 0] @ params.gate_w[str(i)] + params.gate_b[k]) * clip  # [B]
        rate = torch.nn.functional.softplus(params.rate_raw[k])
        delta = torch.einsum("bd,bf->bdf", y[i][:, 0], x[i][:, 0])
        expected = (1 - eta)[:, None, None] * S[i] + (eta * rate)[:, None, None] * params.alpha[str(i)] * delta
        torch.testing.assert_close(updates[i].apply(S[i]), expected)


def test_key_norm_is_unchanged_by_default():
    config = PlasticityConfig(form="hebbian", target="output", layers=(0,))
    assert config.norm == "key" and config.inner == "next_token"
    with pytest.raises(ValueError, match="norm"):
        PlasticityConfig(norm="frobenius")
    with pytest.raises(ValueError, match="inner"):
        PlasticityConfig(inner="mse")


def loud(model: torch.nn.Module) -> torch.nn.Module:
    """GPT-style 0.02 weights make the MLP's outputs, and so post x pre writes, tiny: scale the matrices up."""
    with torch.no_grad():
        for p in list(model.model.layers.parameters()) + [model.lm_head.weight]:
            if p.dim() == 2:
                p.mul_(10.0)
    return model


def embed(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model.get_input_embeddings()(ids)


def test_embeds_read_as_ids():
    """A label-free rule computes the same from the ids' embeddings as from the ids."""
    model = tiny_llama(dtype=torch.float64)
    rule = perturbed(RuleParams(seed_config(chunk=2), down_shapes(model, (0, 1))).double())
    plm = PlasticLM(model, rule)
    ids = stream(8, rows=2)
    a = plm(ids)
    b = plm(None, embeds=embed(model, ids))
    torch.testing.assert_close(a.logits, b.logits)
    for i in (0, 1):
        torch.testing.assert_close(a.S[i], b.S[i])
    assert a.writes == b.writes == 3


def test_embeds_refused_when_the_rule_reads_labels():
    model = tiny_llama()
    config = PlasticityConfig(form="hebbian", target="error", layers=(0,), chunk_size=2)
    plm = PlasticLM(model, RuleParams(config, down_shapes(model, (0,))))
    with pytest.raises(ValueError, match="next tokens"):
        plm(None, embeds=embed(model, stream(4)))
    plm(None, embeds=embed(model, stream(4)), adapt=False)  # the static model needs no labels


@pytest.mark.parametrize("form", ["hebbian", "gradient"])
def test_gradient_through_per_token_writes_matches_finite_differences(form):
    """Loss on the last positions; every rule parameter (P of the internal loss included) reaches it through S."""
    model = loud(tiny_llama(dtype=torch.float64))
    config = seed_config(form, init_rate=2.0, eta_max=0.9)  # large writes, so that every parameter shows
    rule = perturbed(RuleParams(config, down_shapes(model, (0, 1)), vocab=61).double(), scale=0.1)
    if form == "gradient":
        with torch.no_grad():  # P near identity, scaled so that the internal loss's gradients are not tiny
            rule.internal.mul_(3.0)
    plm = PlasticLM(model, rule)
    embeds = embed(model, stream(6, rows=2)).detach()

    def loss() -> torch.Tensor:
        return plm(None, embeds=embeds).logits[:, 3:].pow(2).mean()

    params = list(rule.parameters())
    names = [n for n, _ in rule.named_parameters()]
    if form == "gradient":
        assert "internal" in names
    grads = torch.autograd.grad(loss(), params)
    eps = 1e-6
    g = torch.Generator().manual_seed(5)
    for name, p, grad in zip(names, params, grads):
        direction = torch.randn(p.shape, generator=g, dtype=p.dtype)
        with torch.no_grad():
            p.add_(eps * direction)
            up = float(loss())
            p.sub_(2 * eps * direction)
            down = float(loss())
            p.add_(eps * direction)
        numeric = (up - down) / (2 * eps)
        analytic = float((grad * direction).sum())
        assert abs(analytic) > 1e-10, name
        assert analytic == pytest.approx(numeric, rel=1e-4, abs=1e-10), name


def test_internal_loss_params_round_trip_and_the_runtime_refuses_them(tmp_path):
    model = tiny_llama()
    config = seed_config("gradient")
    rule = perturbed(RuleParams(config, down_shapes(model, (0, 1)), vocab=61))
    config.save(tmp_path)
    rule.save(tmp_path)
    loaded = RuleParams.load(tmp_path)
    torch.testing.assert_close(loaded.internal, rule.internal)
    with pytest.raises(ValueError, match="inner loss"):
        LearnedRule(params=loaded)
    with pytest.raises(ValueError, match="vocab"):
        RuleParams(config, down_shapes(model, (0, 1)))


def test_runtime_serves_the_delta_norm_as_trained():
    """A learned rule with Chaudhary's clip (hebbian post x pre, gate, norm delta): rt.forward == training forward."""
    model = loud(tiny_llama())
    config = seed_config(chunk=4, init_rate=1.5, eta_max=0.5, init_decay=0.9, learn_decay=True)
    params = perturbed(RuleParams(config, down_shapes(model, (0, 1))))
    ids = stream(16, rows=1)
    with torch.no_grad():
        out = PlasticLM(model, params)(ids, window=8)
    rt = ar.patch(model, rule=LearnedRule(params=params))
    logits, state = runtime_read(rt, ids[0], 8)
    torch.testing.assert_close(logits, out.logits[0], atol=2e-5, rtol=1e-4)
    for i in (0, 1):
        assert out.S[i][0].abs().max() > 1e-4
        torch.testing.assert_close(state.S[i], out.S[i][0], atol=2e-5, rtol=1e-4)
    rt.unpatch()


def test_cli_passes_the_norm(tmp_path):
    from click.testing import CliRunner
    from train_testing import write_text

    from adapt_runtime.train.cli import main

    write_text(tmp_path / "text.txt", words=300)
    args = [
        "--data",
        str(tmp_path / "text.txt"),
        "--out",
        str(tmp_path / "run"),
        "--n-layers",
        "1",
        "--hidden",
        "16",
        "--ffn",
        "24",
        "--chunk-size",
        "8",
        "--seq-len",
        "32",
        "--window",
        "16",
        "--batch",
        "2",
        "--steps",
        "1",
        "--norm",
        "delta",
        "--modulation",
        "gate",
        "--target",
        "output",
        "--no-progress",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert PlasticityConfig.load(tmp_path / "run" / "step-000001").norm == "delta"
