"""The playground page in chromium against a real `nextoken serve`: what it shows is what the API said.

Each check compares the page with an independent answer: the same request sent with httpx
(greedy or seeded, so it is reproducible), the server's own /metrics, or a Python
implementation of the same formula. A page that invented, rounded away or mislabelled a
number fails.
"""

from __future__ import annotations

import json
import math
import time

import httpx
import pytest

from tests.browser_fixtures import PHONE
from tests.conftest import metric
from tests.playground import helpers as ui

# The first test to use them builds the session's model (train + export): minutes on a busy 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _api_twin(url: str, page: object) -> dict:
    """The page's own request (as it shows it), sent again without streaming."""
    body = json.loads(page.text_content("#request-json"))
    body.pop("stream_options", None)
    body["stream"] = False
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_page_comes_from_this_server_only_and_shows_the_model(pg_server, pg_run, open_page) -> None:
    r = httpx.get(pg_server.url + "/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "default-src 'self'" in r.headers["content-security-policy"]  # no CDN could load even if referenced
    page, _ = open_page(pg_server.url + "/")
    loaded = page.evaluate("() => performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(u.startswith(pg_server.url + "/") for u in loaded), loaded

    info = httpx.get(pg_server.url + "/api/model").json()
    model = httpx.get(pg_server.url + "/v1/models").json()["data"][0]
    facts = {e["fact"]: e["text"] for e in page.locator("#model-facts dd").evaluate_all(
        "els => els.map(e => ({fact: e.dataset.fact, text: e.textContent}))")}
    assert facts["name"] == model["name"] == "pg" and facts["version"] == "1"
    assert facts["context"] == f"{model['context_length']:,} tokens" and model["context_length"] == 4096
    assert facts["vocab"] == f"{info['vocab_size']:,} (char)"
    params = json.loads((pg_run / "summary.json").read_text())["params"]  # what training counted
    assert info["parameters"] == params and facts["parameters"] == f"{params / 1e3:.1f}k"
    assert facts["shape"] == f"{info['n_layer']} layers · {info['n_head']} heads · {info['n_embd']} wide"
    assert facts["trained"].startswith(f"step {info['source']['step']}, val loss ")
    assert page.is_visible("#run-link")  # the run folder the artifact was exported from is on this machine
    assert page.is_hidden("#key-box")  # no --api-key-env on this server


def test_tokens_stream_as_chips_whose_alternatives_equal_the_api_logprobs(pg_server, open_page, shots) -> None:
    page, _ = open_page(pg_server.url + "/")
    page.fill("#prompt", "the cat sat on")
    ui.set_controls(page, temperature=0, top_k=0, top_p=1, max_tokens=40, logprobs=5)
    page.focus("#prompt")
    page.keyboard.press("Control+Enter")  # the documented shortcut, not a click
    assert ui.finish(page) in ("length", "stop")
    chips = ui.chips(page)
    choice = _api_twin(pg_server.url, page)
    lp = choice["logprobs"]
    assert [c["token"] for c in chips] == lp["tokens"] and len(chips) == len(choice["token_ids"])
    for c, want in zip(chips, lp["token_logprobs"], strict=True):
        assert float(c["p"]) == pytest.approx(math.exp(want), rel=1e-12)  # the chip's shade is this probability

    i = 3
    page.click(f'#output .chip[data-i="{i}"]')
    bars = ui.bars(page)
    want = sorted(lp["top_logprobs"][i].items(), key=lambda kv: -kv[1])
    assert [b["token"] for b in bars] == [t for t, _ in want]
    for b, (_, w) in zip(bars, want, strict=True):
        assert b["p"] == pytest.approx(math.exp(w), rel=1e-12)
        assert abs(float(b["shown"]) - math.exp(w)) <= 5e-5 + 1e-12  # the 4 decimals drawn beside the bar
    assert [b["chosen"] for b in bars].count(True) == 1  # greedy: the argmax, marked
    assert bars[0]["chosen"] and bars[0]["token"] == lp["tokens"][i]
    formula = page.get_attribute("#detail-body .formula", "data-p")
    assert float(formula) == pytest.approx(math.exp(lp["token_logprobs"][i]), rel=1e-12)
    assert page.inner_text("#detail-title") == f"Token {i + 1} of {len(chips)}"
    page.screenshot(path=str(shots / "alternatives.png"), full_page=True)

    page.hover('#output .chip[data-i="6"]')  # hovering previews another position...
    assert page.inner_text("#detail-title") == f"Token 7 of {len(chips)}"
    page.hover("#prompt")  # ...and leaving returns to the pinned one
    assert page.inner_text("#detail-title") == f"Token {i + 1} of {len(chips)}"
    page.focus(f'#output .chip[data-i="{i}"]')
    page.keyboard.press("ArrowRight")  # the keyboard walks the tokens
    assert page.inner_text("#detail-title") == f"Token {i + 2} of {len(chips)}"
    assert page.evaluate("() => document.activeElement.dataset.i") == str(i + 1)


def test_seeded_sampling_in_the_page_equals_the_api(pg_server, open_page) -> None:
    page, _ = open_page(pg_server.url + "/")
    page.fill("#prompt", "hello")
    ui.set_controls(page, temperature=1.1, top_k=20, top_p=0.95, max_tokens=30, seed=1234, logprobs=3)
    page.fill("#stop_strings", "zzz\\n\\n")
    page.click("#generate")
    ui.finish(page)
    sent = json.loads(page.text_content("#request-json"))
    assert sent["seed"] == 1234 and sent["top_k"] == 20 and sent["top_p"] == 0.95 and sent["stop"] == ["zzz\n\n"]
    choice = _api_twin(pg_server.url, page)
    assert [c["token"] for c in ui.chips(page)] == choice["logprobs"]["tokens"]


def test_stop_cancels_the_stream_and_the_running_gauge_drops(pg_server, open_page, shots) -> None:
    url = pg_server.url
    page, _ = open_page(url + "/")
    cancelled = metric(url, "nextoken_requests_total", outcome="cancelled")
    page.fill("#prompt", "the")
    ui.set_controls(page, temperature=0, max_tokens=4000, logprobs=2)
    page.check("#ignore_eos")  # 4000 tokens whatever the model predicts: seconds of streaming
    page.evaluate(ui.arrivals("#output"))
    page.click("#generate")
    # Streaming: chips have arrived in at least two DOM updates (checked again below).
    page.wait_for_function("() => new Set(window.__arrivals.filter(([, n]) => n > 0).map(([, n]) => n)).size >= 2")
    with pg_server.engine_frozen():  # however fast the engine, the stream cannot end by itself before Stop
        running = metric(url, "nextoken_requests_running")
        page.keyboard.press("Escape")
        assert running == 1  # the server was generating for this page when Stop was pressed
        assert ui.finish(page) == "stopped"
        stopped_at = len(ui.chips(page))
        assert 0 < stopped_at < 4000
    deadline = time.monotonic() + 10
    while metric(url, "nextoken_requests_running") != 0:
        assert time.monotonic() < deadline, "the running gauge did not drop after Stop"
        time.sleep(0.05)
    assert metric(url, "nextoken_requests_total", outcome="cancelled") == cancelled + 1
    time.sleep(0.3)
    assert len(ui.chips(page)) == stopped_at  # nothing arrives after Stop
    assert page.is_enabled("#generate") and page.is_disabled("#stop")
    assert page.inner_text("#gen-status") == f"stopped after {stopped_at} tokens"
    page.screenshot(path=str(shots / "stopped.png"), full_page=True)
    # Streamed: the chips appeared over several DOM updates spread in time, not in one piece at the end.
    counts = [(t, n) for t, n in page.evaluate("() => window.__arrivals") if n > 0]
    assert len({n for _, n in counts}) >= 2 and counts[-1][0] > counts[0][0], counts


def test_score_text_shows_the_servers_refusal_and_no_figures(pg_server, open_page) -> None:
    """A text the server cannot score (longer than the context) shows the server's own message, no guesses."""
    context = httpx.get(pg_server.url + "/v1/models", timeout=10).json()["data"][0]["max_model_len"]
    text = "the cat sat on the mat. " * (context // 8)  # > context characters: a char model, one token each
    r = httpx.post(pg_server.url + "/v1/completions", json={"prompt": text, "max_tokens": 0, "echo": True,
                                                            "logprobs": 5, "temperature": 0}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    page, watch = open_page(pg_server.url + "/")
    watch.allow(r"status of 400")  # chromium logs the server's refusal of the scoring request
    page.click("#tab-score")
    page.fill("#score-text", text)
    page.click("#score")
    page.wait_for_selector("#score-status.error")
    assert page.inner_text("#score-status") == f"error 400: {r.json()['error']['message']}"
    assert page.locator("#heat .chip").count() == 0 and page.locator("#score-summary dd").count() == 0


def test_score_text_equals_the_api(pg_server, open_page, shots) -> None:
    text = "the cat sat on the mat. the dog"
    r = httpx.post(pg_server.url + "/v1/completions", json={"prompt": text, "max_tokens": 0, "echo": True,
                                                            "logprobs": 8, "temperature": 0}, timeout=30)
    assert r.status_code == 200, f"the server cannot score text: {r.status_code} {r.text}"
    lp = r.json()["choices"][0]["logprobs"]
    page, _ = open_page(pg_server.url + "/")
    page.click("#tab-score")
    page.fill("#score-text", text)
    page.focus("#score-text")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("#score-summary dd")
    scored = [v for v in lp["token_logprobs"] if v is not None]
    total = -sum(scored)
    facts = {e["fact"]: e["text"] for e in page.locator("#score-summary dd").evaluate_all(
        "els => els.map(e => ({fact: e.dataset.fact, text: e.textContent}))")}
    assert facts["n"] == str(len(scored))
    assert facts["total"] == f"{total:.4f} nats"
    assert facts["mean"] == f"{total / len(scored):.4f} nats/token"
    assert facts["ppl"] == f"{math.exp(total / len(scored)):.2f}"
    cells = ui.chips(page, "#heat")
    assert [c["token"] for c in cells] == lp["tokens"]
    surprises = page.locator("#heat .chip").evaluate_all("els => els.map(e => e.dataset.surprise)")
    for s, v in zip(surprises, lp["token_logprobs"], strict=True):
        assert (s == "") if v is None else float(s) == pytest.approx(-v, rel=1e-12)
    page.screenshot(path=str(shots / "score.png"), full_page=True)


def _prom_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus's histogram_quantile over cumulative (le, count) buckets, written independently of the page."""
    buckets = sorted(buckets)
    total = buckets[-1][1]
    rank = q * total
    lo, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lo
            return le if count == below else lo + (le - lo) * (rank - below) / (count - below)
        lo, below = le, count
    return lo


def test_live_panel_reads_the_servers_metrics(pg_server, open_page) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    url = pg_server.url
    for _ in range(3):  # some requests, so the TTFT histogram has observations
        httpx.post(url + "/v1/completions", json={"prompt": "the", "max_tokens": 5}, timeout=30)
    page, _ = open_page(url + "/")
    text = httpx.get(url + "/metrics").text
    buckets: dict[float, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "nextoken_time_to_first_token_seconds_bucket":
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
    want = _prom_quantile(0.5, list(buckets.items()))
    got = page.evaluate("""async (text) => {
        const m = await import('/ui/common.js');
        const s = m.parsePrometheus(text);
        return [m.histogramQuantile(0.5, m.histogramBuckets(s, 'nextoken_time_to_first_token_seconds')),
                m.sumOf(s, 'nextoken_requests_total')];
    }""", text)
    assert got[0] == pytest.approx(want, rel=1e-12)
    assert got[1] == metric(url, "nextoken_requests_total")  # nothing else ran meanwhile
    # The panel itself refreshes every 2 s from the same route.
    before = metric(url, "nextoken_requests_total")
    httpx.post(url + "/v1/completions", json={"prompt": "the", "max_tokens": 3}, timeout=30)
    page.wait_for_selector(f'#live-facts dd[data-fact="requests"]:text-is("{int(before) + 1:,}")', timeout=10_000)
    assert page.inner_text('#live-facts dd[data-fact="running"]') == "0"
    assert page.inner_text('#live-facts dd[data-fact="ttft"]').endswith(" ms")


def test_keyboard_focus_order_labels_and_phone_width(pg_server, open_page, shots) -> None:
    page, _ = open_page(pg_server.url + "/")
    for label, control in (("Prompt", "prompt"), ("temperature", "temperature"), ("top-k", "top_k"),
                           ("top-p", "top_p"), ("max tokens", "max_tokens"), ("seed", "seed"),
                           ("alternatives", "logprobs"), ("stop", "stop_strings"),
                           ("ignore end-of-text", "ignore_eos")):
        assert page.get_by_label(label, exact=True).get_attribute("id") == control  # every control has a label
    page.focus("#tab-generate")
    order = []
    for _ in range(10):
        page.keyboard.press("Tab")
        order.append(page.evaluate("() => document.activeElement.id"))
    assert order[:10] == ["prompt", "generate", "temperature", "top_k", "top_p", "max_tokens", "seed", "logprobs",
                          "ignore_eos", "stop_strings"], order
    page.focus("#tab-generate")
    page.keyboard.press("ArrowRight")  # the tab list follows the ARIA tabs pattern
    assert page.is_visible("#panel-score") and page.is_hidden("#panel-generate")
    page.keyboard.press("ArrowLeft")
    assert page.is_visible("#panel-generate")

    phone, _ = open_page(pg_server.url + "/", viewport=PHONE)
    phone.fill("#prompt", "the cat")
    ui.set_controls(phone, temperature=0, max_tokens=24)
    phone.click("#generate")
    ui.finish(phone)
    width = phone.evaluate("() => [document.scrollingElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"horizontal scrolling at phone width: {width}"
    phone.click('#output .chip[data-i="2"]')
    out, detail = phone.locator("#output").bounding_box(), phone.locator("#detail").bounding_box()
    assert detail["y"] >= out["y"] + out["height"] and detail["width"] <= PHONE["width"]  # one column
    phone.screenshot(path=str(shots / "phone.png"), full_page=True)


def test_a_refused_request_names_its_field(pg_server, open_page) -> None:
    page, watch = open_page(pg_server.url + "/")
    watch.allow(r"status of 400")
    ui.set_controls(page, temperature=3)
    page.click("#generate")
    assert ui.finish(page) == "error"
    status = page.inner_text("#gen-status")
    assert status.startswith("error 400: temperature") and "got 3" in status, status
    assert page.get_attribute("#temperature", "aria-invalid") is not None


def test_accepted_draft_tokens_are_marked_in_the_chips(pg_artifact, open_page) -> None:
    """On a server with --speculative ngram, a repetitive greedy prompt: the chips the page underlines as
    accepted draft tokens are exactly those the stream the page read marks with accepted_draft, and
    there are some (the model's greedy continuation repeats itself, which the lookup guesses). The page's
    own response is the reference: which tokens a request drafts depends on the engine's timing judge,
    so a second request may draft others."""
    from tests.conftest import ServerProcess

    server = ServerProcess(pg_artifact, "--speculative", "ngram", "--prompt-lookup-min", "1", "--max-batch-size", "2")
    try:
        page, _ = open_page(server.url + "/")
        page.fill("#prompt", "hello hello hello hello")
        ui.set_controls(page, temperature=0, top_k=0, top_p=1, max_tokens=40, logprobs=1)
        with page.expect_response(lambda r: r.url.endswith("/v1/completions")) as answer:
            page.click("#generate")
        ui.finish(page)
        marked = page.locator("#output .chip").evaluate_all("els => els.map(e => e.classList.contains('drafted'))")
        streamed: list[bool] = []
        for line in answer.value.text().splitlines():
            if line.startswith("data: {"):
                for ch in json.loads(line[len("data: "):])["choices"]:
                    streamed += ch.get("accepted_draft") or [False] * len(ch["token_ids"])
        assert marked == streamed and sum(marked) > 0
        assert "accepted draft token" in page.get_attribute(f'#output .chip[data-i="{marked.index(True)}"]',
                                                            "aria-label")
    finally:
        server.stop()
