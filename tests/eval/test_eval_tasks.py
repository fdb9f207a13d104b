"""Task generators: deterministic under hashed seeds, well-formed answer spans, within the model's context."""

from pathlib import Path

import pytest
from adapt_runtime.eval.episode import EpisodeBuilder, TokenizationDrift, data_hash
from adapt_runtime.eval.seeds import hashed_seed
from adapt_runtime.eval.tasks import TASKS, TaskSpec, get_task

import adapt_runtime as ar

BABI = Path(__file__).resolve().parents[3] / "shared" / "data" / "babi" / "en" / "qa1_single-supporting-fact_test.txt"


@pytest.fixture(scope="module")
def tokenizer():
    return ar.load_model("llama")[1]


def make_spec(tokenizer, seed=0, data=None, **kw):
    return TaskSpec(encode=lambda s: tokenizer(s, add_special_tokens=False)["input_ids"],
                    bos_id=tokenizer.bos_token_id, max_length=512, episodes=2, seed=seed, data=data, **kw)


def task_params():
    for name, task in TASKS.items():
        if task.data == "required":
            yield pytest.param(name, BABI, id=name,
                               marks=pytest.mark.skipif(not BABI.is_file(), reason="shared bAbI data absent"))
        else:
            yield pytest.param(name, None, id=name)


@pytest.mark.parametrize(("name", "data"), list(task_params()))
def test_episodes_are_deterministic_and_seeded(tokenizer, name, data):
    task = get_task(name)
    a = task.episodes(make_spec(tokenizer, data=data))
    assert a, "no episodes"
    assert data_hash(a) == data_hash(task.episodes(make_spec(tokenizer, data=data)))
    assert data_hash(a) != data_hash(task.episodes(make_spec(tokenizer, seed=1, data=data)))


@pytest.mark.parametrize(("name", "data"), list(task_params()))
def test_episode_structure(tokenizer, name, data):
    for ep in get_task(name).episodes(make_spec(tokenizer, data=data)):
        n = len(ep.tokens)
        assert all(0 <= t < 512 for t in ep.tokens)
        assert all(0 < b < n for b in ep.breaks)
        for q in ep.queries:
            assert 0 < q.start < q.end <= n
            if q.candidates:
                assert len(set(q.candidates)) == len(q.candidates), "duplicate candidates"
                assert q.candidates[q.gold] == ep.tokens[q.start : q.end], "gold candidate differs from stream"
        for a, b in ep.spans.values():
            assert 0 <= a < b <= n


def test_builder_spans_decode_to_their_text(tokenizer):
    b = EpisodeBuilder(lambda s: tokenizer(s, add_special_tokens=False)["input_ids"], tokenizer.bos_token_id)
    b.text("apple: red\n")
    b.text("apple:")
    q = b.answer(" red", [" red", " blue"])
    ep = b.build("t", "v", 1, None, 0, 0)
    assert tokenizer.decode(ep.tokens[q.start : q.end]).strip() == "red"
    assert ep.tokens[0] == tokenizer.bos_token_id


def test_builder_refuses_retokenized_context():
    b = EpisodeBuilder(lambda s: [len(s)], None)  # a toy encoder whose tokens all change on every append
    b.text("a")
    with pytest.raises(TokenizationDrift):
        b.text("b")


def test_hashed_seed_is_stable_and_sensitive():
    assert hashed_seed("niah", 50, 0) == hashed_seed("niah", 50, 0)
    assert hashed_seed("niah", 50, 0) != hashed_seed("niah", 50, 1)


def test_longdoc_reads_user_text(tokenizer, tmp_path):
    text = tmp_path / "doc.txt"
    text.write_text("The cat sat on the mat. " * 400)
    eps = get_task("longdoc-ppl").episodes(make_spec(tokenizer, data=text, ctx_lens=(128,)))
    assert len(eps) == 2 and all(len(ep.tokens) == 128 for ep in eps)


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00binary"], ids=["empty", "binary"])
def test_bad_data_file_gets_a_clear_error(tokenizer, tmp_path, content):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match="--data"):
        get_task("longdoc-ppl").episodes(make_spec(tokenizer, data=bad))
