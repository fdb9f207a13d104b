"""babi: bAbI question answering from local files (--data: one qaN_*.txt file or a folder of them).

An episode is one story: its sentences, and after each question `Answer:` with the gold word, scored as
multiple choice over every answer that occurs in the file. `shots` prepends that many other stories of
the same file, with their answers, as demonstrations. Stories longer than the model's context are skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from adapt_runtime.eval.episode import Episode, EpisodeBuilder
from adapt_runtime.eval.scoring import EpisodeScore
from adapt_runtime.eval.seeds import rng_for
from adapt_runtime.eval.tasks.base import Measures, TaskSpec, pick, query_measures
from adapt_runtime.eval.text_source import read_text

_LINE = re.compile(r"^(\d+) (.*)$")
# question<TAB>answer<TAB>support; some copies have "|" for the tabs
_QUESTION = re.compile(r"^(.*?)\s*[\t|]\s*([^\t|]+?)\s*[\t|]\s*[\d ]*$")


@dataclass(frozen=True)
class Story:
    lines: tuple[tuple[str, str | None], ...]  # (sentence or question, answer for a question)


def parse_babi(text: str, source: str) -> list[Story]:
    """Stories of a bAbI file: `ID text` lines, questions as `ID question<TAB>answer<TAB>support`
    (or with `|` for the tabs)."""
    stories: list[list[tuple[str, str | None]]] = []
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        m = _LINE.match(raw.strip("\n"))
        if not m:
            raise ValueError(f"{source}:{n}: not a bAbI line (expected 'ID text')")
        idx, body = int(m.group(1)), m.group(2)
        if idx == 1 or not stories:
            stories.append([])
        q = _QUESTION.match(body)
        if q:
            stories[-1].append((q.group(1).strip(), q.group(2).strip()))
        else:
            stories[-1].append((body.strip(), None))
    return [Story(tuple(s)) for s in stories if any(a for _, a in s)]


def babi_files(data: Path) -> list[Path]:
    if data.is_dir():
        files = sorted(p for p in data.glob("qa*.txt") if "test" in p.name) or sorted(data.glob("qa*.txt"))
        if not files:
            raise FileNotFoundError(f"--data {data}: no qa*.txt bAbI files in this folder")
        return files
    return [data]


def write_story(b: EpisodeBuilder, story: Story, choices: list[str], score: bool) -> None:
    for text, answer in story.lines:
        if answer is None:
            b.text(f"{text}\n")
        else:
            b.text(f"Question: {text}\nAnswer:")
            if score:
                b.answer(f" {answer}", choices)
            else:
                b.text(f" {answer}")
            b.text("\n")


class Babi:
    name: ClassVar[str] = "babi"
    summary: ClassVar[str] = "bAbI QA from local files (--data); multiple choice over the file's answers"
    data: ClassVar[str] = "required"
    headline: ClassVar[str] = "acc"
    lower_is_better: ClassVar[bool] = False

    def episodes(self, spec: TaskSpec) -> list[Episode]:
        if spec.data is None:
            raise ValueError("babi reads bAbI files: pass --data FILE_OR_FOLDER")
        out = []
        for path in babi_files(spec.data):
            stories = parse_babi(read_text(path), str(path))
            if not stories:
                raise ValueError(f"--data {path}: no bAbI stories with questions")
            variant = path.name.split("_")[0]
            choices = sorted({f" {a}" for s in stories for _, a in s.lines if a})
            for k in pick(spec.shots, (0,)):
                rng = rng_for(self.name, variant, k, spec.seed)
                order = rng.sample(range(len(stories)), len(stories))
                made = 0
                for j, si in enumerate(order):
                    if made == spec.episodes:
                        break
                    b = spec.builder()
                    for d in range(k):
                        write_story(b, stories[order[(j + 1 + d) % len(order)]], choices, score=False)
                    write_story(b, stories[si], choices, score=True)
                    ep = b.build(self.name, variant, k, None, made, spec.seed)
                    if len(ep.tokens) + max(map(len, ep.queries[0].candidates)) <= spec.max_length:
                        out.append(ep)
                        made += 1
        return out

    def measure(self, ep: Episode, score: EpisodeScore) -> Measures:
        m = query_measures(ep, score)
        m["chance"] = 1.0 / len(ep.queries[0].candidates)
        return Measures(m)
