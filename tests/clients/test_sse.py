"""SSE decoding and chunk → event conversion, with no network: bytes in, events out."""

from __future__ import annotations

import contextlib
import json

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nextoken_client import StreamError
from nextoken_client._streaming import ServerSentEvent, SSEDecoder, Stream, iter_sse


def decode(*chunks: bytes) -> list[ServerSentEvent]:
    return list(iter_sse(chunks))


def test_basic_events_and_done() -> None:
    events = decode(b'data: {"a": 1}\n\ndata: [DONE]\n\n')
    assert [e.data for e in events] == ['{"a": 1}', "[DONE]"]


def test_partial_line_across_chunks_is_joined() -> None:
    events = decode(b"da", b"ta: hel", b"lo\n", b"\n")
    assert [e.data for e in events] == ["hello"]


def test_utf8_sequence_split_across_chunks() -> None:
    raw = "data: héllo ✓\n\n".encode()
    cut = raw.index("✓".encode()) + 1  # inside the three-byte check mark
    assert [e.data for e in decode(raw[:cut], raw[cut:])] == ["héllo ✓"]


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_every_line_ending(newline: bytes) -> None:
    raw = b"event: x" + newline + b"data: a" + newline + b"data: b" + newline + newline
    (event,) = decode(raw)
    assert (event.event, event.data) == ("x", "a\nb")


def test_crlf_split_between_chunks_is_one_line_break() -> None:
    # A "\r" at a chunk's end then "\n": one break, not a blank line that would dispatch early.
    events = decode(b"data: a\r", b"\ndata: b\r\n\r\n")
    assert [e.data for e in events] == ["a\nb"]


def test_comments_unknown_fields_and_space_rules() -> None:
    events = decode(b": keep-alive\nfoo: bar\ndata:no-space\nid: 7\nretry: 100\n\n")
    assert events == [ServerSentEvent("no-space", "message", "7", 100)]


def test_truncated_last_line_is_dropped_but_complete_data_flushes() -> None:
    # A server killed mid-write leaves half a line: never parse it.
    assert decode(b'data: {"choices": [{"te') == []
    # Complete data lines without the closing blank line are still an event.
    assert [e.data for e in decode(b"data: x\n")] == ["x"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n"), max_size=20),
                min_size=1, max_size=6),
       st.lists(st.integers(0, 400), max_size=8),
       st.sampled_from(["\n", "\r\n", "\r"]))
def test_any_split_of_the_body_gives_the_same_events(datas: list[str], cuts: list[int], nl: str) -> None:
    """However the transport splits the bytes (mid-line, mid-character, mid-CRLF), the events match."""
    raw = "".join(f"data: {d}{nl}{nl}" for d in datas).encode()
    points = sorted({min(c, len(raw)) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    decoder = SSEDecoder()
    got = [e.data for p in pieces for e in decoder.feed(p)] + [e.data for e in decoder.flush()]
    assert got == datas


def chunk(text: str = "", finish: str | None = None, ids: list[int] | None = None, **extra: object) -> bytes:
    choice: dict[str, object] = {"index": 0, "text": text, "finish_reason": finish}
    if ids is not None:
        choice["token_ids"] = ids
    body = {"id": "cmpl-1", "object": "text_completion", "choices": [choice], **extra}
    return f"data: {json.dumps(body)}\n\n".encode()


def stream_of(*parts: bytes) -> Stream:
    return Stream(httpx.Response(200, content=b"".join(parts), headers={"content-type": "text/event-stream"}))


def test_stream_events_then_one_final_event_with_finish_and_usage() -> None:
    usage = {"id": "cmpl-1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    with stream_of(chunk("he", ids=[5]), chunk("llo", finish="length", ids=[6]),
                   f"data: {json.dumps(usage)}\n\n".encode(), b"data: [DONE]\n\n") as s:
        events = list(s)
    assert [(e.text, e.token_ids, e.final) for e in events] == [("he", (5,), False), ("llo", (6,), False),
                                                                 ("", (), True)]
    final = events[-1]
    assert final.finish_reason == "length" and final.usage is not None
    assert (final.usage.prompt_tokens, final.usage.completion_tokens, final.usage.total_tokens) == (3, 2, 5)
    assert s.text == "hello" and s.response.is_closed


def test_chat_deltas_and_logprobs_are_read() -> None:
    body = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "hi"},
            "logprobs": {"content": [{"token": "hi", "logprob": -0.5,
                                      "top_logprobs": [{"token": "hi", "logprob": -0.5}]}]}}]}
    events = list(stream_of(f"data: {json.dumps(body)}\n\n".encode(), chunk(finish="stop"), b"data: [DONE]\n\n"))
    assert events[0].text == "hi" and events[0].logprobs[0].logprob == -0.5
    assert events[0].logprobs[0].top[0].token == "hi"
    assert events[-1].finish_reason == "stop"


def test_stream_cut_before_finish_raises_stream_error_with_partial_text() -> None:
    s = stream_of(chunk("par", ids=[1]), chunk("tial", ids=[2]))
    with pytest.raises(StreamError) as info:
        list(s)
    assert info.value.text == "partial" and info.value.events == 2
    assert s.response.is_closed


def test_error_chunk_mid_stream_is_a_stream_error() -> None:
    err = b'data: {"error": {"message": "engine failed", "type": "server_error"}}\n\n'
    with pytest.raises(StreamError, match="engine failed"):
        list(stream_of(chunk("a"), err))


def test_finish_without_done_still_completes() -> None:
    events = list(stream_of(chunk("a", finish="stop")))
    assert events[-1].final and events[-1].finish_reason == "stop"


def test_closing_early_closes_the_response() -> None:
    s = stream_of(chunk("a"), chunk("b"), chunk(finish="stop"), b"data: [DONE]\n\n")
    with s:
        next(s)
    assert s.response.is_closed


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.sampled_from(["choices", "text", "delta", "message", "content", "logprobs", "tokens",
                                         "token_logprobs", "top_logprobs", "token", "logprob", "usage", "index",
                                         "finish_reason", "token_ids", "id", "error", "prompt_tokens"]),
                        inner, max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_parsers_never_raise_on_odd_shapes(data: object) -> None:
    """The server and the SDK are versioned apart: odd shapes must degrade, not crash."""
    from nextoken_client._types import parse_completion

    parse_completion(data)
    # {"error": ...} chunks are reported as StreamError; nothing else may escape.
    with contextlib.suppress(StreamError):
        list(stream_of(f"data: {json.dumps(data)}\n\n".encode(), chunk(finish="stop")))
