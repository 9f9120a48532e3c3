"""LoRARequest: which adapter a request runs with (plain data; vLLM's fields and order)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """An adapter by name, a positive integer id unique per adapter, and its PEFT directory.

    The worker loads `lora_path` the first time the id is seen (and again after its LRU cache
    dropped it); the id is what the engine, scheduler and prefix cache compare.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an integer >= 1, got {self.lora_int_id!r}")
        if not self.lora_name:
            raise ValueError("lora_name must not be empty")

    @property
    def cache_key(self) -> bytes:
        """What the prefix cache mixes into block hashes: KV computed under one adapter is never
        reused under another (nor under the same id pointing at another directory)."""
        return f"lora\0{self.lora_int_id}\0{self.lora_name}\0{self.lora_path}".encode()
