"""decode_layers' word layout is defined once (csrc/decode_abi.h) and read from the library."""
import re
from pathlib import Path

import pytest

from turbollm.layers import native_ops
from turbollm.models import native_decode
from turbollm.native_build import RowKernel

pytestmark = pytest.mark.skipif(native_ops.lib() is None,
                                reason="no AVX2/FMA CPU or no C compiler")

SRC = Path(native_decode.__file__).parents[1]
DECODE_PY = (SRC / "models" / "native_decode.py").read_text()


def test_the_table_has_every_name_python_uses():
    abi = native_ops.decode_abi()
    used = set(re.findall(r"\babi\.([A-Z][A-Z0-9_]*)", DECODE_PY))
    used |= set(native_decode._EMBED_KINDS.values())
    used |= {RowKernel.LOWBIT, RowKernel.Q8, RowKernel.DENSE}
    assert used and used <= set(abi._fields)
    # every step word is set by name in the C path
    steps = {f for f in abi._fields if f.startswith("S_") and f != "S_WORDS"}
    assert steps <= used


def test_sizes_agree():
    abi = native_ops.decode_abi()
    steps = [getattr(abi, f) for f in abi._fields if f.startswith("S_") and f != "S_WORDS"]
    assert sorted(steps) == list(range(abi.S_WORDS))
    assert abi.LAYER_WORDS == 2 + 4 * abi.LIN_WORDS + 5 + 4
    row = [abi.L_NORM2, abi.L_NORM_NEXT, abi.L_K_CACHE, abi.L_V_CACHE, abi.L_K_SCALES,
           abi.L_V_SCALES, abi.L_CACHE_DTYPE, abi.L_LORA_QKV, abi.L_LORA_O, abi.L_LORA_GATE_UP,
           abi.L_LORA_DOWN]
    for at in (abi.L_QKV, abi.L_O, abi.L_GATE_UP, abi.L_DOWN):
        row += range(at, at + abi.LIN_WORDS)
    assert sorted(row) == list(range(abi.LAYER_WORDS))  # each word of a layer has one use
    assert sorted((abi.LIN_FN, abi.LIN_KIND, abi.LIN_ARGS)) == [0, 1, 2]
    lora = [abi.LORA_A, abi.LORA_B, abi.LORA_RANK, abi.LORA_SHARDS, abi.LORA_SPANS, abi.LORA_IN,
            abi.LORA_OUT, abi.LORA_KIND, abi.LORA_RANKS]
    assert sorted(lora) == list(range(abi.LORA_WORDS))
    assert abi.LIN_ARGS + 8 <= abi.LIN_WORDS  # the low-bit call's 8 bound arguments fit
    kinds = (abi.LIN_LOWBIT, abi.LIN_Q8, abi.LIN_DENSE)
    embeds = (abi.EMBED_F32, abi.EMBED_BF16, abi.EMBED_F16, abi.EMBED_NONE)
    assert len(set(kinds)) == 3 and len(set(embeds)) == 4


def test_no_hand_kept_copies_are_left():
    assert not re.search(r"^_?(LIN|LAYER|STEP)_WORDS\b|^_?EMBED_NONE\b", DECODE_PY, re.M)
    assert 'array.array("q", [' not in DECODE_PY  # the step is filled by name, not by order
    build = (SRC / "native_build.py").read_text()
    assert not re.search(r"LOWBIT, Q8, DENSE = \d", build)
    c = (SRC / "layers" / "csrc" / "cpu_ops.c").read_text()
    assert '#include "decode_abi.h"' in c
    assert not re.search(r"enum \{ *(S_H|LIN_LOWBIT|EMBED_F32)\b|#define (LIN|LAYER)_WORDS", c)


def test_the_table_is_read_only():
    abi = native_ops.decode_abi()
    with pytest.raises(AttributeError):
        abi.S_T = 0
    assert native_ops.decode_abi() is abi  # read once per process
