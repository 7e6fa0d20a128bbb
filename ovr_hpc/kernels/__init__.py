"""Fused kernels. ``fused_logprobs``: per-token log-probs (and entropy) of the LM head without [T, V] logits."""

from .logprob import fused_logprobs, logprobs_reference

__all__ = ["fused_logprobs", "logprobs_reference"]
