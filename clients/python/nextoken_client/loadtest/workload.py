"""The requests a load test sends: synthetic prompts of a given length, or prompts from a file.

Lengths are counted in words, because the load tester has no tokenizer (it must work against any
server); the server-reported ``usage.prompt_tokens`` is what the metrics use.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LengthSpec", "WorkItem", "synthetic_workload", "file_workload"]

# Plain words, so a model trained on ordinary text sees a plausible prompt.
_WORDS = (
    "the", "cat", "sat", "on", "a", "mat", "while", "dog", "ran", "over", "hill", "and", "then", "we",
    "saw", "light", "in", "old", "house", "by", "sea", "time", "day", "night", "king", "queen", "love", "said",
    "will", "shall", "come", "go", "make", "know", "good", "man", "woman",
)


@dataclass(frozen=True)
class LengthSpec:
    """A length that is fixed (``"32"``), ``"uniform:LO:HI"`` (inclusive) or ``"normal:MEAN:STD"``
    (rounded, at least 1)."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str, flag: str) -> LengthSpec:
        parts = text.split(":")
        try:
            if len(parts) == 1:
                spec = cls("fixed", float(int(parts[0])))
            elif parts[0] in ("uniform", "normal") and len(parts) == 3:
                spec = cls(parts[0], float(parts[1]), float(parts[2]))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"{flag} must be N, uniform:LO:HI or normal:MEAN:STD, got {text!r}") from None
        if spec.a < 1 or (spec.kind == "uniform" and spec.b < spec.a) or spec.b < 0:
            raise ValueError(f"{flag} needs lengths >= 1 (and LO <= HI, STD >= 0), got {text!r}")
        return spec

    def draw(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.gauss(self.a, self.b)))


@dataclass(frozen=True)
class WorkItem:
    prompt: str
    max_tokens: int


def synthetic_workload(n: int, input_len: LengthSpec, output_len: LengthSpec, seed: int) -> list[WorkItem]:
    rng = random.Random(seed)
    return [WorkItem(" ".join(rng.choice(_WORDS) for _ in range(input_len.draw(rng))), output_len.draw(rng))
            for _ in range(n)]


def file_workload(path: Path, n: int, output_len: LengthSpec, seed: int) -> list[WorkItem]:
    """One prompt per line, or JSON lines ``{"prompt": ..., "max_tokens": ...}``; cycled to ``n``
    items (in order, so runs are comparable) when the file holds fewer."""
    rng = random.Random(seed)
    base: list[WorkItem] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
                base.append(WorkItem(str(obj["prompt"]), int(obj.get("max_tokens") or output_len.draw(rng))))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{number}: expected a JSON object with a 'prompt', got {e}") from None
        else:
            base.append(WorkItem(line, output_len.draw(rng)))
    if not base:
        raise ValueError(f"{path} holds no prompts")
    return [base[i % len(base)] for i in range(n)]
