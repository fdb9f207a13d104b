"""Gradients through the writes against central finite differences (float64, tiny model).

The loss is taken on the second context window only: the KV is dropped between windows, so the only path from the
rule's parameters (and the first window's weights) to that loss is the fast weights S written across chunks."""

from __future__ import annotations

import pytest
import torch
from train_testing import CASES, learned_rule, stream, tiny_llama

from adapt_runtime.train import PlasticLM

WINDOW, T = 8, 16


def second_window_loss(plm: PlasticLM, ids: torch.Tensor) -> torch.Tensor:
    out = plm(ids, window=WINDOW)
    logits = out.logits[:, WINDOW:-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, WINDOW + 1 :].reshape(-1))


@pytest.mark.parametrize("form,target,modulation,alpha", CASES)
def test_gradient_through_writes_matches_finite_differences(form, target, modulation, alpha):
    model = tiny_llama(dtype=torch.float64)
    plm = PlasticLM(model, learned_rule(model, form, target, modulation, alpha))
    ids = stream(T, rows=2)
    params = list(plm.rule.parameters()) + [model.model.layers[0].mlp.up_proj.weight]
    loss = second_window_loss(plm, ids)
    grads = torch.autograd.grad(loss, params)
    g = torch.Generator().manual_seed(3)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    analytic = sum((gr * d).sum() for gr, d in zip(grads, direction))
    eps = 1e-6

    def shifted(sign: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
            value = float(second_window_loss(plm, ids))
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
        return value

    numeric = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
    assert abs(float(analytic)) > 1e-6  # the loss does depend on the rule, through S only
    assert float(analytic) == pytest.approx(numeric, rel=1e-5, abs=1e-9)
    # each learned quantity on its own: rate and decay per layer
    for name in ["rate_raw", "decay_raw"]:
        p = dict(plm.rule.named_parameters())[name]
        grad = grads[[id(q) for q in params].index(id(p))]
        with torch.no_grad():
            p[1] += eps
            up = float(second_window_loss(plm, ids))
            p[1] -= 2 * eps
            down = float(second_window_loss(plm, ids))
            p[1] += eps
        assert float(grad[1]) == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-9), name


def test_static_forward_is_the_model():
    """adapt=False (and a fresh stream's first chunk) is the plain model: S never enters."""
    model = tiny_llama()
    plm = PlasticLM(model, learned_rule(model, "hebbian", "error", "none", False))
    ids = stream(T)
    with torch.no_grad():
        static = plm(ids, adapt=False).logits
        plain = model(ids).logits
        plastic = plm(ids).logits
    torch.testing.assert_close(static, plain, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(plastic[:, :4], plain[:, :4], atol=1e-6, rtol=1e-6)
    assert (plastic[:, 4:] - plain[:, 4:]).abs().max() > 1e-4
