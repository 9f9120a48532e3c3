"""server/responses_store.py: count cap (least recently used first), time to live, chains."""
from __future__ import annotations

from turbollm.server.responses_store import ResponseStore, StoredResponse


def entry(name: str, previous: str | None = None) -> StoredResponse:
    return StoredResponse({"id": name}, [{"role": "user", "content": name}], previous)


def test_chain_is_rebuilt_oldest_first_and_a_missing_link_breaks_it():
    store = ResponseStore(10, 60)
    store.put("a", entry("a"))
    store.put("b", entry("b", "a"))
    store.put("c", entry("c", "b"))
    assert [m["content"] for m in store.history("c")] == ["a", "b", "c"]
    assert store.delete("b") and not store.delete("b")
    assert store.history("c") is None and store.history("a") is not None


def test_least_recently_used_goes_first_and_reading_keeps_an_entry():
    store = ResponseStore(2, 60)
    store.put("a", entry("a"))
    store.put("b", entry("b"))
    assert store.get("a") is not None  # a is now the most recent
    store.put("c", entry("c"))
    assert store.get("b") is None and store.get("a") is not None and len(store) == 2
    nothing = ResponseStore(0, 60)
    nothing.put("a", entry("a"))
    assert nothing.get("a") is None


def test_entries_expire():
    now = [0.0]
    store = ResponseStore(10, 30, clock=lambda: now[0])
    store.put("a", entry("a"))
    now[0] = 29.0
    assert store.get("a") is not None
    now[0] = 31.0
    assert store.get("a") is None and len(store) == 0
