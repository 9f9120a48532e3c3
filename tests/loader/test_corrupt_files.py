"""Corrupt, truncated, empty and absurd model files give one clear CheckpointError (file, what,
where) — from the readers, from LLM(...) and from the CLI (one line, exit 2) — never another
exception, and nothing is sized by a count the file cannot hold. The GGUF reader is fuzzed."""
from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from turbollm import LLM
from turbollm.loader.errors import CheckpointError
from turbollm.loader.gguf_file import GGUFFile


def small_gguf(path) -> bytes:
    """A valid little GGUF: some metadata of every kind and three tensors."""
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("test.u32", 7)
    w.add_float32("test.f32", 0.5)
    w.add_string("test.str", "hello")
    w.add_array("test.ints", [1, 2, 3])
    w.add_array("test.strs", ["a", "bc"])
    w.add_tensor("a.weight", np.arange(64, dtype=np.float32).reshape(8, 8))
    w.add_tensor("b.weight", np.ones((4, 32), dtype=np.float16))
    w.add_tensor("c.bias", np.zeros(16, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("gguf") / "good.gguf"
    data = small_gguf(path)
    parsed = GGUFFile(path)  # the unmutated file reads, with every entry
    assert set(parsed.tensors) == {"a.weight", "b.weight", "c.bias"}
    assert parsed.metadata["test.strs"] == ["a", "bc"]
    return data


def _read(tmp_path, data: bytes) -> None:
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(data)
    try:
        GGUFFile(path)
    except CheckpointError as e:
        assert str(path) in str(e) and e.what


FUZZ = settings(max_examples=1500, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(cut=st.integers(min_value=0, max_value=4000))
def test_truncated_anywhere(good, tmp_path, cut):
    _read(tmp_path, good[:cut])


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), min_size=1,
                      max_size=6))
def test_bytes_changed_anywhere(good, tmp_path, edits):
    data = bytearray(good)
    for at, value in edits:
        data[at % len(data)] = value
    _read(tmp_path, bytes(data))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from([8, 16]), value=st.sampled_from([2**63, 2**40, 10**9, 10**6]))
def test_absurd_counts_are_refused_before_anything_is_sized_by_them(good, tmp_path, field,
                                                                   value):
    data = bytearray(good)
    struct.pack_into("<Q", data, field, value)  # tensor count at 8, metadata count at 16
    path = tmp_path / "absurd.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="cannot fit|truncated"):
        GGUFFile(path)


def test_empty_truncated_and_garbage_files_through_llm(tmp_path, bundled_gguf):
    cases = {"empty.gguf": b"", "garbage.gguf": bytes(range(256)) * 4,
             "cut.gguf": bundled_gguf.read_bytes()[:300_000]}
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as e:
            LLM(str(path))
        assert str(path) in str(e.value)


def test_corrupt_safetensors_and_config(tmp_path, tiny_llama):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    shard = sorted(broken.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="safetensors"):
        LLM(str(broken), dtype="float32", kv_cache_memory="4MiB")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        LLM(str(broken), dtype="float32", kv_cache_memory="4MiB")


def test_the_cli_says_one_line_and_exits_2(tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00")
    done = subprocess.run([sys.executable, "-m", "turbollm.cli", "generate", "--model",
                           str(path), "--prompt", "hi"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "truncated" in lines[0]
