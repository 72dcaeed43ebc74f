"""Other tools on the artifacts of Hugging Face folders (``tests/hf_folders.py``): greedy equal to transformers'.

Optimum's ORTModelForCausalLM and onnxruntime-genai open the artifact of each folder unchanged (its
config.json of the family's model_type, genai_config.json of the family's type, the folder's own
tokenizer files) and continue four prompts greedily; the reference is transformers' own model over the
folder. With ``$NEXTOKEN_LLAMA_SERVER`` set, llama-server runs the GGUF export the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.hf_folders import CASES, PROMPTS, decided_greedy, greedy

NEW_TOKENS = 12


def _prompt_ids(folder: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids  # BOS where the folder adds it


@pytest.mark.parametrize("case", CASES)
def test_optimum_and_genai_generate_as_transformers(hf_folders, case: str) -> None:
    pytest.importorskip("optimum.onnxruntime")
    og = pytest.importorskip("onnxruntime_genai")
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    folder, art = hf_folders.folder(case), hf_folders.artifact(case)
    ref = hf_folders.reference(case)
    optimum = ORTModelForCausalLM.from_pretrained(art, use_cache=True, use_io_binding=False)
    genai = og.Model(str(art))
    genai_tok = og.Tokenizer(genai)
    for text in PROMPTS:
        ids = _prompt_ids(folder, text)
        want = greedy(ref, ids, NEW_TOKENS)
        x = torch.tensor([ids])
        got = optimum.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                               eos_token_id=None, pad_token_id=0, repetition_penalty=1.0  # qwen2's folder sets 1.05
                               )[0, len(ids):].tolist()
        assert got == want, (case, text, "optimum")
        params = og.GeneratorParams(genai)
        params.set_search_options(max_length=len(ids) + NEW_TOKENS, do_sample=False)
        gen = og.Generator(genai, params)
        gen.append_tokens(np.array(ids, dtype=np.int32))
        out: list[int] = []
        while not gen.is_done():
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        eos = json.loads((art / "config.json").read_text())["eos_token_id"]
        eos = eos if isinstance(eos, list) else [eos]
        stop = next((i for i, t in enumerate(want) if t in eos), len(want))  # genai stops at eos, as it should
        assert out[:stop + 1] == want[:stop + 1], (case, text, "genai")
        assert genai_tok.decode(np.array(want, dtype=np.int32)) is not None


def test_genai_reads_a_character_model(tiny_artifact: Path) -> None:
    """Our char tokenizer, a BPE without merges, opens in onnxruntime-genai (a WordLevel model did not)."""
    og = pytest.importorskip("onnxruntime_genai")
    from tokenizers import Tokenizer

    model = og.Model(str(tiny_artifact))
    tok = og.Tokenizer(model)
    raw = Tokenizer.from_file(str(tiny_artifact / "tokenizer.json"))
    for text in ["the cat sat on the mat.", "hello world, how are you?\n"]:
        assert [int(i) for i in tok.encode(text)] == raw.encode(text).ids
        ids = np.array(raw.encode(text).ids, dtype=np.int32)
        assert tok.decode(ids) == raw.decode(raw.encode(text).ids) == text


@pytest.mark.parametrize("case", CASES)
def test_llama_server_generates_as_transformers(hf_folders, case: str, tmp_path: Path) -> None:
    import sys

    import httpx

    pytest.importorskip("gguf")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from llama_peer import ENV, LlamaServer, find_binary

    binary = find_binary(None)
    if binary is None:
        pytest.skip(f"no llama-server binary: set ${ENV} (../shared/tools/build-llama-server.sh builds one)")
    from nextoken.export.gguf import export_gguf

    folder = hf_folders.folder(case)
    ref = hf_folders.reference(case)
    path = export_gguf(folder, tmp_path / f"{case}.gguf", log=None)
    with LlamaServer(binary, path, parallel=1, threads=1) as peer:
        for text in PROMPTS:
            ids = _prompt_ids(folder, text)
            body = {"prompt": ids, "n_predict": NEW_TOKENS, "temperature": 0, "top_k": 1, "repeat_penalty": 1.0,
                    "return_tokens": True, "cache_prompt": False}
            got = httpx.post(peer.url + "/completion", json=body, timeout=60).json()["tokens"]
            want = decided_greedy(ref, ids, NEW_TOKENS)  # (random weights give near-ties now and then)
            assert got[: len(want)] == want[: len(got)] and min(len(got), len(want)) >= 3, (case, text)
            r = httpx.post(peer.url + "/tokenize", json={"content": text, "add_special": True}, timeout=30)
            assert r.json()["tokens"] == ids, (case, text, "llama.cpp's tokenizer")
