"""``rt.forward(..., logits="last")`` computes the unembedding only where it is read, and changes nothing else: a
rule that reads no logits still gets every position of its chunk (a custom rule, as the README writes one)."""

from __future__ import annotations

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
