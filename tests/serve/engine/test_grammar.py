"""Structured output on the token level (serve/engine/grammar.py): masks from llguidance over our own vocabularies.

Generation here is random logits + the module's masks + sampling (Gumbel-max: an exact draw from the
softmax of the masked logits), in batches, on a character vocabulary and a byte-level BPE trained with
nextoken's trainer. Random logits are the adversary a grammar must hold against: nothing but the mask
keeps the output valid, so every parse and schema check below fails if a mask lets one wrong token through.
"""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
from tokenizers import Tokenizer

from nextoken.serve.engine.grammar import (
    GrammarCompiler,
    GrammarConfig,
    GrammarError,
    Matcher,
    TokenRejected,
    apply_masks,
)
from nextoken.serve.http.errors import RequestError, validate
from nextoken.serve.http.requests import ChatCompletionRequest
from nextoken.serve.wire import StructuredKind, StructuredSpec
from nextoken.train.tokenizer import EOT, UNK, train_tokenizer
from tests.conftest import TINY_TEXT

# The corpus has every character the JSON outputs below need (the tiny corpus alone has no braces or digits).
JSON_TEXT = ('{"name": "Rex", "age": 12, "kind": "dog", "tags": ["a", "b"], "score": -1.5e+3, "alive": true,'
             ' "note": null, "owner": {"city": "Oslo", "zip": "01234"}}\n[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]\\/_\t'
             '(+)*<>|=?!#ABCDEFGHIJKLMNOPQRSTUVWXYZ caf\u00e9 \u2615\n')
PAD = 13  # logits wider than the tokenizer, as a model with a padded vocabulary has

SCHEMA = {
    "title": "Pet",
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12, "description": "what it answers to"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "kind": {"enum": ["cat", "dog", "fox"]},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "owner": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                  "required": ["city"], "additionalProperties": False},
        "alive": {"type": "boolean"},
        "note": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}]},
    },
    "required": ["name", "age", "kind"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module", params=["char", "bpe"])
def vocab(request: pytest.FixtureRequest) -> tuple[Tokenizer, GrammarCompiler]:
    docs = [TINY_TEXT, JSON_TEXT * 20]
    tok = train_tokenizer("char", docs) if request.param == "char" else train_tokenizer("bpe", docs, vocab_size=400)
    compiler = GrammarCompiler(tok.to_str(), tok.get_vocab_size() + PAD, tok.token_to_id(EOT))
    return tok, compiler


def spec_of(fields: dict) -> StructuredSpec | None:
    """The structure a chat request with these fields asks for, as the request contract makes it."""
    return validate(ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], **fields}).structured


def generate(compiler: GrammarCompiler, specs: list[StructuredSpec | None], seeds: list[int],
             max_tokens: int = 1200, check: bool = False) -> tuple[list[list[int]], list[Matcher | None]]:
    """Sample a batch to EOS under each row's spec (None: free text for max_tokens / 8 tokens).

    With ``check``, every step also asserts that EOS is allowed exactly when the row's grammar accepts
    what came so far, and that a terminated grammar allows EOS alone.
    """
    B, V, eos = len(specs), compiler.vocab_size, compiler.eos_id
    matchers: list[Matcher | None] = [None if s is None else compiler.compile(s) for s in specs]
    live = list(matchers)
    rngs = [np.random.default_rng(s) for s in seeds]
    bias = np.zeros((B, V), dtype=np.float32)
    outs: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for _ in range(max_tokens):
        logits = np.stack([3.0 * r.standard_normal(V) for r in rngs]).astype(np.float32)  # (B, V)
        raw = logits.copy()
        rows = compiler.fill_masks(live, bias)
        assert rows.tolist() == [i for i, m in enumerate(live) if m is not None]
        apply_masks(logits, bias, rows)
        free = [i for i in range(B) if live[i] is None]
        assert np.array_equal(logits[free], raw[free]), "a row without a grammar was changed"
        if check:
            for i in rows:
                m = live[i]
                assert m.error is None
                assert (bias[i, eos] == 0) == m.is_accepting()
                if m.is_terminated():
                    assert np.flatnonzero(bias[i] == 0).tolist() == [eos]
        gumbel = np.stack([-np.log(-np.log(r.random(V))) for r in rngs])  # (B, V)
        tokens = (logits + gumbel).argmax(axis=1)
        for i in range(B):
            if done[i]:
                continue
            t = int(tokens[i])
            if live[i] is None:  # free text: no EOS expected, stop by length
                outs[i].append(t)
                done[i] = len(outs[i]) >= max_tokens // 8
                continue
            if t == eos:
                done[i], live[i] = True, None
                continue
            live[i].accept(t)
            outs[i].append(t)
        if all(done):
            return outs, matchers
    raise AssertionError(f"rows {[i for i in range(B) if not done[i]]} did not end in {max_tokens} tokens")


def text_of(tok: Tokenizer, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False)


def test_json_schema_outputs_parse_and_validate_for_50_seeds(vocab: tuple[Tokenizer, GrammarCompiler]) -> None:
    tok, compiler = vocab
    spec = spec_of({"response_format": {"type": "json_schema", "json_schema": {
        "name": "pet", "schema": SCHEMA, "strict": True}}})
    outs, matchers = generate(compiler, [spec] * 50, list(range(50)))
    seen_optional = set()
    for ids, m in zip(outs, matchers, strict=True):
        value = json.loads(text_of(tok, ids))
        jsonschema.validate(value, SCHEMA)
        seen_optional |= set(value) - set(SCHEMA["required"])
        assert m.is_terminated() and m.error is None
    assert seen_optional, "no optional property in 50 samples: the masks are not exploring the schema"


def test_json_object_gives_objects(vocab: tuple[Tokenizer, GrammarCompiler]) -> None:
    tok, compiler = vocab
    spec = spec_of({"response_format": {"type": "json_object"}})
    outs, _ = generate(compiler, [spec] * 20, list(range(100, 120)))
    for ids in outs:
        assert isinstance(json.loads(text_of(tok, ids)), dict)


def test_guided_json_takes_schema_text(vocab: tuple[Tokenizer, GrammarCompiler]) -> None:
    tok, compiler = vocab
    schema = {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2,
              "maxItems": 4}
    outs, _ = generate(compiler, [spec_of({"guided_json": json.dumps(schema)})] * 10, list(range(10)))
    for ids in outs:
        jsonschema.validate(json.loads(text_of(tok, ids)), schema)


def test_regex_and_choice_match(vocab: tuple[Tokenizer, GrammarCompiler]) -> None:
    tok, compiler = vocab
    regex = r"(cat|dog)-[0-9]{2,4}( [A-Z][a-z]{1,5})?"
    choices = ["the cat", "a dog", 'say "hi"', "caf\u00e9 \u2615"]
    specs = [spec_of({"guided_regex": regex})] * 12 + [spec_of({"guided_choice": choices})] * 12
    outs, _ = generate(compiler, specs, list(range(24)))
    for ids in outs[:12]:
        assert re.fullmatch(regex, text_of(tok, ids))
    got = {text_of(tok, ids) for ids in outs[12:]}
    assert got <= set(choices) and len(got) > 1


def test_guided_grammar_lark_and_gbnf(vocab: tuple[Tokenizer, GrammarCompiler]) -> None:
    tok, compiler = vocab
    gbnf = 'root ::= "(" num ("+" num)* ")"\nnum ::= [0-9] | [1-9] [0-9]'
    lark = 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]|[1-9][0-9]/'
    outs, _ = generate(compiler, [spec_of({"guided_grammar": gbnf})] * 6
                       + [spec_of({"guided_grammar": lark})] * 6, list(range(12)))
    for ids in outs:
        assert re.fullmatch(r"\((?:[0-9]|[1-9][0-9])(?:\+(?:[0-9]|[1-9][0-9]))*\)", text_of(tok, ids))


def test_eos_only_when_the_grammar_accepts(vocab: tuple[Tokenizer, GrammarCompiler]) -> None:
    """EOS is offered exactly when the text so far is complete (checked against the parser's own state
    and, independently, against json.loads), and a finished grammar offers nothing but EOS."""
    tok, compiler = vocab
    spec = spec_of({"response_format": {"type": "json_object"}})
    m = compiler.compile(spec)
    bias = np.zeros((1, compiler.vocab_size), dtype=np.float32)
    rng = np.random.default_rng(0)
    ids: list[int] = []
    for _ in range(2000):
        compiler.fill_masks([m], bias)
        eos_allowed = bias[0, compiler.eos_id] == 0
        try:
            complete = isinstance(json.loads(text_of(tok, ids)), dict) if ids else False
        except json.JSONDecodeError:
            complete = False
        assert eos_allowed == complete, text_of(tok, ids)
        if complete:
            break
        allowed = np.flatnonzero(bias[0] == 0)
        t = int(rng.choice(allowed[allowed != compiler.eos_id]))
        m.accept(t)
        ids.append(t)
    assert complete and m.is_terminated()
    assert np.flatnonzero(bias[0] == 0).tolist() == [compiler.eos_id]
    generate(compiler, [spec_of({"guided_regex": "a[ab]{0,3}"})] * 8 + [spec] * 8, list(range(16)), check=True)


def test_rows_without_a_grammar_are_untouched(vocab: tuple[Tokenizer, GrammarCompiler]) -> None:
    _, compiler = vocab
    m = compiler.compile(spec_of({"guided_choice": ["yes", "no"]}))
    for dtype, sentinel in ((np.bool_, True), (np.float32, 7.0)):
        out = np.full((4, compiler.vocab_size), sentinel, dtype=dtype)
        rows = compiler.fill_masks([None, m, None, m], out)
        assert rows.tolist() == [1, 3]
        assert (out[[0, 2]] == sentinel).all()
        assert (out[1] == out[3]).all() and not (out[1] == sentinel).all()
    logits = np.arange(4 * compiler.vocab_size, dtype=np.float32).reshape(4, -1)
    before = logits.copy()
    apply_masks(logits, out, rows)
    assert np.array_equal(logits[[0, 2]], before[[0, 2]])
    assert np.array_equal(logits[[1, 3]], before[[1, 3]] + out[[1, 3]])
    apply_masks(logits, out, np.array([], dtype=np.int64))
    assert compiler.fill_masks([None, None], np.zeros((2, compiler.vocab_size), np.float32)).size == 0
    # generation with free rows in the batch: generate() asserts their logits are never changed
    generate(compiler, [None, spec_of({"guided_choice": ["yes", "no"]}), None], [1, 2, 3])


def test_bool_and_bias_masks_agree(vocab: tuple[Tokenizer, GrammarCompiler]) -> None:
    _, compiler = vocab
    ms = [compiler.compile(spec_of({"response_format": {"type": "json_object"}})), None,
          compiler.compile(spec_of({"guided_regex": "x+"}))]
    bias = np.zeros((3, compiler.vocab_size), np.float32)
    mask = np.zeros((3, compiler.vocab_size), bool)
    assert compiler.fill_masks(ms, bias).tolist() == compiler.fill_masks(ms, mask).tolist() == [0, 2]
    assert np.array_equal(bias[[0, 2]] == 0, mask[[0, 2]])
    assert set(np.unique(bias[[0, 2]]).tolist()) == {0.0, -np.inf}


def test_special_and_padded_ids_never_allowed(vocab: tuple[Tokenizer, GrammarCompiler]) -> None:
    tok, compiler = vocab
    n = tok.get_vocab_size()
    # a regex whose text could spell "<unk>" or "<|endoftext|>": special tokens must still never match
    m = compiler.compile(spec_of({"guided_regex": r"[<>|a-z]{1,20}"}))
    bias = np.zeros((1, compiler.vocab_size), np.float32)
    specials = [i for i in (tok.token_to_id(UNK),) if i is not None]
    compiler.fill_masks([m], bias)
    assert bias[0, compiler.eos_id] == -np.inf  # nothing yet: the regex needs a character first
    for c in "<unk":
        compiler.fill_masks([m], bias)
        assert (bias[0, n:] == -np.inf).all()
        assert all(bias[0, s] == -np.inf for s in specials)
        m.accept(tok.encode(c).ids[0])
    with pytest.raises(TokenRejected):
        m.accept(n + 1)
    if specials:
        with pytest.raises(TokenRejected):
            m.accept(specials[0])


def test_a_rejected_token_raises(vocab: tuple[Tokenizer, GrammarCompiler]) -> None:
    tok, compiler = vocab
    m = compiler.compile(spec_of({"guided_choice": ["yes"]}))
    with pytest.raises(TokenRejected):
        m.accept(tok.encode("n").ids[0])


def test_utf8_across_byte_level_tokens() -> None:
    """Byte-level tokens that each hold part of a character still assemble the exact choice."""
    tok = train_tokenizer("bpe", [TINY_TEXT], vocab_size=300)  # no token holds \u2615 whole
    compiler = GrammarCompiler(tok.to_str(), tok.get_vocab_size(), tok.token_to_id(EOT))
    outs, _ = generate(compiler, [spec_of({"guided_choice": ["\u2615 caf\u00e9", "\u00e9t\u00e9"]})] * 8,
                       list(range(8)))
    assert {tok.decode(ids) for ids in outs} == {"\u2615 caf\u00e9", "\u00e9t\u00e9"}
    assert any(len(ids) > len(tok.decode(ids)) for ids in outs)  # some token held a partial character


def test_dead_end_in_a_vocabulary_ends_the_sequence() -> None:
    """A character vocabulary without a character the grammar needs: refused at compile time when the
    grammar cannot even start, else the row gets EOS only and the matcher says why."""
    tok = train_tokenizer("char", [TINY_TEXT])  # no braces, no digits
    compiler = GrammarCompiler(tok.to_str(), tok.get_vocab_size(), tok.token_to_id(EOT))
    with pytest.raises(GrammarError) as e:
        compiler.compile(spec_of({"response_format": {"type": "json_object"}}))
    assert e.value.param == "response_format" and "vocabulary" in e.value.message
    # llguidance ends "ab[0-9]" itself (EOS only); for a forced "{" it offers <unk>, which must not pass
    for spec in (spec_of({"guided_regex": "ab[0-9]"}), spec_of({"guided_choice": ["ab{"]})):
        m = compiler.compile(spec)
        bias = np.zeros((1, compiler.vocab_size), np.float32)
        for c in "ab":
            m.accept(tok.token_to_id(c))
        compiler.fill_masks([m], bias)
        assert np.flatnonzero(bias[0] == 0).tolist() == [compiler.eos_id]
        assert m.is_terminated() and not m.is_accepting() and "vocabulary" in m.error
        with pytest.raises(TokenRejected):
            m.accept(tok.token_to_id("a"))
        m.accept(compiler.eos_id)
        assert m.is_terminated() and m.error


# Where each refusal comes from: the request contract (the shape: RequestError) or the engine's compile
# (what llguidance cannot enforce: GrammarError, a 400 from the engine). Each names the request field.
CONTRACT, ENGINE = "contract", "engine"


@pytest.mark.parametrize(("fields", "where", "param", "words"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     ENGINE, "response_format", "strin"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}}, ENGINE, "response_format", "uniqueItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}},
     CONTRACT, "response_format.json_schema.name", "name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, CONTRACT,
     "response_format.json_schema.schema", "schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}}},
     CONTRACT, "response_format.json_schema.strict", "strict"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "extra": 1}}},
     CONTRACT, "response_format.json_schema.extra", "extra"),
    ({"guided_json": '{"type": '}, CONTRACT, "guided_json", "not valid JSON"),
    ({"guided_json": {"type": "object", "properties": {"a": {"type": "integer", "minimum": "zero"}}}},
     ENGINE, "guided_json", ""),
    ({"guided_json": "[1, 2]"}, CONTRACT, "guided_json", "schema object"),
    ({"guided_json": [1, 2]}, CONTRACT, "guided_json", "guided_json"),
    ({"guided_regex": "a(b"}, ENGINE, "guided_regex", "regex"),
    ({"guided_regex": ""}, CONTRACT, "guided_regex", "must not be empty"),
    ({"guided_choice": []}, CONTRACT, "guided_choice", "must not be empty"),
    ({"guided_choice": ["a", 3]}, CONTRACT, "guided_choice", "string"),
    ({"guided_grammar": "root ::= ("}, ENGINE, "guided_grammar", "grammar"),
    ({"guided_grammar": 'start: "a" /[0-9]+'}, ENGINE, "guided_grammar", "grammar"),
    ({"guided_json": {"type": "object"}, "guided_whitespace_pattern": "[ "}, ENGINE, "guided_whitespace_pattern",
     "pattern"),
])
def test_invalid_structures_are_refused_naming_the_field(vocab: tuple[Tokenizer, GrammarCompiler], fields: dict,
                                                         where: str, param: str, words: str) -> None:
    _, compiler = vocab
    if where == CONTRACT:
        with pytest.raises(RequestError) as e:
            spec_of(fields)
        assert e.value.param == param and words in e.value.message and e.value.status == 400, e.value.message
        return
    with pytest.raises(GrammarError) as e2:
        compiler.compile(spec_of(fields))
    assert e2.value.param == param and words in e2.value.message
    assert isinstance(e2.value, ValueError)


def test_whitespace_is_bounded_and_can_be_set(vocab: tuple[Tokenizer, GrammarCompiler]) -> None:
    tok, compiler = vocab

    def accepts(spec: StructuredSpec, text: str) -> bool:
        m = compiler.compile(spec)
        try:
            for t in tok.encode(text).ids:
                m.accept(t)
        except TokenRejected:
            return False
        return m.is_accepting()

    obj = spec_of({"response_format": {"type": "json_object"}})
    assert accepts(obj, '{"a": 1}') and accepts(obj, '{\n  "a": [1, 2]\n}')
    assert not accepts(obj, "{" + " " * 17 + '"a": 1}')  # a tiny model cannot spend max_tokens on spaces
    compact = StructuredSpec(StructuredKind.JSON_OBJECT, "response_format", whitespace="")  # the contract asks 1+
    assert accepts(compact, '{"a":1}') and not accepts(compact, '{"a": 1}')


def test_compiled_grammars_are_cached_and_matchers_independent(vocab: tuple[Tokenizer, GrammarCompiler]) -> None:
    tok, _ = vocab
    compiler = GrammarCompiler(tok.to_str(), tok.get_vocab_size(), tok.token_to_id(EOT), GrammarConfig(cache_size=2))
    a1 = compiler.compile(spec_of({"guided_choice": ["ab", "cd"]}))
    a2 = compiler.compile(spec_of({"guided_choice": ["ab", "cd"]}))
    assert compiler.cache_len() == 1
    a1.accept(tok.encode("a").ids[0])
    bias = np.zeros((2, compiler.vocab_size), np.float32)
    compiler.fill_masks([a1, a2], bias)
    assert not np.array_equal(bias[0], bias[1])  # a2 is still at the start
    compiler.compile(spec_of({"guided_regex": "x"}))
    compiler.compile(spec_of({"guided_regex": "y"}))
    assert compiler.cache_len() == 2  # LRU bound


def test_compiler_and_fill_refuse_bad_shapes(vocab: tuple[Tokenizer, GrammarCompiler]) -> None:
    tok, compiler = vocab
    with pytest.raises(ValueError, match="vocab_size"):
        GrammarCompiler(tok.to_str(), tok.get_vocab_size() - 1, 0)
    with pytest.raises(ValueError, match="eos_id"):
        GrammarCompiler(tok.to_str(), tok.get_vocab_size(), tok.get_vocab_size())
    m = compiler.compile(spec_of({"response_format": {"type": "json_object"}}))
    for bad in (np.zeros((2, compiler.vocab_size), np.float32), np.zeros((1, compiler.vocab_size), np.float64),
                np.zeros((1, compiler.vocab_size - 1), np.float32)):
        with pytest.raises(ValueError, match="out must be"):
            compiler.fill_masks([m], bad)
    with pytest.raises(ValueError):
        GrammarConfig(cache_size=0)
