"""Ranks, groups and collectives of tensor/pipeline parallelism (torch.distributed plus a
shared-memory all-reduce for ranks on one host). Used by layers (all-reduce, all-gather), the
model (pipeline send/recv) and the worker processes (executor/worker_main.py)."""
