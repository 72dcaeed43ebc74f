"""Speculative decoding in the engine core: the same tokens (T = 0), the same distribution (T > 0), the
same logprobs, stops and structure as without it, through joins, leaves, prefix-cache hits and cancels.

The models are tiny and barely trained, and their greedy continuations repeat themselves ("t t t"),
which is what the n-gram lookup guesses from: every test that claims speculation did not change an
output also asserts that drafts were accepted in it, so none can pass without speculating.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import chi2_contingency
from tokenizers import Tokenizer

from nextoken.serve.engine.spec import JUDGE_AFTER, SpecOptions, ngram_draft
from nextoken.serve.wire import StructuredKind, StructuredSpec
from tests.serve.engine.test_core import add, drain, make_core

NGRAM = SpecOptions(num_speculative_tokens=4, prompt_lookup_max=4, prompt_lookup_min=1, disable_by_batch_size=8)
TEXTS = ["the cat sat on the mat. the cat sat on the", "hello hello hello hello", "abcabcabcabc", "i love next",
         "the quick brown fox jumps over the lazy dog. the quick", "to be or not to be", "x", "aaaa aaaa aaaa",
         "she sells sea shells by the sea shore", "one two one two one two"]


@pytest.fixture(scope="module")
def tok(serve_artifact: Path) -> Tokenizer:
    return Tokenizer.from_file(str(serve_artifact / "tokenizer.json"))


def prompt(tok: Tokenizer, text: str) -> list[int]:
    return [tok.token_to_id("<|endoftext|>")] + tok.encode(text, add_special_tokens=False).ids


def run(artifact: Path, requests: list[tuple[list[int], dict]], spec: SpecOptions | None, *, stagger: int = 0,
        **options) -> tuple[list[dict], object]:
    """Every request through one core (``stagger``: add one each that many steps, so rows join mid-run)."""
    core = make_core(artifact, spec=spec, **options)
    rids = [f"q{i}" for i in range(len(requests))]
    pending = list(zip(rids, requests, strict=True))
    if not stagger:
        for rid, (ids, params) in pending:
            add(core, ids, rid, **params)
        pending = []

    def join(step: int) -> None:
        if pending and step % stagger == 0:
            rid, (ids, params) = pending.pop(0)
            add(core, ids, rid, **params)

    if pending:
        join(0)
    out = drain(core, each_step=join if stagger else None)
    while pending:  # the core drained before every request joined
        join(0)
        out.update(drain(core, each_step=join))
    assert core.num_requests == 0 and all(r is None for r in core.slot_rid) and not core.lengths.any()
    return [out[r] for r in rids], core


def test_ngram_draft_takes_the_latest_longest_match() -> None:
    t = np.array([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3])
    assert ngram_draft(t, 3, 1, 4).tolist() == [7, 8, 5, 2]  # "2 3": its latest earlier occurrence, then 4 tokens
    assert ngram_draft(t, 3, 1, 1).tolist() == [7]
    assert ngram_draft(np.array([4, 5, 6]), 2, 1, 3).size == 0  # nothing repeats
    assert ngram_draft(np.array([5, 5]), 2, 2, 3).size == 0  # too short for a 2-gram with a follower
    assert ngram_draft(np.array([5, 6, 5]), 3, 1, 3).tolist() == [6, 5]


@pytest.mark.parametrize("stagger", [0, 2])
def test_greedy_output_is_the_same_token_for_token(serve_artifact: Path, tok: Tokenizer, stagger: int) -> None:
    """Twenty greedy requests of every kind through 4 slots (joins and leaves at every step when staggered,
    prefix-cache hits from the shared prompts, chunked prefill under a 16-token budget): with speculation
    every request's tokens equal those without it, and a good share of the drafted tokens was accepted."""
    kinds = [dict(), dict(repetition_penalty=1.3), dict(presence_penalty=0.5, frequency_penalty=0.3),
             dict(logit_bias={3: 2.0}), dict(min_tokens=20, stop_token_ids=[5]), dict(ignore_eos=True),
             dict(stop_token_ids=[tok.token_to_id("t")]), dict(logprobs=2)]
    reqs = [(prompt(tok, TEXTS[i % len(TEXTS)]), dict(temperature=0, max_tokens=12 + 7 * (i % 5), **kinds[i % 8]))
            for i in range(20)]
    base, _ = run(serve_artifact, reqs, None, stagger=stagger, max_slots=4)
    got, core = run(serve_artifact, reqs, NGRAM, stagger=stagger, max_slots=4)
    assert [r["ids"] for r in got] == [r["ids"] for r in base]
    assert [(r["finished"].reason, r["finished"].completion_tokens) for r in got] == \
           [(r["finished"].reason, r["finished"].completion_tokens) for r in base]
    assert sum(r["started"].cached_tokens for r in got) > 0  # prefix-cache hits happened
    t = core.spec.totals
    assert t.accepted > 0.25 * t.draft_tokens > 0 and t.drafts > 20
    assert sum(t.per_pos) == t.accepted and t.per_pos == sorted(t.per_pos, reverse=True)
    for a, b in zip(got, base, strict=True):  # logprobs where asked: the same up to ORT's float rounding
        np.testing.assert_allclose([x for x in a["lps"] if x == x], [x for x in b["lps"] if x == x], atol=2e-5)


def test_logprobs_of_accepted_tokens_equal_the_non_speculative_ones(serve_artifact: Path, tok: Tokenizer) -> None:
    """Chosen and top-5 logprobs of every token (most of them accepted draft tokens) equal a decode step's
    to ORT's rounding between a one-token and a multi-token row (~1e-7 in the logits)."""
    core_a = make_core(serve_artifact, max_slots=2)
    core_b = make_core(serve_artifact, max_slots=2, spec=NGRAM)
    outs = []
    for core in (core_a, core_b):
        add(core, prompt(tok, "the cat sat on the mat. the cat"), "r", temperature=0, max_tokens=60, logprobs=5,
            ignore_eos=True)
        tops, lps, ids = [], [], []
        while core.has_work():
            o = core.step()
            for i in range(len(o.rids)):
                ids.append(int(o.token_ids[i]))
                lps.append(float(o.logprobs[i]))
                tops.append((o.top_ids[i].tolist(), o.top_logprobs[i]))
        outs.append((ids, lps, tops))
    (ids_a, lps_a, tops_a), (ids_b, lps_b, tops_b) = outs
    assert ids_a == ids_b and core_b.spec.totals.accepted >= 30
    np.testing.assert_allclose(lps_b, lps_a, atol=2e-5)
    assert [t[0] for t in tops_a] == [t[0] for t in tops_b]
    np.testing.assert_allclose(np.stack([t[1] for t in tops_b]), np.stack([t[1] for t in tops_a]), atol=2e-5)


def test_structured_output_is_the_same(serve_artifact: Path, tok: Tokenizer) -> None:
    """A regex the model's favourite continuation fits: the grammar's masks apply round by round, the
    structure ends the row at the same token, and drafts were accepted under the grammar."""
    spec = StructuredSpec(StructuredKind.REGEX, "guided_regex", regex="( t){3,40}\\.")
    reqs = [(prompt(tok, "the cat sat on the mat. the cat"), dict(temperature=0, max_tokens=90, structured=spec))]
    (base,), _ = run(serve_artifact, reqs, None)
    (got,), core = run(serve_artifact, reqs, NGRAM)
    assert got["ids"] == base["ids"] and got["finished"].reason == base["finished"].reason
    assert core.spec.totals.accepted > 10


def test_seeded_sampling_is_reproducible_and_the_same_as_without(serve_artifact: Path, tok: Tokenizer) -> None:
    """A seeded request draws one uniform of its own generator per token emitted, drafting or not, so at
    T > 0 (with top-k, top-p, min-p and penalties) it gives the very tokens it gives without speculation."""
    kinds = [dict(temperature=0.7), dict(temperature=1.0, top_k=5, top_p=0.9, repetition_penalty=1.1),
             dict(temperature=0.5, min_p=0.05, presence_penalty=0.2)]
    reqs = [(prompt(tok, TEXTS[i]), dict(seed=100 + i, max_tokens=40, ignore_eos=True, **kinds[i % 3]))
            for i in range(9)]
    base, _ = run(serve_artifact, reqs, None, max_slots=3)
    got, core = run(serve_artifact, reqs, NGRAM, max_slots=3)
    again, _ = run(serve_artifact, reqs, NGRAM, max_slots=3, stagger=3)
    assert [r["ids"] for r in got] == [r["ids"] for r in base] == [r["ids"] for r in again]
    assert core.spec.totals.accepted > 0 and core.spec.totals.accepted < core.spec.totals.draft_tokens


def test_sampled_distribution_is_the_targets_chi_square(serve_artifact: Path, tok: Tokenizer) -> None:
    """Unseeded sampling at T = 0.8 with top-k 4 and repetition penalty 1.1: 1500 requests of 3 tokens each
    with and without speculation, each core's shared generator seeded differently (fixed seeds 1 and 2),
    so the two samples are independent. The prompt holds the tokens top-k mostly leaves, so the second
    token comes from a verification row (a one-token draft, accepted or corrected) in >= 90% of the
    requests (asserted), and the third from its bonus position or a decode row; a two-sample chi-square
    test on the (token 2, token 3) pairs must not reject equality at the 0.1% level. The draws are fixed,
    so the test is deterministic. It has the power to see a broken rule: keeping every draft (each draft
    token's logit raised by 100 in the verification rows) gave p = 3e-171 when this test was written."""
    n = 1500
    ids = prompt(tok, " the the the the the the t")
    pairs = []
    every = SpecOptions(num_speculative_tokens=4, prompt_lookup_min=1, disable_by_batch_size=10 ** 6)  # queued too
    for seed, spec in ((1, None), (2, every)):
        core = make_core(serve_artifact, spec=spec, max_slots=8, max_num_batched_tokens=256)
        core.sampler.shared_rng = np.random.default_rng(seed)
        for i in range(n):
            add(core, ids, f"s{i}", temperature=0.8, top_k=4, repetition_penalty=1.1, max_tokens=3, ignore_eos=True)
        out = drain(core)
        pairs.append([tuple(out[f"s{i}"]["ids"][1:]) for i in range(n)])
        if spec is not None:
            t = core.spec.totals
            assert t.drafts >= 0.9 * n and 0.1 * t.draft_tokens < t.accepted < 0.9 * t.draft_tokens  # both branches
    cats = sorted(set(pairs[0]) | set(pairs[1]))
    table = np.array([[p.count(c) for c in cats] for p in pairs])
    big = table.sum(axis=0) >= 20  # pool the rare pairs into one column (expected counts >= 5)
    table = np.column_stack([table[:, big], table[:, ~big].sum(axis=1)])
    assert table.shape[1] >= 4
    p_value = chi2_contingency(table)[1]
    assert p_value > 1e-3, (p_value, table)


def test_cancel_mid_speculation_frees_the_slot(serve_artifact: Path, tok: Tokenizer) -> None:
    """A request cancelled between two verification steps leaves its slot empty; the next request in
    that slot generates what it generates on a fresh core."""
    ids = prompt(tok, "hello hello hello hello")
    core = make_core(serve_artifact, max_slots=1, spec=NGRAM)
    add(core, ids, "a", temperature=0, max_tokens=200, ignore_eos=True)
    while core.spec.totals.accepted < 8:
        core.step()
    core.cancel("a")
    o = core.step()
    assert o.finished["a"].reason == "cancelled" and o.finished["a"].completion_tokens > 8
    assert core.slot_rid == [None] and core.lengths[0] == 0 and core.scheduler.free_slots == [0]
    add(core, ids, "b", temperature=0, max_tokens=30)
    (fresh,), _ = run(serve_artifact, [(ids, dict(temperature=0, max_tokens=30))], None, max_slots=1)
    assert drain(core)["b"]["ids"] == fresh["ids"]


def test_opt_out_and_batch_size_turn_drafting_off(serve_artifact: Path, tok: Tokenizer) -> None:
    """A request with speculative=False never drafts, nor does any row while more requests run than
    disable_by_batch_size; the outputs are the same either way."""
    reqs = [(prompt(tok, "hello hello hello hello"), dict(temperature=0, max_tokens=30, speculative=False))]
    (got,), core = run(serve_artifact, reqs, NGRAM)
    assert core.spec.totals.drafts == 0
    (drafted,), core = run(serve_artifact, [(reqs[0][0], dict(temperature=0, max_tokens=30))], NGRAM)
    assert core.spec.totals.accepted > 0 and drafted["ids"] == got["ids"]
    three = [(reqs[0][0], dict(temperature=0, max_tokens=30))] * 3
    few = SpecOptions(prompt_lookup_min=1, disable_by_batch_size=2)
    outs, core = run(serve_artifact, three, few, max_slots=3, max_num_batched_tokens=256)
    assert core.spec.totals.drafts == 0 and all(o["ids"] == got["ids"] for o in outs)


def test_a_request_whose_drafts_do_not_pay_stops_drafting(serve_artifact: Path, tok: Tokenizer) -> None:
    """With a break-even no draft can reach (every draft token must be accepted, and then some), a request
    is judged after JUDGE_AFTER drafts and drafts no more for the next REPROBE_TOKENS tokens."""
    core = make_core(serve_artifact, max_slots=1, spec=NGRAM)
    core.spec.break_even = 1.5
    add(core, prompt(tok, "hello hello hello hello"), "a", temperature=0, max_tokens=70, ignore_eos=True)
    seen = []
    while core.has_work():
        core.step()
        seen.append(core.spec.totals.drafts)
    assert seen[-1] == JUDGE_AFTER  # judged, then no draft in the 64 tokens that followed
    assert seen.index(JUDGE_AFTER) < len(seen) - 40


def test_counts_add_up_per_step(serve_artifact: Path, tok: Tokenizer) -> None:
    """Each step's counts (what the metrics take) sum to the totals, and every accepted token is one more row
    of its request in that step (ignore_eos, so no accepted token ends a request)."""
    core = make_core(serve_artifact, max_slots=3, spec=NGRAM)
    for i, text in enumerate(TEXTS[:3]):
        add(core, prompt(tok, text), f"c{i}", temperature=0, max_tokens=40, ignore_eos=True)
    accepted = drafts = tokens = extra_rows = 0
    while core.has_work():
        before = core.spec.totals.drafts
        o = core.step()
        rows = {rid: o.rids.count(rid) for rid in set(o.rids)}
        extra_rows += sum(n - 1 for n in rows.values())
        if core.spec.totals.drafts > before:
            c = core.spec.take_counts()
            accepted, drafts, tokens = accepted + c.accepted, drafts + c.drafts, tokens + c.draft_tokens
    t = core.spec.totals
    assert (accepted, drafts, tokens) == (t.accepted, t.drafts, t.draft_tokens) and t.accepted == extra_rows > 0



@pytest.mark.parametrize(("fields", "flag"), [
    (dict(num_speculative_tokens=8), "--num-speculative-tokens"),  # a knob without --speculative does nothing
    (dict(prompt_lookup_min=1), "--prompt-lookup-min"),
    (dict(speculative="ngram", num_speculative_tokens=0), "--num-speculative-tokens"),
    (dict(speculative="ngram", prompt_lookup_min=0), "--prompt-lookup-min"),
    (dict(speculative="ngram", prompt_lookup_max=1), "--prompt-lookup-max"),
    (dict(speculative="ngram", speculative_disable_by_batch_size=0), "--speculative-disable-by-batch-size"),
    (dict(speculative="draft"), "--draft-model"),
    (dict(speculative="ngram", draft_model="d"), "--draft-model"),
    (dict(speculative="draft", draft_model="d", prompt_lookup_min=1), "--prompt-lookup-min"),
    (dict(draft_model="d"), "--draft-model"),
])
def test_flags_are_checked_naming_the_flag(fields: dict, flag: str) -> None:
    from nextoken.errors import UserError
    from nextoken.serve.config import ServeConfig

    with pytest.raises(UserError) as e:
        ServeConfig(**fields).validate()
    assert flag in str(e.value)
    ServeConfig(speculative="ngram", num_speculative_tokens=8, prompt_lookup_min=1).validate()


# --- a draft model ---------------------------------------------------------------------------------
def draft_options(draft: Path, **kw) -> SpecOptions:
    return SpecOptions("draft", kw.pop("k", 4), draft_model=str(draft), disable_by_batch_size=8, **kw)


def test_a_draft_model_gives_the_same_tokens(serve_artifact: Path, tiny_artifact: Path, tok: Tokenizer) -> None:
    """The target as its own draft proposes the target's greedy tokens, so at T = 0 every draft token is
    accepted (rounding aside); another model with the same tokenizer (a 32-token context: it drafts only
    while the sequence fits it) is accepted less. Either way every request's tokens, greedy and seeded at
    T = 0.8 with top-p, equal those without speculation, through joins and leaves in 3 slots."""
    kinds = [dict(temperature=0), dict(temperature=0.8, top_p=0.9, seed=5), dict(temperature=0, logprobs=1)]
    reqs = [(prompt(tok, TEXTS[i]), dict(max_tokens=20 + 5 * i, ignore_eos=True, **kinds[i % 3])) for i in range(7)]
    base, _ = run(serve_artifact, reqs, None, stagger=2, max_slots=3)
    got, core = run(serve_artifact, reqs, draft_options(serve_artifact), stagger=2, max_slots=3)
    assert [r["ids"] for r in got] == [r["ids"] for r in base]
    t = core.spec.totals
    assert t.drafts > 20 and t.accepted > 0.5 * t.draft_tokens
    small, core = run(serve_artifact, reqs, draft_options(tiny_artifact), stagger=2, max_slots=3)
    assert [r["ids"] for r in small] == [r["ids"] for r in base] and core.spec.totals.drafts > 0
    greedy = [(ids, dict(temperature=0, max_tokens=40)) for ids, _ in reqs[:3]]
    _, core = run(serve_artifact, greedy, draft_options(serve_artifact))
    assert core.spec.totals.accepted >= 0.95 * core.spec.totals.draft_tokens > 0


def test_a_draft_model_that_does_not_pay_pauses_for_every_request_and_longer_each_time(
        serve_artifact: Path, tok: Tokenizer) -> None:
    """With a break-even no draft can reach (the target as its own draft, each of its tokens owing more than
    one), each failed judgement pauses the draft model for every request, REPROBE_TOKENS tokens generated
    the first time and twice as long each time after; no step drafts while it is paused."""
    from nextoken.serve.engine.spec import REPROBE_TOKENS

    core = make_core(serve_artifact, max_slots=1, spec=draft_options(serve_artifact))
    sp = core.spec
    sp.break_even = 1.5  # each draft token must be accepted one and a half times: never
    pauses = []  # (paused from, until) per failed judgement
    for rid, n in (("a", 60), ("b", 400)):  # a is judged once; b starts paused, then is judged again and again
        add(core, prompt(tok, "the cat sat on the mat"), rid, temperature=0, max_tokens=n, ignore_eos=True)
        while core.has_work():
            emitted, paused_until, drafts = sp.emitted, sp.draft_resume_at, sp.totals.drafts
            core.step()
            if emitted < paused_until:
                assert sp.totals.drafts == drafts, "a step drafted while the draft model was paused"
            if sp.draft_resume_at != paused_until:
                pauses.append((sp.emitted, sp.draft_resume_at))
    assert sp.totals.drafts >= 3 * JUDGE_AFTER and len(pauses) >= 3
    assert [until - at for at, until in pauses[:3]] == [REPROBE_TOKENS, 2 * REPROBE_TOKENS, 4 * REPROBE_TOKENS]


def test_a_new_requests_prompt_is_not_charged_to_its_drafts(serve_artifact: Path, tok: Tokenizer) -> None:
    """The draft reads each request's prompt once, on its first proposal. That read is a prefill, not the cost
    of a draft: a slow one (0.3 s injected) must not enter the per-draft time the judge charges, nor pause the
    draft model."""
    import time

    core = make_core(serve_artifact, max_slots=1, spec=draft_options(serve_artifact))
    sp = core.spec
    runner = sp.draft.runner
    real = runner.prefill
    prompts_read = []

    def prefill(slot: int, ids: np.ndarray, start: int) -> np.ndarray:
        if start == 0:
            prompts_read.append(len(ids))
            time.sleep(0.3)
        return real(slot, ids, start)

    runner.prefill = prefill
    add(core, prompt(tok, "the cat sat on the mat"), "a", temperature=0, max_tokens=60, ignore_eos=True)
    drain(core)
    assert len(prompts_read) == 1 and sp.totals.drafts >= JUDGE_AFTER
    assert sp.drafting_s < 0.1, f"the prompt's read was charged to the drafts ({sp.drafting_s:.3f} s per draft)"
    assert sp.draft_resume_at == 0


def test_a_draft_with_another_tokenizer_is_refused_naming_the_flag(serve_artifact: Path,
                                                                  tiny_bpe_artifact: Path) -> None:
    """In the engine (a hot-reloaded target) and at start-up (`nextoken serve` exits naming --draft-model)."""
    import subprocess
    import sys

    from tests.conftest import free_port

    with pytest.raises(ValueError, match="--draft-model .*tokenizer differs"):
        make_core(serve_artifact, spec=draft_options(tiny_bpe_artifact))
    proc = subprocess.run([sys.executable, "-m", "nextoken", "serve", str(serve_artifact), "--port", str(free_port()),
                           "--speculative", "draft", "--draft-model", str(tiny_bpe_artifact)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--draft-model" in proc.stderr and "tokenizer differs" in proc.stderr


def test_a_draft_trained_with_the_targets_tokenizer_is_taken(tiny_bpe_artifact: Path, tiny_corpus: Path,
                                                             tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`nextoken train --tokenizer-from ARTIFACT` trains on the target's byte-level BPE as it is (the preset's
    tokenizer gives way, an explicit --vocab-size is refused by name); its export passes check_draft and
    drafts for the target, whose greedy tokens stay the same."""
    from nextoken.cli import main
    from nextoken.export.artifact import load_artifact
    from nextoken.export.build import export_run
    from nextoken.serve.engine.draft import check_draft

    flags = ["train", "--data", str(tiny_corpus), "--tokenizer-from", str(tiny_bpe_artifact), "--n-layer", "1",
             "--n-head", "2", "--n-embd", "16", "--block-size", "32", "--batch-size", "4", "--max-iters", "3",
             "--eval-interval", "3", "--eval-iters", "1", "--sample-tokens", "0", "--threads", "1", "--no-progress",
             "--no-tensorboard", "--out-dir"]
    assert main([*flags, str(tmp_path / "refused"), "--vocab-size", "500"]) != 0
    assert "--vocab-size: --tokenizer-from" in capsys.readouterr().err
    assert main([*flags, str(tmp_path / "run")]) == 0
    draft = export_run(tmp_path / "run", tmp_path / "draft", name="draft", log=None)
    check_draft(load_artifact(tiny_bpe_artifact), load_artifact(draft))
    tok = Tokenizer.from_file(str(tiny_bpe_artifact / "tokenizer.json"))
    reqs = [([0] + tok.encode("the cat sat on", add_special_tokens=False).ids, dict(temperature=0, max_tokens=12))]
    (base,), _ = run(tiny_bpe_artifact, reqs, None)
    (got,), core = run(tiny_bpe_artifact, reqs, draft_options(draft))
    assert got["ids"] == base["ids"] and core.spec.totals.drafts > 0


def test_the_memory_plan_counts_the_draft(serve_artifact: Path, tiny_artifact: Path) -> None:
    """The draft's weights and its own KV cache (the target's slots, up to the draft's 32-token context) are
    part of what start-up checks against the free memory."""
    from nextoken.export.artifact import load_artifact
    from nextoken.serve import memory
    from nextoken.serve.config import ServeConfig

    target, draft = load_artifact(serve_artifact), load_artifact(tiny_artifact)
    p = memory.plan(ServeConfig(max_batch_size=4), target.config, memory.weights_bytes(serve_artifact))
    q = memory.with_draft(p, draft.config, tiny_artifact)
    kv = 4 * 32 * memory.token_bytes(draft.config)
    assert q.total_bytes - p.total_bytes == q.draft_bytes == memory.weights_bytes(tiny_artifact) + kv > kv
    assert "draft model" in q.describe()
