"""The engine core in-process: continuous batching gives each request what it would get alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nextoken.export.artifact import load_artifact
from nextoken.serve.core import GenerationCore
from nextoken.serve.sampling import SamplingParams


@pytest.fixture(scope="module")
def core(tiny_artifact):
    return GenerationCore(load_artifact(tiny_artifact), max_batch_size=3, threads=1)


def drain(core: GenerationCore, limit: int = 10_000) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for _ in range(limit):
        if not core.has_work():
            break
        for ev in core.step():
            o = out.setdefault(ev.rid, {"text": "", "ids": [], "finish": None, "steps": 0})
            o["text"] += ev.text
            o["ids"] += ev.token_ids
            o["finish"] = ev.finish_reason or o["finish"]
    return out


def prompt(core: GenerationCore, text: str) -> list[int]:
    return [core.eos_id] + core.tokenizer.encode(text).ids


def test_batched_greedy_equals_pytorch_alone(core, tiny_run) -> None:
    from nextoken.train.run import load_run

    model = load_run(tiny_run).model
    texts = ["the cat", "hello there, how", "a quick fox", "i love"]  # 4 > batch of 3: one waits
    for i, t in enumerate(texts):
        core.add(f"r{i}", prompt(core, t), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    out = drain(core)
    for i, t in enumerate(texts):
        ids = prompt(core, t)
        ref = model.generate(torch.tensor([ids]), 12, temperature=0)[0, len(ids):].tolist()
        assert out[f"r{i}"]["ids"] == ref
        assert out[f"r{i}"]["finish"] == "length"
    assert core.engine.batch_size == 0  # every slot freed


def test_request_joining_mid_flight_matches_running_alone(core) -> None:
    p = SamplingParams(temperature=0.9, seed=7, max_tokens=15, ignore_eos=True)
    core.add("solo", prompt(core, "the dog"), p)
    alone = drain(core)["solo"]["ids"]
    core.add("long", prompt(core, "hello world"), SamplingParams(temperature=0, max_tokens=20))
    for _ in range(5):
        core.step()
    core.add("joiner", prompt(core, "the dog"), SamplingParams(temperature=0.9, seed=7, max_tokens=15,
                                                                 ignore_eos=True))
    assert drain(core)["joiner"]["ids"] == alone


def test_cancel_frees_the_slot_within_a_step(core) -> None:
    core.add("c", prompt(core, "the"), SamplingParams(temperature=0, max_tokens=25, ignore_eos=True))
    core.step()
    assert core.engine.batch_size == 1
    core.cancel("c")
    events = core.step()
    assert [e.finish_reason for e in events if e.rid == "c"] == ["cancelled"]
    assert core.engine.batch_size == 0 and not core.has_work()


def test_rows_leaving_in_any_order_keep_the_others_exact(core) -> None:
    lengths = [3, 17, 8]
    for i, n in enumerate(lengths):
        core.add(f"x{i}", prompt(core, "the mat"), SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    out = drain(core)
    longest = out["x1"]["ids"]
    assert out["x0"]["ids"] == longest[:3] and out["x2"]["ids"] == longest[:8]
    assert np.all(core.engine.mask.shape == (0, 0))


def test_context_overflow_is_refused(core) -> None:
    with pytest.raises(ValueError, match="exceeds the context"):
        core.add("big", [core.eos_id] * 10, SamplingParams(max_tokens=core.context))
