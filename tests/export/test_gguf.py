"""`nextoken export --format gguf`: the file reads back with the gguf package as llama.cpp expects it.

The expected shapes are written out here from llama.cpp's GPT-2 loader (``llama_model_gpt2::
load_arch_tensors``, ggml order {ne0, ne1}), not derived from the exporter, so a transposed or
misnamed tensor fails. Token ids and merges are compared with the run's own tokenizer.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from nextoken.cli import main  # noqa: E402
from nextoken.train.run import load_run  # noqa: E402


def _err(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def llama_cpp_shapes(n_vocab: int, n_ctx: int, n_embd: int, n_layer: int) -> dict[str, list[int]]:
    ff = 4 * n_embd
    shapes = {"token_embd.weight": [n_embd, n_vocab], "position_embd.weight": [n_embd, n_ctx],
              "output_norm.weight": [n_embd], "output_norm.bias": [n_embd]}
    for i in range(n_layer):
        b = f"blk.{i}."
        shapes.update({b + "attn_norm.weight": [n_embd], b + "attn_norm.bias": [n_embd],
                       b + "attn_qkv.weight": [n_embd, 3 * n_embd], b + "attn_qkv.bias": [3 * n_embd],
                       b + "attn_output.weight": [n_embd, n_embd], b + "attn_output.bias": [n_embd],
                       b + "ffn_norm.weight": [n_embd], b + "ffn_norm.bias": [n_embd],
                       b + "ffn_up.weight": [n_embd, ff], b + "ffn_up.bias": [ff],
                       b + "ffn_down.weight": [ff, n_embd], b + "ffn_down.bias": [n_embd]})
    return shapes


def _field(reader: gguf.GGUFReader, key: str) -> object:
    f = reader.get_field(key)
    assert f is not None, key
    return f.contents()


@pytest.mark.parametrize("dtype, weight_type", [("f32", "F32"), ("f16", "F16"), ("q8_0", "Q8_0")])
def test_gguf_reads_back(tiny_bpe_run: Path, tmp_path: Path, dtype: str, weight_type: str) -> None:
    out = tmp_path / f"m-{dtype}.gguf"
    assert main(["export", str(tiny_bpe_run), "--format", "gguf", "--dtype", dtype, "--out", str(out),
                 "--name", "tiny"]) == 0
    run = load_run(tiny_bpe_run)
    c = run.model.config
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    assert {n: [int(x) for x in t.shape] for n, t in tensors.items()} == llama_cpp_shapes(
        c.vocab_size, c.block_size, c.n_embd, c.n_layer)
    types = {n: gguf.GGMLQuantizationType(t.tensor_type).name for n, t in tensors.items()}
    for name, t in types.items():
        two_d = len(tensors[name].shape) == 2 and name != "position_embd.weight"
        assert t == (weight_type if two_d else "F32"), name  # norms, biases, positions stay f32 (as llama.cpp)

    state = run.model.state_dict()
    pairs = {"token_embd.weight": state["transformer.wte.weight"][: c.vocab_size],
             "blk.1.attn_qkv.weight": state["transformer.h.1.attn.c_attn.weight"],
             "blk.0.ffn_down.weight": state["transformer.h.0.mlp.c_proj.weight"],
             "blk.0.attn_norm.bias": state["transformer.h.0.ln_1.bias"]}
    tol = {"F32": 0.0, "F16": 1e-3, "Q8_0": 1e-2}[weight_type]
    for name, want in pairs.items():
        t = tensors[name]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        scale = float(want.abs().max())
        assert float(np.abs(got - want.numpy()).max()) <= tol * scale + 1e-7, name

    tok = json.loads(run.tokenizer.to_str())
    vocab = {**tok["model"]["vocab"], **{a["content"]: a["id"] for a in tok["added_tokens"]}}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == c.vocab_size and all(tokens[i] == t for t, i in vocab.items())
    eos = run.tokenizer.token_to_id("<|endoftext|>")
    ttypes = _field(reader, "tokenizer.ggml.token_type")
    assert ttypes[eos] == gguf.TokenType.CONTROL and ttypes[eos + 1] == gguf.TokenType.NORMAL
    assert _field(reader, "tokenizer.ggml.merges") == [" ".join(m) for m in tok["model"]["merges"]]
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert _field(reader, "tokenizer.ggml.eos_token_id") == eos == _field(reader, "tokenizer.ggml.bos_token_id")
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False
    assert _field(reader, "general.architecture") == "gpt2" and _field(reader, "general.name") == "tiny"
    assert (_field(reader, "gpt2.context_length"), _field(reader, "gpt2.block_count"),
            _field(reader, "gpt2.embedding_length"), _field(reader, "gpt2.attention.head_count"),
            _field(reader, "gpt2.feed_forward_length")) == (c.block_size, c.n_layer, c.n_embd, c.n_head, 4 * c.n_embd)


def test_gguf_refuses_char_tokenizer(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.gguf"
    err = _err(capsys, ["export", str(tiny_run), "--format", "gguf", "--out", str(out)])
    assert "--format" in err and "char tokenizer" in err and "byte-level BPE" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_gguf_out_and_dtype_errors(tiny_bpe_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = str(tiny_bpe_run)
    assert "--out" in _err(capsys, ["export", run, "--format", "gguf", "--out", str(tmp_path / "m.bin")])
    assert "--dtype" in _err(capsys, ["export", run, "--format", "gguf", "--dtype", "q4_0",
                                      "--out", str(tmp_path / "m.gguf")])
    precious = tmp_path / "precious.gguf"
    precious.write_bytes(b"not a gguf file")
    assert "not a GGUF file" in _err(capsys, ["export", run, "--format", "gguf", "--out", str(precious)])
    assert precious.read_bytes() == b"not a gguf file"
    good = tmp_path / "m.gguf"
    assert main(["export", run, "--format", "gguf", "--out", str(good)]) == 0
    assert main(["export", run, "--format", "gguf", "--dtype", "f16", "--out", str(good)]) == 0  # replaces a GGUF
    assert gguf.GGUFReader(str(good)).get_field("general.file_type").contents() == int(gguf.LlamaFileType.MOSTLY_F16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "precious.gguf"]  # no temp files left
