"""Rules against independent references: the gradient write vs autograd w.r.t. S itself; In-Place TTT vs a plain
re-implementation of the paper's formula; the Hebbian error target vs its definition."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from core_testing import DEVICE, VOCAB, assert_close, tiny_model, tokens, tolerance
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import adapt_runtime as ar
from adapt_runtime.rules import Write


def forward_with_delta(model, ids, deltas, records=None):
    """Run ``model`` with ``down_proj(x) + x @ deltas[i]^T`` on each layer, by hooks; record inputs if asked."""
    handles = []
    for i, layer in enumerate(model.model.layers):
        def hook(module, args, out, i=i):
            if records is not None:
                records.setdefault("x", {})[i] = args[0][0]
            return out + args[0] @ deltas[i].T

        handles.append(layer.mlp.down_proj.register_forward_hook(hook))
        if records is not None:
            handles.append(layer.mlp.register_forward_pre_hook(
                lambda m, args, i=i: records.setdefault("h", {}).__setitem__(i, args[0][0])))
    try:
        return model(ids[None]).logits[0]
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("start", ["zero", "nonzero"])
def test_gradient_write_matches_autograd_wrt_S(start):
    C, lr = 8, 0.7
    model = tiny_model()
    ids = tokens(C + 1)
    d, f = model.model.layers[0].mlp.down_proj.weight.shape
    torch.manual_seed(3)
    init = [(torch.zeros(d, f) if start == "zero" else 0.05 * torch.randn(d, f)).to(DEVICE) for _ in range(3)]
    # brute force: L(S) = summed next-token CE of the chunk; the write is -lr / (C * mean||x||^2) * dL/dS
    deltas = [s.clone().requires_grad_(True) for s in init]
    records = {}
    logits = forward_with_delta(model, ids[:C], deltas, records)
    loss = F.cross_entropy(logits, ids[1 : C + 1], reduction="sum")
    grads = torch.autograd.grad(loss, deltas)
    mean_sq = torch.stack([records["x"][i].detach().pow(2).sum(-1).mean() for i in range(3)]).mean()
    expected = [s - lr / (C * mean_sq) * g for s, g in zip(init, grads)]

    rt = ar.patch(model, rule="gradient", chunk_size=C, lr=lr, norm_bound=0)  # the write alone, no S bound
    state = rt.new_state()
    if start == "nonzero":
        for i in range(3):
            state.S[i] = init[i].clone()
    for feed in ([ids], [ids[:3], ids[3:]]):  # fast path (one call) and recompute (pieces)
        fresh = state.clone()
        for piece in feed:
            rt.forward(piece, fresh)
        assert fresh.writes == 1
        for i in range(3):
            assert_close(fresh.S[i], expected[i], "autograd")


def make_ttt_checkpoint(folder, chunk=6, ttt_lr=0.5, target="hidden_states"):
    model = tiny_model()
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(ttt_layers=[0, 2], ttt_chunk=chunk, ttt_lr=ttt_lr, ttt_target=target)
    (folder / "config.json").write_text(json.dumps(config))
    d = model.config.hidden_size
    torch.manual_seed(5)
    weights = {}
    for i in (0, 2):
        weights[f"model.layers.{i}.mlp.ttt_conv.weight"] = torch.randn(d, 1, 5) * 0.3
        weights[f"model.layers.{i}.mlp.ttt_proj.weight"] = torch.randn(d, d) * 0.2
    save_file(weights, str(folder / "ttt.safetensors"))
    return weights


def paper_update(h, x, conv, proj, lr):
    """dW = lr * V^T X with V = conv5(T) @ P, the conv within the chunk (zero outside), written as plain loops."""
    n, d = h.shape
    conv, proj = conv.to(h.device), proj.to(h.device)
    T = torch.zeros(n, d, device=h.device)
    for t in range(n):
        for j in range(-2, 3):
            if 0 <= t + j < n:
                T[t] += conv[:, 0, j + 2] * h[t + j]
    V = T @ proj
    return lr * V.T @ x


def test_inplace_ttt_matches_the_papers_formula(tmp_path):
    weights = make_ttt_checkpoint(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval().to(DEVICE)
    ids = tokens(13)
    records = {}
    zeros = [torch.zeros_like(layer.mlp.down_proj.weight) for layer in model.model.layers]
    with torch.no_grad():
        forward_with_delta(model, ids[:6], zeros, records)
    rt = ar.patch(model, rule="inplace-ttt")
    assert rt.config.layers == (0, 2) and rt.config.chunk_size == 6 and rt.config.lr == 0.5
    state = rt.new_state()
    rt.forward(ids[:7], state)
    assert state.writes == 1
    for i in (0, 2):
        conv, proj = weights[f"model.layers.{i}.mlp.ttt_conv.weight"], weights[f"model.layers.{i}.mlp.ttt_proj.weight"]
        expected = paper_update(records["h"][i], records["x"][i], conv, proj, 0.5)
        assert_close(state.S[i], expected, "reference")


def test_inplace_ttt_needs_a_checkpoint(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="In-Place TTT checkpoint"):
        ar.patch(model, rule="inplace-ttt")
    assert not any(type(m).__name__ == "PlasticDown" for m in model.modules())


class Recall(ar.Rule):
    """A rule written against ``Chunk`` alone (the rules module's example): each position's next-token
    embedding written at its key."""

    name = "recall"
    capture = frozenset({"x"})

    def bind(self, model, arch, config):
        self.U = model.get_output_embeddings().weight.detach()

    def write(self, chunk):
        beta = torch.full((len(chunk),), chunk.lr / len(chunk), device=chunk.labels.device)
        return [Write(i, self.U[chunk.labels].float(), chunk.x[i], beta) for i in chunk.layers]


@pytest.mark.parametrize("feed", ["one-call", "token-by-token"])
def test_a_custom_rule_gets_the_chunk_keys_and_labels(feed):
    C, lr = 8, 0.5
    model = tiny_model()
    ids = tokens(C + 1)
    d, f = model.model.layers[0].mlp.down_proj.weight.shape
    records = {}
    with torch.no_grad():
        forward_with_delta(model, ids[:C], [torch.zeros(d, f, device=DEVICE)] * 3, records)
    U = model.get_output_embeddings().weight.detach()
    expected = [lr / C * U[ids[1 : C + 1]].T @ records["x"][i] for i in range(3)]
    rt = ar.patch(model, rule=Recall(), chunk_size=C, lr=lr, layers="all", norm_bound=0)
    state = rt.new_state()
    for piece in ([ids] if feed == "one-call" else ids.split(1)):
        rt.forward(piece, state)
    assert state.writes == 1
    for i in range(3):
        assert_close(state.S[i], expected[i], "reference")


def test_hebbian_error_target_is_the_definition():
    model = tiny_model()
    rt = ar.patch(model, rule="hebbian", chunk_size=4, topk=0, norm_jacobian=False)
    logits = torch.randn(3, VOCAB, device=DEVICE)
    labels = torch.tensor([5, 9, 1], device=DEVICE)
    U = model.get_output_embeddings().weight.detach()
    expected = (F.one_hot(labels, VOCAB).float() - logits.softmax(-1)) @ U
    out = rt.rule.targets(logits, labels)
    v, nll = out["v"], out["nll"]
    assert_close(v, expected, "definition")
    assert_close(nll, F.cross_entropy(logits, labels, reduction="none"), "definition")


def test_topk_error_target_is_close_to_exact():
    model = tiny_model()
    exact = ar.patch(model, rule="hebbian", topk=0).rule
    logits = torch.randn(4, VOCAB, device=DEVICE) * 6  # peaked
    labels = torch.tensor([1, 2, 3, 4], device=DEVICE)
    approx = ar.patch(tiny_model(), rule="hebbian", topk=32).rule
    v_exact = exact.targets(logits, labels)["v"]
    v_top = approx.targets(logits, labels)["v"]
    assert (v_top - v_exact).norm() < 0.05 * v_exact.norm()


@pytest.mark.parametrize("k", [1, 5])
def test_topk_error_target_subtracts_only_the_top_k_probabilities(k):
    """With ``topk=k`` the error target is ``U[label] - sum over the k most probable tokens of p_j U_j`` (p the full
    softmax, not renormalised): it differs from the exact target by exactly the tail ``sum_{j not in top k} p_j U_j``,
    which on unpeaked logits is well above the tolerance."""
    model = tiny_model()
    rule = ar.patch(model, rule="hebbian", topk=k, norm_jacobian=False).rule
    torch.manual_seed(0)
    logits = torch.randn(4, VOCAB, device=DEVICE)  # not peaked: most of the mass lies outside the top k
    labels = torch.tensor([1, 2, 3, 4], device=DEVICE)
    U = model.get_output_embeddings().weight.detach().float()
    p = logits.softmax(-1)
    top = torch.zeros_like(p)
    for n in range(p.shape[0]):
        ranked = sorted(range(VOCAB), key=lambda j: -float(p[n, j]))[:k]
        top[n, ranked] = p[n, ranked]
    # k = 1: the closed form from the top-1 probability alone
    expected = U[labels] - (p.max(-1).values[:, None] * U[p.argmax(-1)] if k == 1 else top @ U)
    exact = U[labels] - p @ U
    v = rule.targets(logits, labels)["v"]
    assert_close(v, expected, "definition")
    assert_close(v - exact, (p - top) @ U, "definition")  # the tail left out
    assert (v - exact).abs().max() > 10 * tolerance("definition")["atol"]  # measurably not the exact target


@pytest.mark.parametrize("bad", [{"target": "psychic"}, {"modulation": "loud"}, {"topk": -1}, {"colour": 1}])
def test_bad_rule_options_are_clear(bad):
    with pytest.raises(ValueError):
        ar.patch(tiny_model(), rule="hebbian", **bad)


def test_unknown_rule_lists_the_rules():
    with pytest.raises(ValueError, match="hebbian"):
        ar.patch(tiny_model(), rule="telepathy")


def test_batched_rows_take_one_targets_call_per_step(monkeypatch):
    """Hebbian targets of all rows' newly labelled positions come from one ``targets`` call per model call."""
    rt = ar.patch(tiny_model(), rule="hebbian", chunk_size=4)
    calls: list[int] = []
    targets = rt.rule.targets

    def counting(logits, labels):
        calls.append(len(labels))
        return targets(logits, labels)

    monkeypatch.setattr(rt.rule, "targets", counting)
    states = [rt.new_state() for _ in range(3)]
    # prefill of 6 tokens, read as chunk 0 (4 positions labelled a row) and positions 4-5 (one labelled a row)
    rt.forward(torch.stack([tokens(6, seed=b) for b in range(3)]), states)
    for step in range(4):  # decode: each step labels every row's previous position
        rt.forward(tokens(3, seed=10 + step)[:, None], states)
    assert calls == [12, 3, 3, 3, 3, 3]
    assert all(s.writes == 2 for s in states)
