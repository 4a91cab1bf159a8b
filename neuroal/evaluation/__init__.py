"""Perplexity on the model in memory (zero-shot tasks through lm-eval arrive with issue 5)."""

from neuroal.evaluation.perplexity import perplexity, eval_windows

__all__ = ["perplexity", "eval_windows"]
