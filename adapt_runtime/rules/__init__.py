"""Learning rules of the fast weights, by name (``--rule``)."""

from __future__ import annotations

from typing import Any

from adapt_runtime.chunk import Chunk
from adapt_runtime.rules.base import NoneRule, Rule, Write
from adapt_runtime.rules.gradient import GradientRule
from adapt_runtime.rules.hebbian import HebbianRule
from adapt_runtime.rules.inplace_ttt import InPlaceTTTRule

RULES: dict[str, type[Rule]] = {
    "none": NoneRule,
    "hebbian": HebbianRule,
    "gradient": GradientRule,
    "inplace-ttt": InPlaceTTTRule,
}


def make_rule(rule: str | Rule, **options: Any) -> Rule:
    """A rule object from a name and its options (or the object itself)."""
    if isinstance(rule, Rule):
        if options:
            raise ValueError("rule options are given to the rule object's constructor, not to patch()")
        return rule
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    try:
        return RULES[rule](**options)
    except TypeError as err:
        raise ValueError(f"bad options for rule {rule!r}: {err}") from None


__all__ = ["RULES", "Chunk", "GradientRule", "HebbianRule", "InPlaceTTTRule", "NoneRule", "Rule", "Write", "make_rule"]
