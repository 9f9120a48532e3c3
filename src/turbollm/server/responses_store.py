"""Stored responses for `previous_response_id` and GET/DELETE /v1/responses/{id}: in memory,
bounded in count (least recently used goes first) and in age (a time to live).

Each entry keeps only its own turn (the new input messages and the answer) and a link to the
response it followed; a chain is rebuilt by walking the links, so a 100-turn conversation costs
100 turns of memory, not 100 copies of a growing history. Following a chain touches every link,
so a conversation in use keeps all of its turns.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class StoredResponse:
    response: dict  # the Response object as returned
    turn: list[dict]  # chat messages: this request's input, then the answer
    previous_id: str | None


class ResponseStore:
    def __init__(self, max_entries: int, ttl_seconds: float, clock=time.monotonic):
        self.max_entries = max_entries
        self.ttl = ttl_seconds
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, StoredResponse]] = OrderedDict()
        self._lock = threading.Lock()  # handlers run on the event loop; tests call from threads

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response_id: str, entry: StoredResponse) -> None:
        if self.max_entries == 0:
            return
        with self._lock:
            self._entries[response_id] = (self._clock(), entry)
            self._entries.move_to_end(response_id)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            item = self._entries.get(response_id)
            if item is None:
                return None
            stored_at, entry = item
            if self._clock() - stored_at > self.ttl:
                del self._entries[response_id]
                return None
            self._entries.move_to_end(response_id)
            return entry

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._entries.pop(response_id, None) is not None

    def history(self, response_id: str) -> list[dict] | None:
        """The conversation up to and including `response_id`'s answer, oldest turn first;
        None if it or a response before it is gone."""
        turns = []
        seen = set()
        rid: str | None = response_id
        while rid is not None:
            entry = self.get(rid)
            if entry is None or rid in seen:
                return None
            seen.add(rid)
            turns.append(entry.turn)
            rid = entry.previous_id
        return [m for turn in reversed(turns) for m in turn]
