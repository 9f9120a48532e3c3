"""Executors: how the engine reaches its workers (one in-process worker today; worker
processes for tensor and pipeline parallelism plug in here)."""
