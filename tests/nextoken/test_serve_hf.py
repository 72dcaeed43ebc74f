"""`nextoken serve HF_DIR`: a Hugging Face folder served directly, greedy tokens equal to transformers' generate.

Each folder of ``tests/hf_folders.py`` (four tokenizer styles, GQA, rope variants, bias, bf16/f16 shards)
is served by the real server, which exports it into ``$NEXTOKEN_CACHE`` on its first start. The
reference is transformers' own ``generate`` over the folder, which reads the folder's
generation_config.json as the server does for the fields a request omits (Qwen2's repetition_penalty
1.05 among them) and stops at its end tokens. Chat prompts are rendered with the tokenizer's
``apply_chat_template``.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess
from tests.hf_folders import CASES, PROMPTS

NEW_TOKENS = 12
CHATS = [[{"role": "user", "content": "the cat"}],
         [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "hello there"},
          {"role": "user", "content": "a quick brown"}]]


def _generate(ref, ids: list[int]) -> list[int]:
    """transformers' generate, greedy, with the folder's generation_config (its end tokens, its penalties)."""
    import torch

    x = torch.tensor([ids])
    out = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                       temperature=None, top_p=None, top_k=None, pad_token_id=0)[0, len(ids):].tolist()
    eos = ref.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    return out[:next((i + 1 for i, t in enumerate(out) if t in eos), len(out))]  # up to the end token, as vLLM


def _post(server: ServerProcess, path: str, body: dict) -> dict:
    r = httpx.post(server.url + path, json={**body, "max_tokens": NEW_TOKENS, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("nextoken-cache")


@pytest.mark.parametrize("case", CASES)
def test_a_served_folder_generates_as_transformers(hf_folders, cache: Path, case: str) -> None:
    from transformers import AutoTokenizer

    folder = hf_folders.folder(case)
    ref = hf_folders.reference(case)
    tok = AutoTokenizer.from_pretrained(folder)
    server = ServerProcess(folder, env={"NEXTOKEN_CACHE": str(cache)})
    try:
        assert f"exporting {folder.resolve()}" in server.output()
        for text in PROMPTS:
            ids = tok(text)["input_ids"]  # the BOS where the folder's tokenizer adds one
            got = _post(server, "/v1/completions", {"prompt": text})
            assert got["token_ids"] == _generate(ref, ids), (case, text)
        for messages in CHATS:  # (Mistral's template has no generation prompt: the reply follows [/INST])
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            got = _post(server, "/v1/chat/completions", {"messages": messages})
            want = _generate(ref, list(ids))
            assert got["token_ids"] == want, (case, messages)  # (random weights write broken UTF-8: ids, not text)
            usage_prompt = httpx.post(server.url + "/tokenize", json={"messages": messages}, timeout=10).json()
            assert usage_prompt["tokens"] == list(ids), case
    finally:
        server.stop()


def test_the_export_is_reused_until_the_folder_changes(hf_folders, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from nextoken.export.cache import exported_folder

    monkeypatch.setenv("NEXTOKEN_CACHE", str(tmp_path / "cache"))
    folder = shutil.copytree(hf_folders.folder("smollm"), tmp_path / "SmolLM-copy")
    first = exported_folder(folder)
    assert first.parent == tmp_path / "cache" / "served"
    server = ServerProcess(folder, env={"NEXTOKEN_CACHE": str(tmp_path / "cache")})
    try:
        assert "from its export" in server.output() and "exporting" not in server.output()
        assert httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"] == "SmolLM-copy:1"
    finally:
        server.stop()
    (folder / "generation_config.json").write_text('{"eos_token_id": 1, "temperature": 0.5}')
    assert exported_folder(folder) != first  # another key: a changed folder is exported again
