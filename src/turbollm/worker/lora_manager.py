"""LoRAManager: which adapters are loaded (an LRU in memory) and which sit in the model's slots.

Two levels, as in vLLM and S-LoRA:
- in memory: up to max_cpu_loras parsed adapters (loader/peft_adapter.py), least recently used
  dropped first; one asked for again after that is read from its directory again;
- in the model: max_loras slots per targeted linear layer (layers/lora.py). Each step, the
  adapters its requests name are put in slots (the scheduler never schedules more than
  max_loras distinct ones), evicting the slot least recently used by a step.

The slot rank is max_lora_rank when set (larger adapters are refused), else the largest rank
loaded so far: a larger adapter grows every slot, in place, between steps.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from turbollm.config import LoRAConfig
from turbollm.core.lora_request import LoRARequest
from turbollm.layers.linear import LinearBase, MergedLinear, QKVLinear, UnquantizedLinearMethod
from turbollm.layers.lora import LinearLoRA, LoRAContext, LoRAStep
from turbollm.loader.errors import CheckpointError
from turbollm.loader.peft_adapter import PeftAdapter, load_peft_adapter
from turbollm.model_arch import ModelArch
from turbollm.models.llama import FUSED_SHARDS

log = logging.getLogger(__name__)

# HF module name -> (our linear's path in a decoder layer, its shard id there)
_MODULE_PLACE = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}


def _place(module: str) -> tuple[str, object]:
    """(attribute path of the linear inside a decoder layer, shard id) of an HF module."""
    fused, shard = FUSED_SHARDS.get(module, (module, None))
    return f"{_MODULE_PLACE[module]}.{fused}", shard


def _shard_ids(layer: LinearBase) -> list:
    if isinstance(layer, QKVLinear):
        return ["q", "k", "v"]
    if isinstance(layer, MergedLinear):
        return list(range(len(layer.out_sizes)))
    return [None]


def _slot_dtype(lora_dtype: str, model: torch.nn.Module, device: torch.device) -> torch.dtype:
    """The factors' dtype (LoRAConfig.lora_dtype; see its help for `auto`)."""
    if lora_dtype != "auto":
        return getattr(torch, lora_dtype)
    quantized = any(isinstance(m, LinearBase) and
                    not isinstance(m.quant_method, UnquantizedLinearMethod)
                    for m in model.model.layers.modules())
    if quantized and device.type == "cpu":
        return torch.bfloat16
    return model.model.compute_dtype


class LoRAManager:
    """Adapters of one model (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, arch: ModelArch, config: LoRAConfig,
                 device: str):
        self.model, self.arch, self.config = model, arch, config
        self.device = torch.device(device)
        self.dtype = _slot_dtype(config.lora_dtype, model, self.device)
        self.context = LoRAContext()
        model.model.lora_context = self.context
        self.rank = config.max_lora_rank or 0  # 0 until the first adapter sets it
        self._loaded: OrderedDict[int, PeftAdapter] = OrderedDict()  # id -> adapter, LRU order
        self._requests: dict[int, LoRARequest] = {}  # id -> how to load it again
        # Adapters that unfinished requests use (the engine's, as of its last add): kept in
        # memory whatever max_cpu_loras says, so no request's step reads its adapter again
        self._pinned: frozenset[int] = frozenset()
        self._slot_owner: list[int | None] = [None] * config.max_loras
        self._slot_last_used = [0] * config.max_loras  # step counter of the last use
        self._steps = 0
        self.num_loads = 0  # reads of an adapter directory here (tests check reloads)

    # ----- memory level -----
    def add(self, req: LoRARequest, adapter: PeftAdapter | None = None,
            pinned: frozenset[int] | None = None) -> PeftAdapter:
        """Load (or find loaded) the adapter; raises a one-line ValueError if it cannot be
        served. `adapter`: its files as read already (off the engine thread), not read again.
        `pinned`: the adapters of the engine's unfinished requests, this one included."""
        if pinned is not None:
            self._pinned = frozenset(pinned) | {req.lora_int_id}
        known = self._requests.get(req.lora_int_id)
        if known is not None and known != req:
            raise ValueError(f"LoRA id {req.lora_int_id} is already {known.lora_name!r} "
                             f"({known.lora_path}); give {req.lora_name!r} another id")
        loaded = self._loaded.get(req.lora_int_id)
        if loaded is not None:
            self._loaded.move_to_end(req.lora_int_id)
            self._trim()  # (adapters whose requests finished may leave now)
            return loaded
        if adapter is None:
            adapter = load_peft_adapter(req.lora_path, self.arch)
            self.num_loads += 1
        cap = self.config.max_lora_rank
        if cap is not None and adapter.rank > cap:
            raise CheckpointError(req.lora_path, f"LoRA rank {adapter.rank} is above "
                                                 f"max_lora_rank {cap}")
        self._requests[req.lora_int_id] = req
        self._loaded[req.lora_int_id] = adapter
        self._trim(keep=req.lora_int_id)
        return adapter

    def _trim(self, keep: int | None = None) -> None:
        """Drop least recently used adapters beyond max_cpu_loras, never one in a slot, one
        an unfinished request uses (pinned), nor `keep` (about to go into a slot)."""
        while len(self._loaded) > self.config.max_cpu_loras:
            evict = next((i for i in self._loaded if i not in self._slot_owner
                          and i not in self._pinned and i != keep), None)
            if evict is None:
                break  # the rest sit in slots or are pinned: kept until that ends
            del self._loaded[evict]
            log.info("LoRA %s evicted from memory (max_cpu_loras %d)",
                     self._requests[evict].lora_name, self.config.max_cpu_loras)

    def remove(self, lora_id: int) -> bool:
        """Forget an adapter (memory and slot); False if it was not loaded."""
        known = self._requests.pop(lora_id, None)
        self._loaded.pop(lora_id, None)
        if lora_id in self._slot_owner:
            slot = self._slot_owner.index(lora_id)
            self._slot_owner[slot] = None
            for lin in self._linears():
                if lin.lora is not None:
                    lin.lora.clear_slot(slot)
        return known is not None

    def loaded_ids(self) -> list[int]:
        return list(self._loaded)

    # ----- slot level -----
    def slots_for(self, loras: list[LoRARequest | None]) -> list[int]:
        """The slot of each request's adapter (-1: the base model), loading into slots what is
        not there yet."""
        self._steps += 1
        needed = list(dict.fromkeys(r.lora_int_id for r in loras if r is not None))
        if len(needed) > len(self._slot_owner):
            raise RuntimeError(f"a step with {len(needed)} adapters; max_loras is "
                               f"{len(self._slot_owner)}")
        by_id = {r.lora_int_id: r for r in loras if r is not None}
        for lora_id in needed:
            if lora_id not in self._slot_owner:
                self._install(self._free_slot(needed), by_id[lora_id])
            self._slot_last_used[self._slot_owner.index(lora_id)] = self._steps
        return [-1 if r is None else self._slot_owner.index(r.lora_int_id) for r in loras]

    def _free_slot(self, needed: list[int]) -> int:
        """An empty slot, else the one least recently used by a step that this step needs not."""
        candidates = [s for s, owner in enumerate(self._slot_owner) if owner not in needed]
        empty = [s for s in candidates if self._slot_owner[s] is None]
        if empty:
            return empty[0]
        return min(candidates, key=lambda s: self._slot_last_used[s])

    def _install(self, slot: int, req: LoRARequest) -> None:
        adapter = self.add(req)  # reloads it if the memory LRU dropped it
        if adapter.rank > self.rank:
            log.info("LoRA slot rank grows from %d to %d (adapter %s)", self.rank, adapter.rank,
                     req.lora_name)
            self.rank = adapter.rank
            for lin in self._linears():
                if lin.lora is not None:
                    lin.lora.grow(self.rank)
        targets: dict[tuple[int, str], dict] = {}  # (layer, linear path) -> shard -> (a, b)
        for (i, module), ab in adapter.weights.items():
            path, shard = _place(module)
            targets.setdefault((i, path), {})[shard] = ab
        layers = self.model.model.layers
        for (i, path), shards in targets.items():
            lin = layers[i].get_submodule(path)
            if lin.lora is None:
                lin.lora = LinearLoRA(lin, _shard_ids(lin), len(self._slot_owner), self.rank,
                                      self.context, self.dtype, self.device)
        for i, layer in enumerate(layers):
            for path in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                         "mlp.down_proj"):
                lin = layer.get_submodule(path)
                if lin.lora is None:
                    continue
                shards = targets.get((i, path), {})
                for sid in lin.lora.shard_ids:
                    a, b = shards.get(sid, (None, None))
                    lin.lora.set_shard(slot, sid, a, b)
        self._slot_owner[slot] = req.lora_int_id
        self._trim()  # the adapter this one replaced may now leave memory

    def _linears(self):
        return (m for m in self.model.model.layers.modules() if isinstance(m, LinearBase))

    # ----- one forward pass -----
    def begin_step(self, spans: list[tuple[int, int, int]]) -> None:
        """Rows of the coming forward pass per slot: (first row, rows, slot) per chunk."""
        self.context.step = LoRAStep.from_spans(spans, self.device)

    def end_step(self) -> None:
        self.context.step = None
