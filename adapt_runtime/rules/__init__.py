"""Learning rules of the fast weights, by name (``--rule``)."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from adapt_runtime.chunk import Chunk
from adapt_runtime.rules.base import NoneRule, Rule, RuleDefaults, Write
from adapt_runtime.rules.gradient import GradientRule
from adapt_runtime.rules.hebbian import HebbianRule
from adapt_runtime.rules.inplace_ttt import InPlaceTTTRule
from adapt_runtime.rules.learned import LearnedRule
from adapt_runtime.rules.steps import Steps

RULES: dict[str, type[Rule]] = {
    "none": NoneRule,
    "hebbian": HebbianRule,
    "gradient": GradientRule,
    "inplace-ttt": InPlaceTTTRule,
    "learned": LearnedRule,
}

# Installed packages add rules under this entry-point group (``name = "package.module:RuleClass"``), so every
# process (adapt-serve, its Ray replicas, adapt-eval) finds them by name without importing them first.
PLUGIN_GROUP = "adapt_runtime.rules"


def rule_names() -> tuple[str, ...]:
    """Every rule name the registry holds: the built-in ones, those registered in ``RULES``, and plugins."""
    for plugin in entry_points(group=PLUGIN_GROUP):
        if plugin.name not in RULES:
            RULES[plugin.name] = plugin.load()
    return tuple(RULES)


def rule_class(name: str) -> type[Rule]:
    """The rule class registered under ``name`` (plugins included); ``ValueError`` for an unknown name."""
    if name not in RULES and name not in rule_names():
        raise ValueError(f"unknown rule {name!r}; choose one of {', '.join(RULES)}")
    return RULES[name]


def make_rule(rule: str | Rule, **options: Any) -> Rule:
    """A rule object from a name and its options (or the object itself)."""
    if isinstance(rule, Rule):
        if options:
            raise ValueError("rule options are given to the rule object's constructor, not to patch()")
        return rule
    cls = rule_class(rule)
    try:
        return cls(**options)
    except TypeError as err:
        raise ValueError(f"bad options for rule {rule!r}: {err}") from None


__all__ = [
    "PLUGIN_GROUP",
    "RULES",
    "Chunk",
    "GradientRule",
    "HebbianRule",
    "InPlaceTTTRule",
    "NoneRule",
    "Rule",
    "RuleDefaults",
    "Steps",
    "Write",
    "make_rule",
    "rule_class",
    "rule_names",
]
