"""Tools that make smaller or faster models from a base one: quantized checkpoints, pruning
(unstructured, N:M and structured: prune.py, structured.py), LoRA merge (more to come:
distillation). They run the engine (`LLM`), so they sit above it."""
