"""Evaluation: perplexity and capacity (:mod:`.perplexity`), stock lm-eval tasks with the capacity per task
(:mod:`.harness`, needs the ``eval`` extra), the static Attention-Drop baseline (:mod:`.attention_drop`), whether
trained routing is dynamic (:mod:`.routing`) and how much per-sequence routing could gain over a static drop at
all (:mod:`.headroom`).

Import the submodules directly; this package imports none of them, so ``lm_eval`` loads only when used.
"""
