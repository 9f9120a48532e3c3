"""Fixtures shared by the quantization tests."""
import pytest

from turbollm.layers import prefill_gemm


@pytest.fixture
def multi_row_bf16():
    """prefill_dtype resolved to bf16 (the default on CPUs with bf16 instructions): packed
    products of several rows may take the AMX tiles or the lanes kernels."""
    old = prefill_gemm.in_bf16()
    prefill_gemm.use_bf16(True)
    yield
    prefill_gemm.use_bf16(old)
