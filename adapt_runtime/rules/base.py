"""The rule interface. A rule decides the targets ``v_t`` and rates ``beta_t`` of the one write op
``S <- decay * S + clip(V^T diag(beta) X)``; the runtime does the rest (chunking, recording, the gradient when
asked, the write itself). A rule is a function of tensors: it never sees the runtime or a session state.

    class Recall(Rule):  # write each position's next-token embedding at its key, at rate lr / n
        name = "recall"
        capture = frozenset({"x"})

        def bind(self, model, arch, config):
            self.U = model.get_output_embeddings().weight.detach()

        def write(self, chunk):
            beta = torch.full((len(chunk),), chunk.lr / len(chunk), device=chunk.labels.device)
            return [Write(i, self.U[chunk.labels].float(), chunk.x[i], beta) for i in chunk.layers]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from adapt_runtime.chunk import Chunk
from adapt_runtime.rules.steps import Steps, with_defaults

if TYPE_CHECKING:
    from adapt_runtime.architectures import ArchSpec
    from adapt_runtime.config import RuntimeConfig


@dataclass
class Write:
    """One layer's write: ``S[layer] <- decay * S + clip(V^T diag(beta) X)``, taken as a step by ``steps``
    (``adapt_runtime.rules.steps``; None: the update as it is)."""

    layer: int
    V: Tensor  # [n, d]
    X: Tensor  # [n, f]
    beta: Tensor  # [n]
    steps: Steps | None = None
    decay: float | None = None  # this write's factor on the old S, in place of the runtime's decay (learned rules)


class RuleDefaults(NamedTuple):
    """What a rule takes where its caller gives nothing (``Rule.defaults_for``)."""

    steps: dict[str, Any]  # step options (``adapt_runtime.rules.steps.Steps``); given ones win key by key
    norm_bound: float | None  # the runtime's ``norm_bound`` (``RuntimeConfig``); None: no bound


def key_scale(keys: list[Tensor]) -> Tensor:
    """``n * mean ||x||^2`` over a chunk's keys in all plastic layers: the divisor of a normalised rate.

    One scale shared by the layers keeps plain SGD's relative layer rates (upper layers, with larger keys, take
    larger steps), while the per-token mean and the key norm make one ``lr`` fit any chunk size and model width.
    """
    mean_sq = torch.stack([X.float().pow(2).sum(-1).mean() for X in keys]).mean()
    return (keys[0].shape[0] * mean_sq).clamp_min(1e-12)


class Rule:
    """Base rule. Subclasses set ``name`` and the defaults, and implement ``write`` (and ``targets``).

    What the runtime collects for the rule is declared here: ``capture`` names the per-layer records kept for
    each position (``x`` the down projection's input, ``y`` its output, ``h`` the MLP's hidden input);
    ``reads_final_norm`` the final norm's scale; ``needs_grad`` the gradient ``dL/dy`` of each plastic layer.
    ``adapts`` False says the rule never writes (``NoneRule``): the runtime then collects nothing for it.

    ``layer_local``: the write of each plastic layer reads only that layer's own records, the chunk's tokens and
    labels, and (rules that stash targets) what ``label_targets`` gives from the labels alone: no logits, no final
    norm, no gradient, no other layer. A span of known tokens then runs through the model once, each plastic layer
    writing the chunks the span completes as it goes (``adapt_runtime.one_pass``), with the segment path's result.
    """

    name: ClassVar[str] = "base"
    capture: frozenset[str] = frozenset()
    needs_grad: ClassVar[bool] = False
    reads_final_norm: bool = False
    adapts: ClassVar[bool] = True  # False: the rule never writes S (the runtime collects nothing for it)
    layer_local: bool = False
    default_lr: ClassVar[float] = 0.0
    default_chunk_size: ClassVar[int] = 32
    default_layers: ClassVar[str | tuple[int, ...]] = "all"
    default_decay: ClassVar[float] = 1.0
    default_clip: ClassVar[float | None] = None
    # the defaults ``defaults_for`` reads: the norm bound and the step options (``adapt_runtime.rules.steps.Steps``)
    # of a dense state, and what a rank-r state (``state_rank``, plain steps only) takes over them (step options
    # and ``norm_bound``)
    default_norm_bound: ClassVar[float | None] = None
    default_steps: ClassVar[dict[str, Any]] = {}
    rank_defaults: ClassVar[dict[str, Any]] = {}

    @classmethod
    def defaults_for(cls, options: Mapping[str, Any], state_rank: int | None = None) -> RuleDefaults:
        """The step options and norm bound of this rule made with ``options`` (its constructor's keywords) where
        they are not given, on a runtime of ``state_rank`` (None: a dense S): ``default_steps`` and
        ``default_norm_bound``, with ``rank_defaults`` over them on a rank-r state.

        The one place a rule's defaults are decided: its constructor takes its step options from here (a rule made
        by hand knows no state rank: the dense ones); ``patch`` takes the norm bound, and makes a rule named with
        the step options for the runtime's state rank. Given options win key by key (``steps.with_defaults``)."""
        if state_rank is None or not cls.rank_defaults:
            return RuleDefaults(dict(cls.default_steps), cls.default_norm_bound)
        rank = dict(cls.rank_defaults)
        norm_bound = rank.pop("norm_bound", cls.default_norm_bound)
        return RuleDefaults(with_defaults(cls.default_steps, rank), norm_bound)

    def options(self) -> dict[str, Any]:
        """Rule-specific options, JSON-able (recorded in the config and in state files)."""
        return {}

    def bind(self, model: nn.Module, arch: ArchSpec, config: RuntimeConfig) -> None:
        """Called once by ``patch``: check the model and keep the weights the rule reads (unembedding, ...)."""

    def targets(self, logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Per-position tensors of positions whose next token became known, from their logits `[n, V]` and
        labels `[n]` (all rows of a call at once): each `[n, *]`, kept in the pending chunk under its name and
        handed back in ``Chunk.targets``. Rules that need only the finished chunk leave this out."""
        return {}

    @property
    def stashes_targets(self) -> bool:
        """Whether the rule computes per-position ``targets`` (the runtime then collects them)."""
        return type(self).targets is not Rule.targets

    @property
    def targets_read_logits(self) -> bool:
        """Whether the rule stashes targets and they read the logits (False implies nothing for a rule that stashes
        none). A rule whose stashed targets come from the labels alone says False: the runtime then takes them from
        ``label_targets`` and computes logits only where its caller reads them."""
        return self.stashes_targets

    def write(self, chunk: Chunk) -> list[Write]:
        """The writes of one row's finished chunk."""
        return []

    def write_rows(self, chunks: list[Chunk]) -> list[list[Write]]:
        """``write`` for the finished chunks of all rows of a call; rules may batch it."""
        return [self.write(chunk) for chunk in chunks]

    def label_targets(self, labels: Tensor) -> dict[str, Tensor]:
        """A layer-local rule that stashes targets: what its ``write`` reads of them, from the labels `[n]` alone
        (the one-pass prefill has no logits for the chunks it completes)."""
        return {}

    def write_layer(self, chunks: list[Chunk]) -> list[list[Write]]:
        """A layer-local rule's writes of finished one-layer chunks of one layer, in stream order (one-pass
        prefill). Their targets may not read the chunks' outputs ``y`` unless ``y`` is captured (then one chunk a
        call, after the chunk was computed with the S of its time); rules may batch it."""
        return [self.write(chunk) for chunk in chunks]

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


class NoneRule(Rule):
    """No write: the patched model equals the base model."""

    name = "none"
    adapts = False
