"""Export a GPT to ONE merged ONNX graph that does both prefill and KV-cache decode.

The graph contract (the serving engine and onnxruntime-genai rely on it; names follow
Hugging Face Optimum)::

    inputs
      input_ids                 int64   (batch, sequence_length)
      attention_mask            int64   (batch, total_sequence_length)   1 = real token, 0 = padding
      position_ids              int64   (batch, sequence_length)
      past_key_values.{i}.key   float   (batch, n_kv_head, past_sequence_length, head_dim)   i = 0 .. n_layer-1
      past_key_values.{i}.value float   (batch, n_kv_head, past_sequence_length, head_dim)
    outputs
      logits                    float32 (batch, sequence_length, vocab_size)
      present.{i}.key           float   (batch, n_kv_head, total_sequence_length, head_dim)
      present.{i}.value         float   (batch, n_kv_head, total_sequence_length, head_dim)

    total_sequence_length = past_sequence_length + sequence_length

* batch, sequence_length and past_sequence_length are dynamic; past_sequence_length may be 0
  (prefill: feed (batch, n_kv_head, 0, head_dim) empty caches) and the same graph decodes.
* n_kv_head is n_head, but fewer for grouped-query attention (the llama family): config.json's
  ``n_kv_head`` (``num_key_value_heads``), as Optimum and onnxruntime-genai expect.
* "float" is float32, or float16 for ``dtype="fp16"`` (a CUDA export); ``logits`` are always
  float32 so samplers never see half precision.
* Rows are LEFT-padded: a batch of prompts of different lengths is right-aligned, so every
  row's newest token sits in the last slot and one decode step appends one slot to all rows.
* ``attention_mask`` covers every cache slot, past and new (length past + seq). Slot j is
  visible to the query in slot s when j <= s and mask[j] == 1; each query also always sees
  its own slot, so a padded query row is never fully masked (ONNX Runtime gives NaN there;
  its output is garbage nobody reads). Padding slots stay in the cache and stay masked; the
  token id under a padding slot may be any valid id (nextoken uses ``pad_token_id`` = eos).
* ``position_ids`` = cumsum(attention_mask) - 1, clamped at 0, taken over the last
  ``sequence_length`` slots: each row counts positions from its own first real token.
  Positions must stay below ``n_positions`` (config.json); the graph does not check.
* ``present`` = past concatenated with the new keys/values along the slot axis; feed it back
  as the next step's past.

This module ignores tokenization, sampling and the artifact folder (see ``artifact.py``,
``cli.py``; from the contract it takes only the cache tensors' names); it turns a ``GPT`` into
``model.onnx`` and nothing else. ``Traced``, ``trace`` and ``graph_facts`` serve ``serving.py``
too, which traces the other graph the same way.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.nn as nn
from torch.export import Dim

from nextoken.export.artifact import cache_names
from nextoken.train.model import GPT

DEFAULT_OPSET = 23  # native Attention op: fewest nodes and the fastest CPU decode measured here
MIN_OPSET = 18
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
TOTAL_DIM = "total_sequence_length"
# Weights at least this large are written as external data (``path.data`` beside the graph) tensor by
# tensor, so the export never holds a serialised copy of them, and the graph file itself stays small
# enough to be reloaded and edited cheaply (issue 22: 1.96 GB peak RSS for 91M parameters before).
EXTERNAL_DATA_BYTES = 256 << 20


def input_names(n_layer: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids"] + cache_names("past_key_values", n_layer)


def output_names(n_layer: int) -> list[str]:
    """The outputs of both graphs (``serving.py``'s too): logits, then the caches."""
    return ["logits"] + cache_names("present", n_layer)


class Traced(nn.Module):
    """A GPT behind a traced function of flat positional tensors (ONNX has no tuples); both graphs' base."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model


class MergedDecoder(Traced):
    """The merged graph's function: Optimum's inputs, the model's own cached forward."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past_key_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        past = [(past_key_values[2 * i], past_key_values[2 * i + 1]) for i in range(len(past_key_values) // 2)]
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past, use_cache=True)
        presents = [t for kv in out.present_key_values for t in kv]  # each (B, n_kv_head, past+T, hs)
        return (out.logits.float(), *presents)  # logits (B, T, vocab)


def example_inputs(model: GPT, batch: int = 2, seq: int = 3, past: int = 4,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> tuple[torch.Tensor, ...]:
    """Inputs for tracing. Sizes of 0 or 1 would be specialised by torch.export, so all are >= 2."""
    c = model.config
    ids = torch.randint(0, c.vocab_size, (batch, seq), device=device)  # (B, T)
    mask = torch.ones(batch, past + seq, dtype=torch.long, device=device)  # (B, past+T)
    pos = torch.arange(past, past + seq, device=device)[None].expand(batch, seq).contiguous()  # (B, T)
    kv = [torch.zeros(batch, c.n_kv_head, past, c.head_dim, dtype=dtype, device=device) for _ in range(2 * c.n_layer)]
    return (ids, mask, pos, *kv)


def _rename_total_dim(path: Path, n_layer: int) -> None:
    """Name attention_mask's length (exported as Dim.AUTO, so anonymous) and the presents' slot axis."""
    proto = onnx.load(str(path), load_external_data=False)
    values = {v.name: v for v in list(proto.graph.input) + list(proto.graph.output)}
    targets = [("attention_mask", 1)] + [(name, 2) for name in cache_names("present", n_layer)]
    for name, axis in targets:
        dim = values[name].type.tensor_type.shape.dim[axis]
        dim.Clear()
        dim.dim_param = TOTAL_DIM
    onnx.save(proto, str(path))  # external tensors keep their locations; only the graph file is rewritten


def export_onnx(model: GPT, path: str | Path, *, opset: int = DEFAULT_OPSET, dtype: str = "fp32") -> dict[str, Any]:
    """Write ``model`` as the merged graph to ``path`` (``path.data`` beside it from ``EXTERNAL_DATA_BYTES``).

    Returns facts about the graph for the manifest: opset, dtype, node count, op types.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET}, got {opset}")
    path = Path(path)
    n_layer = model.config.n_layer
    torch_dtype = DTYPES[dtype]
    wrapper = MergedDecoder(model).eval().to(torch_dtype)
    device = next(model.parameters()).device
    args = example_inputs(model, dtype=torch_dtype, device=device)
    batch, seq = Dim("batch"), Dim("sequence_length")
    past = Dim("past_sequence_length", min=0)
    cache_shape = {0: batch, 2: past}
    dynamic_shapes = ({0: batch, 1: seq}, {0: batch, 1: Dim.AUTO}, {0: batch, 1: seq},
                      tuple(cache_shape for _ in range(2 * n_layer)))
    trace(wrapper, args, path, input_names=input_names(n_layer), output_names=output_names(n_layer), opset=opset,
          dynamic_shapes=dynamic_shapes)
    _rename_total_dim(path, n_layer)
    return {"opset": opset, "dtype": dtype, **graph_facts(path)}


def trace(wrapper: Traced, args: tuple[torch.Tensor, ...], path: Path, *, input_names: list[str],
          output_names: list[str], opset: int, dynamic_shapes: tuple[Any, ...]) -> None:
    """Export ``wrapper`` with torch.export (dynamo) to ``path`` (``path.data`` beside it: ``EXTERNAL_DATA_BYTES``)."""
    # Known-harmless exporter chatter, silenced by message so anything new still shows: shared
    # Dim objects are reported as "will not be used", a pytree deprecation, absent torchvision ops.
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    log_level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*The axis name: .* will not be used")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            program = torch.onnx.export(wrapper, args, None, input_names=input_names, output_names=output_names,
                                        opset_version=opset, dynamo=True, dynamic_shapes=dynamic_shapes,
                                        optimize=True, verbose=False)
    finally:
        registration_log.setLevel(log_level)
    weights = sum(p.numel() * p.element_size() for p in wrapper.parameters())
    program.save(str(path), external_data=weights >= EXTERNAL_DATA_BYTES)  # and by itself above 2 GB


def graph_facts(path: Path) -> dict[str, Any]:
    """What the manifest records about a written graph: node count, op types, external data."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return {"nodes": len(graph.node), "op_types": sorted({n.op_type for n in graph.node}),
            "external_data": path.with_name(path.name + ".data").exists()}

