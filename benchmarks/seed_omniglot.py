"""Omniglot few-shot episodes for ``seed_tables.py --task omniglot``, read from Brenden Lake's two small background
subsets (``images_background_small1.zip``, ``images_background_small2.zip``), and the Conv-4 image encoder.

Only those two zips are at hand (not ``images_background`` / ``images_evaluation``, the split Chaudhary 2025 trains
and tests on), so the split here is made from them: the training classes are every character of small1's five
alphabets (Balinese, Early_Aramaic, Greek, Korean, Latin: 136 characters), the test classes every character of the
small2 alphabets that small1 lacks (Japanese_(katakana), Sanskrit, Tagalog: 106 characters), so no test character,
nor any test alphabet, is seen in training. Each character has 20 drawings (105 x 105 PNGs), read straight from the
zips (nothing unpacked), converted to grey levels, resized (bilinear) and scaled to [-1, 1], as their
``Resize(84), ToTensor(), Normalize(0.5, 0.5)``; the size is an option (84 is theirs).

An episode, as theirs: 5 classes drawn from the split, for each 5 + 15 of its 20 drawings in random order (5
support, 15 query), labels 0..4 in the drawn order; the 25 support steps first (grouped by class, as theirs), then the
75 query steps (grouped by class, as theirs). A step's vector is ``[embedding, one-hot label, 0]`` for a support
image and ``[embedding, 0, 1]`` for a query (their ``build_support_vector`` / ``build_query_vector``).
"""

from __future__ import annotations

import io
import zipfile
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ZIPS = ("images_background_small1.zip", "images_background_small2.zip")
DEFAULT_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"
DRAWINGS = 20


def available(folder: str | Path = DEFAULT_DIR) -> bool:
    return all((Path(folder) / name).is_file() for name in ZIPS)


def _read_zip(path: Path, size: int, alphabets: set[str] | None) -> tuple[dict[str, Tensor], list[str]]:
    """``{"alphabet/character": uint8 [20, size, size]}`` for the zip's characters (of ``alphabets`` if given), and
    the zip's alphabets."""
    from PIL import Image  # Pillow: the test and eval extras bring it (matplotlib)

    drawings: dict[str, list[tuple[str, Tensor]]] = {}
    seen: set[str] = set()
    with zipfile.ZipFile(path) as archive:
        for name in sorted(archive.namelist()):
            parts = name.split("/")
            if not name.endswith(".png") or len(parts) != 4:
                continue
            _, alphabet, character, file = parts
            seen.add(alphabet)
            if alphabets is not None and alphabet not in alphabets:
                continue
            with Image.open(io.BytesIO(archive.read(name))) as image:
                grey = image.convert("L").resize((size, size), Image.Resampling.BILINEAR)
                pixels = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).view(size, size)
            drawings.setdefault(f"{alphabet}/{character}", []).append((file, pixels))
    classes = {}
    for key, items in drawings.items():
        if len(items) != DRAWINGS:
            raise ValueError(f"{path.name}: {key} has {len(items)} drawings, expected {DRAWINGS}")
        classes[key] = torch.stack([pixels for _, pixels in sorted(items, key=lambda item: item[0])])
    return classes, sorted(seen)


@lru_cache(maxsize=4)
def load_splits(folder: str, size: int) -> dict[str, Tensor]:
    """``{"train": uint8 [136, 20, size, size], "test": uint8 [106, 20, size, size]}`` (characters sorted by name)."""
    root = Path(folder)
    if not available(root):
        raise FileNotFoundError(f"{root} lacks {' and '.join(ZIPS)} (brendenlake/omniglot's python/ folder)")
    train, first = _read_zip(root / ZIPS[0], size, None)
    _, second = _read_zip(root / ZIPS[1], 1, set())  # only the alphabet names
    new = set(second) - set(first)
    test, _ = _read_zip(root / ZIPS[1], size, new)
    return {
        "train": torch.stack([train[k] for k in sorted(train)]),
        "test": torch.stack([test[k] for k in sorted(test)]),
    }


def split_summary(folder: str | Path, size: int) -> dict[str, int]:
    splits = load_splits(str(folder), size)
    return {name: int(images.shape[0]) for name, images in splits.items()}


def episodes(
    n: int,
    g: torch.Generator,
    split: str,
    folder: str | Path = DEFAULT_DIR,
    size: int = 84,
    ways: int = 5,
    shots: int = 5,
    queries: int = 15,
    shuffle_queries: bool = False,
) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """``((images [n, T, 1, size, size] in [-1, 1], tags [n, T, ways + 1]), targets [n, T])`` with ``T = ways *
    (shots + queries)``: support steps first (tags: one-hot label, query flag 0; target -100, no loss), then the
    queries (tags: zeros, flag 1; target the label), in class order as theirs or, with ``shuffle_queries``, in a
    random order per episode (their order gives a query's label away by its position among the queries)."""
    pool = load_splits(str(folder), size)[split]
    S = ways * shots
    plain = torch.cat([torch.arange(ways).repeat_interleave(shots), torch.arange(ways).repeat_interleave(queries)])
    images, labels = [], []
    for _ in range(n):
        chosen = torch.randperm(pool.shape[0], generator=g)[:ways]
        support, query = [], []
        for cls in chosen.tolist():
            order = torch.randperm(DRAWINGS, generator=g)[: shots + queries]
            support.append(pool[cls, order[:shots]])
            query.append(pool[cls, order[shots:]])
        episode, label = torch.cat(support + query), plain
        if shuffle_queries:
            perm = torch.cat([torch.arange(S), S + torch.randperm(ways * queries, generator=g)])
            episode, label = episode[perm], plain[perm]
        images.append(episode)
        labels.append(label)
    pixels = torch.stack(images).unsqueeze(2).float() / 127.5 - 1.0
    labels = torch.stack(labels)
    tags = torch.zeros(n, labels.shape[1], ways + 1)
    tags[:, :S, :ways] = F.one_hot(labels[:, :S], ways).float()
    tags[:, S:, ways] = 1.0
    targets = labels.clone()
    targets[:, :S] = -100
    return (pixels, tags), targets


class Conv4(nn.Module):
    """The usual few-shot Conv-4 (four blocks of 3x3 conv with 64 channels, batch norm, ReLU, 2x2 max pool), then a
    linear map of the flattened features to ``out`` (theirs: 256), as Chaudhary's encoder."""

    def __init__(self, size: int, out: int = 256, channels: int = 64) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        c = 1
        for _ in range(4):
            blocks += [nn.Conv2d(c, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2)]
            c = channels
        self.features = nn.Sequential(*blocks)
        side = size
        for _ in range(4):
            side //= 2
        self.proj = nn.Linear(channels * side * side, out)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(self.features(images).flatten(1))
