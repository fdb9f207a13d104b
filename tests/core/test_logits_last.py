"""``rt.forward(..., logits="last")`` computes the unembedding only where it is read, and changes nothing else: a
rule that reads no logits still gets every position of its chunk (a custom rule, as the README writes one)."""

from __future__ import annotations

import pytest
import torch

import adapt_runtime as ar
from adapt_runtime.rules import Write


class Recall(ar.Rule):  # each position's next-token embedding, written at its key (reads no logits)
    name, capture = "recall", frozenset({"x"})

    def bind(self, model, arch, config):
        self.U = model.get_output_embeddings().weight.detach()

    def write(self, chunk):
        beta = torch.full((len(chunk),), chunk.lr / len(chunk), device=chunk.labels.device)
        return [Write(i, self.U[chunk.labels].float(), chunk.x[i], beta) for i in chunk.layers]


def test_a_rule_without_logits_writes_the_same_whole_chunks_when_only_the_last_logits_are_read():
    model, _ = ar.load_model("llama")
    rt = ar.patch(model, rule=Recall(), chunk_size=8)
    ids = torch.randint(3, 500, (1, 45), generator=torch.Generator().manual_seed(0))
    full, last = rt.new_state(), rt.new_state()
    every = rt.forward(ids[:, :30], full)
    only = rt.forward(ids[:, :30], last, logits="last")
    assert only.shape[1] == 1 and torch.allclose(only[:, -1], every[:, -1], atol=1e-6)
    for k in range(30, 45):
        rt.forward(ids[:, k : k + 1], full)
        rt.forward(ids[:, k : k + 1], last, logits="last")
    assert full.writes == last.writes == 45 // 8
    for i in rt.plastic:
        assert torch.equal(full.S[i], last.S[i])


def unembedded_rows(rt) -> list[int]:
    """Positions the unembedding computes, per call (a forward hook on the output embedding's module)."""
    rows: list[int] = []
    head = rt.model.get_output_embeddings()
    head.register_forward_hook(lambda module, args, out: rows.append(out.shape[-2]))
    return rows


@pytest.mark.parametrize("target,layers", [("output", [4]), ("next_token", None)],
                         ids=["output-one-pass", "next_token"])
def test_hebbian_targets_from_labels_compute_no_logits_beyond_the_last_and_write_the_same(target, layers):
    """Unmodulated ``output`` and ``next_token`` targets come from the labels: generation reads the last position's
    logits only, and the writes equal those of a forward that computes every position's."""
    ids = torch.randint(3, 500, (1, 45), generator=torch.Generator().manual_seed(0))
    runs = {}
    for mode in ("all", "last"):
        model, _ = ar.load_model("llama")
        rt = ar.patch(model, rule="hebbian", target=target, layers=layers, chunk_size=8, lr=1.0)
        rows, state = unembedded_rows(rt), rt.new_state()
        out = rt.forward(ids[:, :30], state, logits=mode)
        for k in range(30, 45):
            out = rt.forward(ids[:, k : k + 1], state, logits=mode)
        runs[mode] = (rt, state, rows, out)
    (rt, full, _, every), (_, last, rows, only) = runs["all"], runs["last"]
    assert max(rows) == 1  # the 30-token prompt (three chunks and a pending six) included
    assert full.writes == last.writes == 45 // 8
    assert torch.allclose(only[:, -1], every[:, -1], atol=1e-5)
    for i in rt.plastic:
        assert torch.allclose(full.S[i], last.S[i], rtol=1e-5, atol=1e-7)


def test_the_error_target_still_reads_every_position():
    model, _ = ar.load_model("llama")
    rt = ar.patch(model, rule="hebbian", chunk_size=8)
    rows = unembedded_rows(rt)
    rt.forward(torch.randint(3, 500, (1, 20)), rt.new_state(), logits="last")
    assert rows == [8, 8, 4]  # every position of each chunk segment: its targets read the logits
