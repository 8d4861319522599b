"""Evaluation: perplexity and capacity (:mod:`.perplexity`), stock lm-eval tasks with the capacity per task
(:mod:`.harness`, needs the ``eval`` extra), and the static Attention-Drop baseline (:mod:`.attention_drop`).

Import the submodules directly; this package imports none of them, so ``lm_eval`` loads only when used.
"""
