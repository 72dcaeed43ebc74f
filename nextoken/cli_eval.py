"""`nextoken eval RUN_OR_ARTIFACT --data FILES`: loss, perplexity and bits per byte on held-out text.

The windows are lm-evaluation-harness's ``loglikelihood_rolling`` ones (see
``nextoken.evaluate``), so the figures compare with lm-eval's for the same tokenizer and
window. An artifact is scored with ONNX Runtime alone; a run folder with its PyTorch checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from nextoken.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="RUN_OR_ARTIFACT",
                        help="an artifact folder (ONNX Runtime, no PyTorch) or a run folder (PyTorch)")
    parser.add_argument("--data", nargs="+", required=True, metavar="PATH",
                        help="held-out text: files, folders or globs; each file is one document, each line of a "
                             ".jsonl file one document")
    parser.add_argument("--text-field", default="text", help="field holding the text in .jsonl files (default: text)")
    parser.add_argument("--window", type=int, default=None,
                        help="input tokens per window (default: the model's context). lm-eval's hf backend with "
                             "max_length=W and its local-completions backend with max_length=W+2 use the same windows")
    parser.add_argument("--checkpoint", default=None,
                        help="for a run folder: best (default), latest, a step, or a checkpoint folder")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the forward passes (default: 1)")
    parser.add_argument("--reference", default=None, metavar="RUN_OR_ARTIFACT",
                        help="also score this model (e.g. the fp32 run or artifact a quantised one came from) on the "
                             "same documents and windows, and report the cost against it: the perplexity increase")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")


def run(args: argparse.Namespace) -> int:
    from nextoken.evaluate import evaluate_texts, iter_documents, make_scorer
    from nextoken.train.sources import expand_paths

    if args.batch_size < 1:
        raise UserError(f"must be >= 1, got {args.batch_size}", flag="--batch-size")
    if args.threads < 1:
        raise UserError(f"must be >= 1, got {args.threads}", flag="--threads")
    files = expand_paths(args.data)  # every file, whatever its suffix: each is one document
    scorer = make_scorer(args.model, args.checkpoint, args.threads)
    window = scorer.context if args.window is None else args.window
    if not 1 <= window <= scorer.context:
        raise UserError(f"must be in [1, {scorer.context}] (the model's context), got {window}", flag="--window")
    from tqdm import tqdm

    def score(s: Any) -> Any:
        # documents scored so far, on stderr (tqdm hides itself when stderr is not a terminal)
        with tqdm(desc="scoring", unit="doc", disable=None, file=sys.stderr) as bar:
            return evaluate_texts(s.forward, s.encode, iter_documents(files, args.text_field),
                                  prefix_token=s.eos_token_id, window=window, batch_size=args.batch_size,
                                  progress=lambda _n: bar.update(1))

    res = score(scorer)
    figures = res.to_dict()
    figures.pop("doc_logprobs")
    reference = None
    if args.reference is not None:
        ref_scorer = make_scorer(args.reference, None, args.threads)
        if ref_scorer.encode("the cat sat on the mat\n") != scorer.encode("the cat sat on the mat\n"):
            raise UserError("the reference tokenizes text differently; compare models of one run", flag="--reference")
        if window > ref_scorer.context:
            raise UserError(f"the reference's context is {ref_scorer.context}, shorter than --window {window}",
                            flag="--reference")
        ref = score(ref_scorer)
        reference = {"model": str(args.reference), "description": ref_scorer.description, "loss": ref.loss,
                     "perplexity": ref.perplexity, "bits_per_byte": ref.bits_per_byte,
                     "perplexity_increase": res.perplexity / ref.perplexity - 1.0, "loss_increase": res.loss - ref.loss}
    recorded = scorer.quantization
    if args.json:
        extra = {"reference": reference} if reference else {}
        if recorded:
            extra["quantization_at_export"] = recorded
        print(json.dumps({"model": str(args.model), "source": scorer.source, **figures, **extra}))
        return 0
    print(f"{scorer.description}; {res.documents} document(s), {res.tokens:,} tokens, {res.bytes:,} bytes, "
          f"{res.windows} window(s) of up to {window} tokens")
    rows = [("loss (nats/token)", f"{res.loss:.6f}"), ("perplexity", f"{res.perplexity:.4f}"),
            ("bits per byte", f"{res.bits_per_byte:.6f}"), ("byte perplexity", f"{res.byte_perplexity:.6f}"),
            ("word perplexity", f"{res.word_perplexity:.4f}")]
    for name, value in rows:
        print(f"{name:<20}{value:>16}")
    if reference:
        print(f"against {reference['description']}: perplexity {reference['perplexity']:.4f} -> {res.perplexity:.4f} "
              f"({reference['perplexity_increase']:+.2%}), loss {reference['loss_increase']:+.5f} nats/token")
    if recorded:
        print(f"recorded at export ({recorded.get('scheme', '?')} vs its fp32 graphs, "
              f"{recorded.get('perplexity_tokens', 0)} validation tokens): perplexity "
              + (f"{recorded['perplexity_fp32']:.4f} -> {recorded['perplexity']:.4f} "
                 f"({recorded['perplexity_increase']:+.2%})" if recorded.get("perplexity") else "not measured")
              + f", mean KL {recorded['merged']['mean_kl']:.2e} nats/token")
    return 0
