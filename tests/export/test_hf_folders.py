"""`nextoken export HF_DIR`: a Hugging Face folder (``tests/hf_folders.py``) -> an artifact, HF and GGUF exports.

The reference is transformers' own model over the folder. Both ONNX graphs must give its logits within
1e-4: model.onnx on a prefill plus cached decode steps, serving.onnx through the real runner (chunked
prefill into a grouped-query cache). The artifact carries the folder's tokenizer files as the serving
side reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nextoken.cli import main
from tests.hf_folders import CASES


def _logits(ref, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].numpy()  # (T, vocab)


@pytest.mark.parametrize("case", CASES)
def test_both_graphs_equal_transformers(hf_folders, case: str) -> None:
    from nextoken.export.artifact import load_artifact
    from nextoken.export.runtime import Runner
    from nextoken.export.verify import OrtDecoder, make_session

    art = load_artifact(hf_folders.artifact(case))
    ref = hf_folders.reference(case)
    c = art.config
    assert art.manifest["verification"]["passed"] and art.manifest["verification"]["serving"]["passed"]
    ids = np.random.default_rng(1).integers(0, c["vocab_size"], 24).tolist()
    want = _logits(ref, ids)  # (24, vocab)

    dec = OrtDecoder(make_session(str(art.onnx_path)), c["n_layer"], c["n_kv_head"], c["head_dim"])
    got = [dec.prefill(np.array([ids[:20]]), np.ones((1, 20), dtype=np.int64))[0]]
    got += [dec.step(np.array([t]))[0][None] for t in ids[20:]]  # cached decode, one token at a time
    assert np.abs(np.concatenate(got)[: len(ids)] - want).max() <= 1e-4

    runner = Runner(art, max_slots=2, max_len=32, threads=1)
    got = np.concatenate([runner.prefill(1, ids[:9], 0), runner.prefill(1, ids[9:], 9)])  # two prefill chunks
    assert np.abs(got - want).max() <= 1e-4
    assert runner.host_cache[0].shape == (2, c["n_kv_head"], 32, c["head_dim"])


def test_artifact_carries_the_folders_tokenizer_files(hf_folders) -> None:
    """The serving side's contract: tokenizer.json as it was, the chat template, bos / eos, add_bos_token."""
    for case in ("qwen2", "llama3"):
        folder, art = hf_folders.folder(case), hf_folders.artifact(case)
        assert (art / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
        theirs = json.loads((folder / "tokenizer_config.json").read_text())
        tc = json.loads((art / "tokenizer_config.json").read_text())
        assert tc["chat_template"] == theirs["chat_template"] and tc["eos_token"] == theirs["eos_token"]
        assert json.loads((art / "generation_config.json").read_text()) == \
            json.loads((folder / "generation_config.json").read_text())
        cfg = json.loads((art / "config.json").read_text())
        assert cfg["model_type"] == case.rstrip("3") and cfg["n_kv_head"] == 2 and cfg["n_positions"] == 128
    qwen = json.loads((hf_folders.artifact("qwen2") / "tokenizer_config.json").read_text())
    assert qwen["bos_token"] is None and qwen["add_bos_token"] is False
    llama3 = json.loads((hf_folders.artifact("llama3") / "tokenizer_config.json").read_text())
    assert llama3["add_bos_token"] is True and llama3["bos_token"] == "<|begin_of_text|>"
    cfg = json.loads((hf_folders.artifact("llama3") / "config.json").read_text())
    assert cfg["eos_token_id"] == [1, 2] and cfg["architectures"] == ["LlamaForCausalLM"]
    genai = json.loads((hf_folders.artifact("qwen2") / "genai_config.json").read_text())["model"]
    assert genai["type"] == "qwen2" and genai["decoder"]["num_key_value_heads"] == 2


def test_our_artifacts_carry_our_chat_template(tiny_bpe_artifact: Path) -> None:
    from nextoken.export.artifact import DEFAULT_CHAT_TEMPLATE

    tc = json.loads((tiny_bpe_artifact / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == DEFAULT_CHAT_TEMPLATE and tc["eos_token"] == tc["bos_token"] == "<|endoftext|>"
    assert tc["add_bos_token"] is False
    assert json.loads((tiny_bpe_artifact / "config.json").read_text())["n_kv_head"] == 2


def test_int8_quantised_export_of_a_folder(hf_folders, tmp_path: Path) -> None:
    import onnx

    from nextoken.export.build import export_run

    art = export_run(hf_folders.folder("smollm"), tmp_path / "q", quantize="int8", log=None)
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["export"]["quantize"] == "int8" and manifest["verification"]["finite"]
    for graph in ("model.onnx", "serving.onnx"):
        assert "MatMulInteger" in {n.op_type for n in onnx.load(str(art / graph)).graph.node}, graph


@pytest.mark.parametrize("case", ["llama3", "qwen2"])
def test_hf_export_reloads_in_transformers(hf_folders, case: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from nextoken.export.hf import export_hf

    out = export_hf(hf_folders.folder(case), tmp_path / "hf", log=None)
    model = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    assert type(model).__name__ == {"llama3": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[case]
    ids = np.random.default_rng(2).integers(0, model.config.vocab_size, 30).tolist()
    assert np.abs(_logits(model, ids) - _logits(hf_folders.reference(case), ids)).max() <= 1e-4


@pytest.mark.parametrize("case", CASES)
def test_gguf_reads_back_as_llama(hf_folders, case: str, tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    from nextoken.export.gguf import export_gguf

    path = export_gguf(hf_folders.folder(case), tmp_path / f"{case}.gguf", log=None)  # verified read-back
    reader = gguf.GGUFReader(str(path))

    def field(key: str):
        return reader.get_field(key).contents()

    assert field("general.architecture") == "llama"
    model = {"smollm": "gpt2", "llama3": "gpt2", "qwen2": "gpt2", "mistral": "llama"}[case]
    pre = {"smollm": "smollm", "llama3": "llama-bpe", "qwen2": "qwen2", "mistral": "default"}[case]
    assert (field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")) == (model, pre)
    assert field("tokenizer.chat_template") == json.loads(
        (hf_folders.folder(case) / "tokenizer_config.json").read_text())["chat_template"]
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) == (case in ("llama3", "mistral"))  # untied heads
    assert ("blk.0.attn_q.bias" in names) == (case == "qwen2")
    assert ("rope_freqs.weight" in names) == (case == "llama3")
    if case == "mistral":
        types = field("tokenizer.ggml.token_type")
        assert types[3] == gguf.TokenType.BYTE and field("tokenizer.ggml.add_space_prefix") is True
        assert field("tokenizer.ggml.add_bos_token") is True


def test_folders_that_cannot_be_computed_are_refused_before_any_work(
        hf_folders, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    folder = tmp_path / "windowed"
    shutil.copytree(hf_folders.folder("mistral"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "sliding_window": 16}))
    capsys.readouterr()
    assert main(["export", str(folder), "--out", str(tmp_path / "art")]) == 2
    err = capsys.readouterr().err
    assert "sliding_window" in err and "HF_DIR" in err and not (tmp_path / "art").exists()
