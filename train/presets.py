"""Named presets: partial ``TrainConfig`` overrides, and the training recipe the fast ones use.

Data only: ``settings.resolve_train_config`` applies a preset under the config file and the flags.
"""

from __future__ import annotations

from typing import Any

# The training recipe the two-minute presets use (benchmarks/bench_recipe.py; figures in
# benchmarks/RESULTS.md). At 1M tinyshakespeare tokens each change alone moved val loss from the
# GPT-2-style 1.819 by: Muon -0.163, rotary -0.024, ReLU^2 -0.010, zero-init -0.005, soft-cap
# +0.003, QK-norm +0.025, untied head +0.022; all together -0.187 (1.633), better than the three
# that helped alone together (1.646): QK-norm and soft-capping keep Muon's larger steps in check.
# Document masking is left off: the char corpus has no boundaries, and it was not measured on BPE.
RECIPE: dict[str, Any] = dict(optimizer="muon", pos_emb="rope", qk_norm=True, mlp_act="relu2", tie_embeddings=False,
                              zero_init=True, logit_softcap=15.0)

PRESETS: dict[str, dict[str, Any]] = {
    # nanoGPT's README CPU recipe for shakespeare_char, same shape and schedule.
    "nanogpt-cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, max_iters=2000,
                        lr_decay_iters=2000, dropout=0.0, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100,
                        beta2=0.99, weight_decay=0.1, eval_interval=250, eval_iters=20, tokenizer="char"),
    # The quickstart: a small BPE model on the built-in corpus, a couple of minutes on a laptop CPU,
    # with the training recipe (RECIPE above) and a decay that follows the clock.
    "quickstart": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16, max_iters=1200,
                       learning_rate=2e-3, min_lr=2e-4, warmup_iters=50, tokenizer="bpe", vocab_size=2048,
                       eval_interval=300, eval_iters=10, max_corpus_chars=6_000_000, max_time=150.0,
                       lr_schedule="time", **RECIPE),
    # Tuned for the lowest val loss in about two minutes on a 2-core CPU (tinyshakespeare, characters;
    # benchmarks/bench_preset.py, figures in benchmarks/RESULTS.md). nanoGPT's shape with a 5x learning
    # rate, a 50-step warmup and a cosine decay sized to the steps that fit: ~3800 steps at ~28 ms
    # (2 threads, quiet machine, ~27k tok/s) is ~110 s. Measured on 8 candidates: the learning rate
    # was the big lever (1e-3 -> 4e-3..6e-3: val 1.89 -> 1.71 in the same time); at equal time this shape
    # (768 tokens/step) beat a 96-wide model at 1536 tokens/step and a 128-context one at 2048; a
    # 128 context did not pay for its cost. max_time stops a run on a busy machine (before the decay ends).
    "shakespeare-char": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, max_iters=3800,
                             learning_rate=5e-3, min_lr=5e-4, warmup_iters=50, beta2=0.99,
                             weight_decay=0.1, dropout=0.0, tokenizer="char", eval_interval=950, eval_iters=20,
                             max_time=120.0, lr_schedule="time", **RECIPE),
    # GPT-2 small (124M) shape, for GPU runs.
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=16, tokens_per_step=524288,
                      learning_rate=6e-4, min_lr=6e-5, warmup_iters=700, max_iters=19073, weight_decay=0.1,
                      beta2=0.95, tokenizer="bpe", vocab_size=50257, dropout=0.0, eval_interval=250),
}
