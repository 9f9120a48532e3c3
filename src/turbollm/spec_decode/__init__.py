"""Speculative decoding: cheap proposals (n-gram lookup, a draft model) verified by the target
model in one forward pass, with the standard accept/resample rule so outputs keep the target's
distribution exactly (and greedy outputs equal plain decoding)."""
