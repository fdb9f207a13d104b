"""Run configuration: presets fill only what the user left unset; the hash follows every setting."""

import pytest
from adapt_runtime.eval.config import PRESETS, ConfigError, RunConfig, config_hash

RULES = ("none", "hebbian", "gradient")


def test_explicit_flags_win_over_the_preset():
    cfg = RunConfig.from_preset("smoke", model="llama", rules=RULES, episodes=7, shots=(2,))
    assert cfg.episodes == 7 and cfg.shots == (2,)
    assert cfg.ctx_lens == PRESETS["smoke"].ctx_lens and cfg.tasks == PRESETS["smoke"].tasks


def test_presets_without_data_leave_out_tasks_that_need_it():
    cfg = RunConfig.from_preset("full", model="llama", rules=RULES)
    assert "babi" not in cfg.tasks and "longdoc-ppl" in cfg.tasks


@pytest.mark.parametrize("change", [{"seed": 1}, {"chunk_size": 8}, {"attn_window": 64},
                                    {"rule_config": {"gradient": {"lr": 0.5}}}],
                         ids=["seed", "chunk", "window", "rule-config"])
def test_config_hash_follows_every_setting(change):
    base = RunConfig.from_preset("smoke", model="llama", rules=RULES)
    again = RunConfig.from_preset("smoke", model="llama", rules=RULES)  # built anew: equal settings, equal hash
    other = RunConfig.from_preset("smoke", model="llama", rules=RULES, **change)
    assert base is not again and config_hash(base, "m", None) == config_hash(again, "m", None)
    assert config_hash(base, "m", None) != config_hash(other, "m", None)
    assert config_hash(base, "m", None) != config_hash(base, "other-model", None)


def test_patch_kwargs_merge_chunk_size_and_rule_options():
    cfg = RunConfig.from_preset("smoke", model="llama", rules=RULES, chunk_size=16,
                                rule_config={"hebbian": {"lr": 0.1}})
    assert cfg.patch_kwargs("hebbian") == {"chunk_size": 16, "lr": 0.1}
    assert cfg.patch_kwargs("none") == {"chunk_size": 16}


@pytest.mark.parametrize("bad", [{"rules": ("none", "none")}, {"rules": ()}, {"attn_window": 0},
                                 {"ctx_lens": (4,)}, {"preset": "huge"}],
                         ids=["duplicate-rule", "no-rule", "window", "ctx-len", "preset"])
def test_bad_settings_raise_config_errors(bad):
    kw = {"model": "llama", "rules": RULES, **bad}
    preset = kw.pop("preset", "smoke")
    with pytest.raises(ConfigError):
        RunConfig.from_preset(preset, **kw)
