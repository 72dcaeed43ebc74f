"""The metadata files other tools read are in every artifact, hashed, and describe the graph that is there."""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from nextoken.export.artifact import load_artifact

EXTRAS = ("tokenizer_config.json", "special_tokens_map.json", "genai_config.json")


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_artifacts_carry_the_ecosystem_files(tiny_artifact: Path, tiny_bpe_artifact: Path) -> None:
    for folder, kind in ((tiny_artifact, "char"), (tiny_bpe_artifact, "bpe")):
        art = load_artifact(folder)
        assert set(EXTRAS) <= set(art.manifest["files"])  # hashed like every other file
        cfg = art.config
        assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
        assert cfg["activation_function"] == "gelu_new" and cfg["n_inner"] == 4 * cfg["n_embd"]
        tc = _json(folder / "tokenizer_config.json")
        assert tc["eos_token"] == tc["bos_token"] == tc["pad_token"] == "<|endoftext|>"
        assert tc["model_max_length"] == cfg["n_positions"] and tc["add_bos_token"] is False
        assert tc["unk_token"] == ("<|endoftext|>" if kind == "bpe" else "<unk>")
        specials = {v["content"]: int(k) for k, v in tc["added_tokens_decoder"].items()}
        tok = _json(folder / "tokenizer.json")
        assert specials == {a["content"]: a["id"] for a in tok["added_tokens"]}  # the ids tokenizer.json has
        assert _json(folder / "special_tokens_map.json")["eos_token"] == "<|endoftext|>"


def test_genai_config_names_the_graphs_tensors(tiny_bpe_artifact: Path) -> None:
    genai = _json(tiny_bpe_artifact / "genai_config.json")
    g = genai["model"]
    cfg = load_artifact(tiny_bpe_artifact).config
    dec = g["decoder"]
    graph = onnx.load(str(tiny_bpe_artifact / dec["filename"]), load_external_data=False).graph
    inputs, outputs = {v.name for v in graph.input}, {v.name for v in graph.output}
    L = dec["num_hidden_layers"]
    assert (L, dec["num_attention_heads"], dec["head_size"], dec["hidden_size"]) == (
        cfg["n_layer"], cfg["n_head"], cfg["head_dim"], cfg["n_embd"])
    named_in = {dec["inputs"][k] for k in ("input_ids", "attention_mask", "position_ids")}
    named_in |= {dec["inputs"][k] % i for k in ("past_key_names", "past_value_names") for i in range(L)}
    named_out = {dec["outputs"]["logits"]}
    named_out |= {dec["outputs"][k] % i for k in ("present_key_names", "present_value_names") for i in range(L)}
    assert named_in == inputs and named_out == outputs
    assert g["type"] == "phi" and genai["search"]["past_present_share_buffer"] is False  # present = concat(past, new)
    assert g["eos_token_id"] == cfg["eos_token_id"] and g["context_length"] == cfg["n_positions"]
