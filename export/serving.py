"""The serving graph: the same GPT, with a KV cache that ONNX Runtime updates in place.

``model.onnx`` (``onnx.py``) follows Optimum's contract, which other runtimes read: it returns
``present = concat(past, new)``, so a server feeding it rewrites every row's whole cache on
every step and rebuilds all of them whenever a sequence joins or leaves. ``serving.onnx`` has a
contract of its own, made for a server that owns a preallocated cache::

    inputs
      input_ids                 int64   (batch, sequence_length)
      position_ids              int64   (batch, sequence_length)
      seqlens_k                 int32   (batch,)   tokens in each row's cache after this call, minus 1
      total_sequence_length     int32   ()         max over rows of seqlens_k + 1
      past_key_values.{i}.key   float   (batch, n_kv_head, max_cache_len, head_dim)   i = 0 .. n_layer-1
      past_key_values.{i}.value float   (batch, n_kv_head, max_cache_len, head_dim)
    outputs
      logits                    float32 (batch, sequence_length, vocab_size)
      present.{i}.key           float   (batch, n_kv_head, max_cache_len, head_dim)
      present.{i}.value         float   (batch, n_kv_head, max_cache_len, head_dim)

* Each row owns a cache buffer of fixed length; its tokens sit at slots 0 .. seqlens_k, in
  order (no padding anywhere). A call appends ``sequence_length`` tokens to every row at slots
  ``seqlens_k + 1 - sequence_length`` .. ``seqlens_k``: one token per row to decode, a chunk of a
  prompt to prefill (a first chunk or a later one).
* ``present`` IS ``past``: bind the same buffer as input and output (IOBinding) and ONNX
  Runtime's ``com.microsoft.GroupQueryAttention`` writes only the new columns and attends over
  each row's own ``seqlens_k + 1`` tokens, reading nothing past them. Rows of one call may have
  any lengths; a row the caller does not care about (a free slot) costs one token's compute.
* ``position_ids`` are each row's token positions (its slot indices, as there is no padding).
* "float" is float32, or float16 for ``dtype="fp16"``; logits are always float32.
* n_kv_head < n_head is grouped-query attention (the llama family): the kernel's ``kv_num_heads``;
  each key/value head serves n_head / n_kv_head query heads.

The graph is traced from the model's own modules (``GPT.embed``, each block's ``ln_1``,
``attn.qkv``, ``attn.c_proj``, ``ln_2``, ``mlp``, and ``GPT.head``), so every architecture
option lives in one place; only the attention product itself is swapped for the kernel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import torch
from torch.export import Dim

from nextoken.export.artifact import cache_names
from nextoken.export.onnx import DTYPES, Traced, graph_facts, output_names, trace
from nextoken.train.model import GPT

SERVING_OPSET = 21  # GroupQueryAttention lives in com.microsoft; the rest needs nothing newer
MAX_CACHE_DIM = "max_cache_len"


def serving_input_names(n_layer: int) -> list[str]:
    return ["input_ids", "position_ids", "seqlens_k", "total_sequence_length"] + cache_names("past_key_values", n_layer)


class ServingDecoder(Traced):
    """The traced function: the model's blocks around ONNX Runtime's in-place attention kernel."""

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, seqlens_k: torch.Tensor,
                total_sequence_length: torch.Tensor, *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        B, T = input_ids.shape
        C, nh, nkv, hs = m.config.n_embd, m.config.n_head, m.config.n_kv_head, m.config.head_dim
        # The residual stream is kept 2-D, (B*T, C): nn.Linear on 2-D input exports as one Gemm (bias
        # included) where 3-D gives MatMul + Add, and only the attention kernel needs (B, T, ...).
        x = m.embed(input_ids, position_ids).reshape(B * T, C)  # (B*T, C)
        presents: list[torch.Tensor] = []
        for i, block in enumerate(m.transformer.h):
            past_k, past_v = caches[2 * i], caches[2 * i + 1]  # each (B, nkv, max_cache_len, hs)
            h = block.ln_1(x)  # (B*T, C)
            attn = block.attn
            if attn.plain:
                # Nothing happens to q and k between the projection and attention (what attn.qkv would do
                # is split and reshape): the kernel takes the packed (B, T, (nh + 2 nkv) hs) projection as it is.
                qkv = attn.c_attn(h).reshape(B, T, m.config.qkv_size)  # (B, T, (nh + 2 nkv) hs): q | k | v
                inputs = (qkv, None, None)
            else:
                q, k, v = attn.qkv(h.reshape(B, T, C), position_ids)  # (B, nh, T, hs), (B, nkv, T, hs) x2
                inputs = tuple(t.transpose(1, 2).reshape(B, T, t.shape[1] * hs) for t in (q, k, v))  # (B, T, n hs)
            # Only ONNX export gives this op meaning: eagerly it returns zeros of these shapes.
            y, pk, pv = torch.onnx.ops.symbolic_multi_out(
                "com.microsoft::GroupQueryAttention", (*inputs, past_k, past_v, seqlens_k, total_sequence_length),
                dict(num_heads=nh, kv_num_heads=nkv), dtypes=(x.dtype, past_k.dtype, past_v.dtype),
                shapes=((B, T, nh * hs), past_k.shape, past_v.shape), version=1)
            x = x + attn.c_proj(y.reshape(B * T, nh * hs))  # (B*T, C)
            x = x + block.mlp(block.ln_2(x))
            presents += [pk, pv]
        logits = m.head(x).float()  # (B*T, vocab)
        return (logits.reshape(B, T, logits.shape[-1]), *presents)  # logits (B, T, vocab)


def _example_inputs(model: GPT, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Sizes >= 2 everywhere: torch.export specialises dimensions of size 0 or 1."""
    c = model.config
    B, T, S = 2, 3, 8
    ids = torch.randint(0, c.vocab_size, (B, T), device=device)  # (B, T)
    pos = torch.arange(T, device=device)[None].expand(B, T).contiguous()  # (B, T)
    seqlens = torch.full((B,), T - 1, dtype=torch.int32, device=device)  # (B,)
    total = torch.tensor(T, dtype=torch.int32, device=device)  # ()
    kv = [torch.zeros(B, c.n_kv_head, S, c.head_dim, dtype=dtype, device=device) for _ in range(2 * c.n_layer)]
    return (ids, pos, seqlens, total, *kv)


def _name_cache_dims(path: Path, n_layer: int) -> None:
    """Give the caches' slot axis one name on inputs and outputs (the exporter names them apart)."""
    proto = onnx.load(str(path), load_external_data=False)
    values = list(proto.graph.input) + list(proto.graph.output)
    for v in values:
        if v.name.startswith(("past_key_values.", "present.")):
            dim = v.type.tensor_type.shape.dim[2]
            dim.Clear()
            dim.dim_param = MAX_CACHE_DIM
    onnx.save(proto, str(path))


def export_serving_onnx(model: GPT, path: str | Path, *, dtype: str = "fp32") -> dict[str, Any]:
    """Write ``model`` as the serving graph to ``path``; returns facts for the manifest."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    path = Path(path)
    n_layer = model.config.n_layer
    torch_dtype = DTYPES[dtype]
    wrapper = ServingDecoder(model).eval().to(torch_dtype)
    device = next(model.parameters()).device
    args = _example_inputs(model, torch_dtype, device)
    batch, seq, slots = Dim("batch"), Dim("sequence_length"), Dim("max_cache_len")
    cache = {0: batch, 2: slots}
    dynamic_shapes = ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch}, {},
                      tuple(cache for _ in range(2 * n_layer)))
    trace(wrapper, args, path, input_names=serving_input_names(n_layer), output_names=output_names(n_layer),
          opset=SERVING_OPSET, dynamic_shapes=dynamic_shapes)
    _name_cache_dims(path, n_layer)
    return {"file": path.name, "opset": SERVING_OPSET, "dtype": dtype, **graph_facts(path)}


def verify_serving(model: GPT, serving_path: str | Path, *, config: dict[str, Any], requests: int = 6,
                   max_new: int = 24, chunk: int = 5, seed: int = 0, dtype: str = "fp32") -> dict[str, Any]:
    """Run the serving graph the way the engine does and compare it with PyTorch, token for token.

    Through the real ``nextoken.export.runtime.Runner`` (the engine's own cache and binding code):
    requests of different lengths join at different steps into free slots of a 3-slot cache,
    prompts longer than ``chunk`` are prefilled in chunks while other rows decode, rows leave when
    done and their slots are reused. Each request decodes greedily from its own logits; afterwards
    one PyTorch forward over each request's whole sequence (no cache) gives the reference logits
    at every position. Reported: max |delta logit| over every prompt and generated position, and
    whether every greedy token equals PyTorch's argmax there.
    """
    import numpy as np

    from nextoken.export.artifact import Artifact
    from nextoken.export.runtime import Runner

    model = model.float().cpu().eval()
    c = model.config
    rng = np.random.default_rng(seed)
    max_new = max(1, min(max_new, c.block_size // 2))
    longest = max(2, min(3 * chunk, c.block_size - max_new))
    lengths = [longest, 1, max(1, longest // 2), chunk + 1, 2, max(1, longest - 1)][:requests]
    prompts = [rng.integers(0, c.vocab_size, n).tolist() for n in lengths]
    joins = [0, 0, 1, 3, 4, 6][:requests]  # the step at which each request arrives
    art = Artifact(Path(serving_path).parent, config, {}, {})
    # A cache as long as the longest request, not the context (3 x 75 MB at GPT-2 small's 1024).
    runner = Runner(art, max_slots=3, max_len=min(c.block_size, longest + max_new + 1), threads=1)

    free = [0, 1, 2]
    active: dict[int, dict[str, Any]] = {}  # slot -> request state
    done: list[dict[str, Any]] = []
    lengths_now = np.zeros(3, dtype=np.int64)
    step, waiting = 0, list(range(len(prompts)))
    while waiting or active:
        while waiting and joins[waiting[0]] <= step and free:
            r = waiting.pop(0)
            slot = free.pop(0)
            active[slot] = {"prompt": prompts[r], "done_prompt": 0, "tokens": [], "logits": []}
            lengths_now[slot] = 0
        # one prefill chunk per step (the engine's token budget, in miniature)
        for slot, a in active.items():
            if a["done_prompt"] < len(a["prompt"]):
                start = a["done_prompt"]
                part = a["prompt"][start:start + chunk]
                logits = runner.prefill(slot, part, start)  # (T, V)
                a["logits"] += list(logits)
                a["done_prompt"] += len(part)
                lengths_now[slot] = a["done_prompt"]
                if a["done_prompt"] == len(a["prompt"]):
                    a["tokens"].append(int(logits[-1].argmax()))
                break
        dec = [s for s, a in active.items() if a["done_prompt"] == len(a["prompt"]) and a["tokens"]
               and len(a["tokens"]) < max_new]
        if dec:
            slots = np.asarray(sorted(dec), dtype=np.int64)
            toks = np.asarray([active[s]["tokens"][-1] for s in slots], dtype=np.int64)
            pos = lengths_now[slots].copy()
            logits = runner.decode(slots, toks, pos, lengths_now)  # (n, V)
            for i, s in enumerate(slots):
                active[s]["logits"].append(logits[i])
                active[s]["tokens"].append(int(logits[i].argmax()))
                lengths_now[s] += 1
        for s in [s for s, a in active.items() if len(a["tokens"]) >= max_new]:
            done.append(active.pop(s))
            free.append(s)
        step += 1

    max_diff, agree, total = 0.0, 0, 0
    with torch.no_grad():
        for a in done:
            seq = a["prompt"] + a["tokens"][:-1]  # every position whose logits the runner produced
            ref = model(torch.tensor([seq]))[0][0].float().numpy()  # (len(seq), V)
            got = np.stack(a["logits"])
            max_diff = max(max_diff, float(np.abs(got - ref).max()))
            n_prompt = len(a["prompt"])
            want = ref[n_prompt - 1:].argmax(-1)  # PyTorch's greedy choice after each step
            agree += int((want == np.asarray(a["tokens"])).sum())
            total += len(a["tokens"])
    tolerance = 1e-4 if dtype == "fp32" else 5e-2
    return {"requests": len(done), "chunk": chunk, "slots": 3, "max_abs_diff": max_diff, "greedy_tokens": total,
            "greedy_identical_tokens": agree, "tolerance": tolerance,
            "passed": agree == total and max_diff <= tolerance}
