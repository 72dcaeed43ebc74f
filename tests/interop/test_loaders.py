"""Other tools load our exports unchanged and produce the server's greedy tokens.

The reference is the real server over the ONNX artifact (``server_greedy``). Each tool gets the
same token ids the server feeds, ``<|endoftext|>`` followed by the prompt (the server's documented
convention), and decodes greedily until the server's token count or eos. A tool that read a weight,
a position, a special token or the tokenizer wrongly would differ within a few of these 5 x 16 steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.interop.conftest import NEW_TOKENS, PROMPTS, strip_eos


def _config(artifact: Path) -> dict:
    return json.loads((artifact / "config.json").read_text())


def test_transformers_reads_artifact_config_and_tokenizer(interop_artifact: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    cfg = transformers.AutoConfig.from_pretrained(interop_artifact)
    ours = _config(interop_artifact)
    assert type(cfg).__name__ == "GPT2Config"
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_positions, cfg.vocab_size) == (
        ours["n_layer"], ours["n_head"], ours["n_embd"], ours["n_positions"], ours["vocab_size"])
    tok = transformers.AutoTokenizer.from_pretrained(interop_artifact)
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == ours["eos_token_id"] and tok.model_max_length == ours["n_positions"]
    raw = Tokenizer.from_file(str(interop_artifact / "tokenizer.json"))
    for text in [*PROMPTS, "Café — ünïcödé 123\n\ttabs", "<|endoftext|>the cat"]:
        assert tok(text).input_ids == raw.encode(text).ids  # no BOS added, specials kept whole
        assert tok.decode(tok(text).input_ids) == raw.decode(raw.encode(text).ids, skip_special_tokens=False)


def test_optimum_generate_equals_server(interop_artifact: Path, server_greedy: dict[str, list[int]]) -> None:
    pytest.importorskip("optimum.onnxruntime")
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(interop_artifact)
    model = ORTModelForCausalLM.from_pretrained(interop_artifact, use_cache=True, use_io_binding=False)
    for p in PROMPTS:
        ids = tok(tok.eos_token + p, return_tensors="pt").input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
        assert strip_eos(out[0, ids.shape[1]:].tolist(), tok.eos_token_id) == server_greedy[p], p


def test_onnxruntime_genai_equals_server(interop_artifact: Path, server_greedy: dict[str, list[int]]) -> None:
    og = pytest.importorskip("onnxruntime_genai")
    eos = _config(interop_artifact)["eos_token_id"]
    model = og.Model(str(interop_artifact))
    tokenizer = og.Tokenizer(model)
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(interop_artifact / "tokenizer.json"))
    for p in PROMPTS:
        ids = [int(i) for i in tokenizer.encode(p)]
        assert ids == raw.encode(p).ids  # genai's own tokenizer reads our tokenizer files the same way
        prompt = np.array([eos, *ids], dtype=np.int32)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + NEW_TOKENS, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(prompt)
        while not gen.is_done():
            gen.generate_next_token()
        new = [int(t) for t in gen.get_sequence(0)[len(prompt):]]
        assert strip_eos(new, eos) == server_greedy[p], p
        assert tokenizer.decode(np.array(server_greedy[p], dtype=np.int32)) == raw.decode(server_greedy[p])


def test_transformers_on_hf_export_equals_checkpoint_and_server(interop_hf: Path, interop_run: Path,
                                                              server_greedy: dict[str, list[int]]) -> None:
    pytest.importorskip("transformers")
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from nextoken.train.run import load_run

    hf = GPT2LMHeadModel.from_pretrained(interop_hf).eval()
    ours = load_run(interop_run).model
    g = torch.Generator().manual_seed(1)
    V, T = ours.config.vocab_size, ours.config.block_size
    with torch.no_grad():
        for ids in (torch.randint(0, V, (1, T), generator=g), torch.randint(0, V, (4, 9), generator=g)):
            diff = (hf(ids).logits - ours(ids).logits).abs().max().item()  # (B, T, vocab) both
            assert diff <= 1e-4, diff
    tok = AutoTokenizer.from_pretrained(interop_hf)
    for p in PROMPTS:
        ids = tok(tok.eos_token + p, return_tensors="pt").input_ids
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
        assert strip_eos(out[0, ids.shape[1]:].tolist(), tok.eos_token_id) == server_greedy[p], p


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> Path:
    """Every recipe option away from GPT-2 at once: rotary positions, QK-norm, relu^2, an untied head."""
    from tests.conftest import train_tiny

    out = tmp_path_factory.mktemp("recipe") / "run"
    train_tiny(out, tiny_corpus, tokenizer="bpe", max_iters=20, eval_interval=20, pos_emb="rope", qk_norm=True,
               mlp_act="relu2", tie_embeddings=False)
    return out


def test_non_gpt2_recipe_runs_from_the_artifact_and_is_refused_as_gpt2_weights(
        recipe_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The ONNX artifact carries the whole computation, so Optimum runs any recipe as trained; the
    GPT-2 weight formats refuse it, naming every option, instead of writing weights GPT-2 would misread."""
    pytest.importorskip("optimum.onnxruntime")
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    from nextoken.cli import main
    from nextoken.export.build import export_run
    from nextoken.train.run import load_run

    art = export_run(recipe_run, tmp_path / "art", log=None)
    assert _config(art)["nextoken_architecture"] == {"pos_emb": "rope", "qk_norm": True, "mlp_act": "relu2",
                                                     "tie_embeddings": False}
    model = ORTModelForCausalLM.from_pretrained(art, use_cache=True, use_io_binding=False)
    ours = load_run(recipe_run).model
    ids = torch.tensor([[_config(art)["eos_token_id"], 5, 9, 12]])
    with torch.no_grad():
        want = ids
        for _ in range(NEW_TOKENS):  # plain greedy with PyTorch's full forward pass
            want = torch.cat([want, ours(want).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=None)
    assert got[0].tolist() == want[0].tolist()
    for fmt, out in (("hf", tmp_path / "hf"), ("gguf", tmp_path / "m.gguf")):
        capsys.readouterr()
        assert main(["export", str(recipe_run), "--format", fmt, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "pos_emb, qk_norm, mlp_act, tie_embeddings" in err and "--format onnx" in err, err
        assert not out.exists()
