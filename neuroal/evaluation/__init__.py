"""Perplexity and lm-eval zero-shot tasks on the model in memory.

``evaluate`` (in ``neuroal.evaluation.evaluate``) runs both for ``neuroal eval``; it is not imported
here because lm-eval takes seconds to import.
"""

from neuroal.evaluation.perplexity import eval_windows, perplexity

__all__ = ["perplexity", "eval_windows"]
