"""``Rule.defaults_for``: the one place a rule's step options and norm bound are decided where not given, and
given options winning over them key by key (``steps.with_defaults``) once ``patch`` has made the runtime."""

from __future__ import annotations

import re

import pytest
from core_testing import tiny_model

import adapt_runtime as ar
from adapt_runtime.rules import GradientRule, HebbianRule, NoneRule, RuleDefaults, Steps
from adapt_runtime.rules.steps import with_defaults

PLAIN_BOUNDED = RuleDefaults({"write_form": "plain"}, 0.05)  # hebbian's earlier defaults (``rank_defaults``)
CASES = [
    pytest.param(HebbianRule, {}, None, RuleDefaults({"write_form": "delta", "erase": 0.2}, None),
                 id="hebbian-error-dense"),
    pytest.param(HebbianRule, {"target": "error"}, 4, PLAIN_BOUNDED, id="hebbian-error-rank"),
    pytest.param(HebbianRule, {"target": "next_token"}, None, PLAIN_BOUNDED, id="hebbian-next-token-dense"),
    pytest.param(HebbianRule, {"target": "output"}, None, PLAIN_BOUNDED, id="hebbian-output-dense"),
    pytest.param(HebbianRule, {"target": "output"}, 4, PLAIN_BOUNDED, id="hebbian-output-rank"),
    pytest.param(GradientRule, {}, None, RuleDefaults({}, 0.05), id="gradient-dense"),
    pytest.param(GradientRule, {}, 4, RuleDefaults({}, 0.05), id="gradient-rank"),
    pytest.param(NoneRule, {}, 4, RuleDefaults({}, None), id="none"),
]


@pytest.mark.parametrize(("rule", "options", "state_rank", "expected"), CASES)
def test_the_defaults_of_each_case(rule, options, state_rank, expected) -> None:
    assert rule.defaults_for(options, state_rank) == expected
    steps, norm_bound = rule.defaults_for(options, state_rank)  # a pair: step options, norm bound
    assert (steps, norm_bound) == tuple(expected)


def test_the_hook_hands_out_copies() -> None:
    HebbianRule.defaults_for({}).steps["erase"] = 0.9
    assert HebbianRule.default_steps == {"write_form": "delta", "erase": 0.2}
    assert HebbianRule.defaults_for({}).steps["erase"] == 0.2


GIVEN = [{}, {"erase": 0.5}, {"write_form": "plain"}, {"write_form": "delta"}, {"normalise": 0.01},
         {"write_form": "plain", "layer_rates": [1.0, 0.5, 2.0]}]


@pytest.mark.parametrize("given", GIVEN, ids=lambda g: ",".join(g) or "nothing")
@pytest.mark.parametrize("target", ["error", "output"])
def test_patch_takes_the_dense_defaults_and_given_options_win_key_by_key(target, given) -> None:
    defaults = HebbianRule.defaults_for({"target": target})
    try:
        expected = Steps(**with_defaults(defaults.steps, given))
    except ValueError as err:  # erase without the delta form: refused by patch alike
        with pytest.raises(ValueError, match=re.escape(str(err))):
            ar.patch(tiny_model(), rule="hebbian", layers="all", target=target, **given)
        return
    rt = ar.patch(tiny_model(), rule="hebbian", layers="all", target=target, **given)
    assert rt.rule.steps == expected
    assert rt.config.norm_bound == defaults.norm_bound
    assert HebbianRule(target=target, **given).steps == rt.rule.steps  # a rule made by hand: the same steps


def test_patch_takes_the_rank_defaults_and_given_options_win() -> None:
    defaults = HebbianRule.defaults_for({}, state_rank=4)
    rt = ar.patch(tiny_model(), rule="hebbian", state_rank=4)
    assert rt.rule.steps == Steps(**defaults.steps) and rt.rule.steps.plain
    assert rt.config.norm_bound == defaults.norm_bound == 0.05
    assert ar.patch(tiny_model(), rule="hebbian", state_rank=4, norm_bound=0.2).config.norm_bound == 0.2
    assert ar.patch(tiny_model(), rule="hebbian", state_rank=4, norm_bound=0).config.norm_bound is None
    assert ar.patch(tiny_model(), rule="hebbian", norm_bound=0.3).config.norm_bound == 0.3
    with pytest.raises(ValueError, match="dense state"):  # a given step option wins, and a rank-r state refuses it
        ar.patch(tiny_model(), rule="hebbian", state_rank=4, write_form="delta")


def test_a_rule_object_keeps_the_defaults_it_was_made_with() -> None:
    """A rule made by hand knows no state rank: its steps are its dense defaults, and ``patch`` takes its norm
    bound from the same hook (hebbian's non-``error`` targets are bounded)."""
    assert ar.patch(tiny_model(), rule=HebbianRule()).config.norm_bound is None
    assert ar.patch(tiny_model(), rule=HebbianRule(target="output")).config.norm_bound == 0.05
    assert ar.patch(tiny_model(), rule=HebbianRule(target="output"), norm_bound=0).config.norm_bound is None
