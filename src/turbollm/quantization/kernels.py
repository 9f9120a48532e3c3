"""Low-bit matmul kernels behind the int8/int4 linear methods, and the per-call path choice.

A kernel state holds the weight in the layout the kernels read (see csrc/lowbit.c):
- few rows (decode): the AVX2 kernels read the packed weight directly (0.5 / 1 byte per weight);
- many rows (prefill, big batches): the weight is widened to fp32 chunk by chunk into a reused
  scratch buffer and a dense fp32 GEMM runs on it — on CPUs without bf16/int8 matrix units that
  beats any low-bit kernel once the weight is reused by enough rows.
Activation rows of packed-kernel calls with up to MAX_ROWS_A16 rows (decode, small batches,
verifications) are by default rounded to int16 per 32 columns first, so the kernels use
integer dot products (llama.cpp rounds to int8, which changed greedy answers of the 135M model
here; 16 bits are ~256x finer); `exact_activations(True)` (`--exact-activations`,
KernelConfig) keeps them fp32. Without the C library (no AVX2 or no compiler) torch's own
kernels serve. States on a GPU are served by gpu_kernels (Triton).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from turbollm.layers import native_ops
from turbollm.layers import prefill_gemm as multi_row
from turbollm.native_build import RowKernel
from turbollm.quantization import native

# Rows up to which the packed-weight kernels serve; more rows widen the weight to fp32 in chunks
# and run a dense GEMM (ours up to native_ops.MAX_DENSE_ROWS rows, then torch's). Measured on the
# SmolLM2 shapes with 2 Zen3 threads: session 6, all 120 int4 linears at M = 48 rows, 104 ms
# packed vs 122 widened (torch GEMM); session 7, all 121 linears of the Q4_1 model (int4 + the
# int8 head) at M = 64 / 96 / 128: packed 216 / 276 / 361 ms, widened + C GEMM 206 / 288 / 362,
# widened + torch 341 / 399 / 457; once the packed fp32 path was tiled (lowbit.c dot_tile), at
# M = 64: packed 142, widened + C 156, widened + torch 208 (another run, same process).
# Packed up to 64 rows also lets the C decode path take 64-row steps.
MAX_ROWS_PACKED = {"int4": 64, "int8": 64}
_SCRATCH_FLOATS = 1 << 22  # 16 MiB of fp32 weight rows per widening chunk
# 32-column blocks of one activation row up to which the int16 path serves (K <= 131072; the
# kernels size their buffers from K, so this only keeps wider rows on the fp32 path as before)
_MAX_A16_BLOCKS = 4096
# Rows up to which int16 activations beat the fp32 packed kernel (q4_gemm / q8_gemm, which
# widen a few weight rows to fp32 and reuse them): all 120 int4 linears of SmolLM2, 2 Zen3
# threads, ms int16 / fp32 rows (session 6): M=9 25.7 / 28.1, M=16 31.4 / 42.2, M=32 68.8 / 80.3,
# M=48 104 / 129. Up to here a row gives the same bits whatever the batch (one kernel, one order).
MAX_ROWS_A16 = 48
_int16_activations = True  # KernelConfig.exact_activations turns it off (worker/worker.py)
# Row counts whose packed int4/int8 products take AMX tiles (csrc/lowbit_amx.h: exact codes,
# activations as two bf16 halves, fp32 group scales) where multi-row products may use AMX
# (layers/prefill_gemm.py's switch) and the amx build runs. One int4 linear of SmolLM2,
# 3072x576, 2 SPR threads, us int16 rows / tiles (session 16): M=1 33 / 140, M=4 110 / 142,
# M=8 278 / 149, M=16 503 / 161, M=64 1763 / 488; from ~128 rows torch's oneDNN bf16 GEMM on
# the widened weight is faster (M=256: 1.27 ms vs ~2 ms).
AMX_MIN_ROWS, AMX_MAX_ROWS = 8, 128
# Row counts whose packed int4/int8 products take the outputs-in-lanes kernels of AVX-512
# builds without AMX (csrc/lowbit_lanes.h) where rows need not keep their one-row bits. Zen 4,
# 2 threads (session 21, docs/bench/session21/lanes_speed.txt): one int4 linear of SmolLM2
# with its weights in cache, lanes 0.9-1.6x the row kernels at 4-8 rows, 1.5-2.7x at 16-128;
# whole decode steps, whose weights stream from memory: 4 rows 0.93x, 8 and 16 rows 1.5x:
# from 8. A prompt chunk of 128 tokens 1.45x faster than widened bf16
# (oneDNN), of 256 or 512 the same: up to 256.
LANES_MIN_ROWS, LANES_MAX_ROWS = 8, 256


def exact_activations(on: bool = True) -> None:
    """Keep few-row activations (up to MAX_ROWS_A16) in fp32 instead of int16 blocks."""
    global _int16_activations
    _int16_activations = not on


def dispatch_key() -> tuple:
    """The switches that change which kernel a row count gets (callers caching kernels key on it)."""
    return (_int16_activations, multi_row.in_bf16(), multi_row.is_row_invariant(),
            LANES_MIN_ROWS, LANES_MAX_ROWS)


def multi_row_kernels() -> str:
    """Which packed int4/int8 kernels serve products of several rows here, under the current
    switches (the start-up system line and `turbollm info` name it)."""
    if native.lib() is None:
        return "torch"
    if _tiles(AMX_MIN_ROWS, 32, 32):  # asked as a G = 32 product of the smallest row count
        return f"amx tiles {AMX_MIN_ROWS}-{AMX_MAX_ROWS} rows"
    if _lanes(LANES_MIN_ROWS, 32, 32):
        return f"lanes {LANES_MIN_ROWS}-{LANES_MAX_ROWS} rows"
    return "int16 row kernels"


def _tiles(M: int, k: int, group_size: int) -> bool:
    """Packed-kernel calls of M rows in AMX tiles (q4_gemm_amx / q8_gemm_amx)."""
    return (AMX_MIN_ROWS <= M <= AMX_MAX_ROWS and not multi_row.is_row_invariant() and k % 32 == 0
            and group_size % 32 == 0 and multi_row.in_bf16() and native.amx() is not None)


def _lanes(M: int, k: int, group_size: int) -> bool:
    """Packed-kernel calls of M rows through the outputs-in-lanes kernels (q4_gemm_lanes /
    q8_gemm_lanes), on AVX-512 CPUs without AMX (with AMX, the tiles and oneDNN's AMX GEMM
    serve these row counts). Their activations are int16 like the row kernels', summed in
    another order, so only where multi-row products may leave the row kernels' bits
    (layers/prefill_gemm.py's switch, as for the AMX tiles: prefill_dtype resolved to bf16,
    the default on CPUs with bf16 instructions; with dtype=bfloat16 or prefill_dtype=float32
    a model's greedy answers stay those of the row kernels on every CPU), never within
    row_invariant(), and not with exact_activations."""
    return (LANES_MIN_ROWS <= M <= LANES_MAX_ROWS and not multi_row.is_row_invariant()
            and multi_row.in_bf16() and _int16_activations and k % 32 == 0
            and group_size % 32 == 0 and k // 32 <= _MAX_A16_BLOCKS
            and native.lanes() is not None and native.amx() is None)


def _a16(M: int, k: int) -> bool:
    """Packed-kernel calls on int16-rounded activation rows. Row-invariant products
    (layers/prefill_gemm.row_invariant) take them at any row count: they alone sum every
    output in one order whatever M (the fp32 packed kernel, the tiles and the widened GEMM do
    not), so they override exact_activations there."""
    if multi_row.is_row_invariant():
        return k % 32 == 0 and k // 32 <= _MAX_A16_BLOCKS and native.lib() is not None
    return (_int16_activations and M <= MAX_ROWS_A16 and k % 32 == 0
            and k // 32 <= _MAX_A16_BLOCKS and native.lib() is not None)


def rounds_activations(x: torch.Tensor, group_size: int, kind: str = "int4") -> bool:
    """True when a packed kernel will see x [M, K] rounded to int16 (see int16_activations)."""
    M, k = x.shape
    if _tiles(M, k, group_size):
        return False
    return _lanes(M, k, group_size) or (
        (M <= MAX_ROWS_PACKED[kind] or multi_row.is_row_invariant()) and _a16(M, k)
        and group_size % 32 == 0)


def int16_activations(x: torch.Tensor) -> torch.Tensor:
    """The fp32 values the int16-activation kernels compute with: x rounded to int16 per 32
    columns with scale max|x| / 32767 (the reference for tests; the kernels do it in C)."""
    blocks = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, 32767.0 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inv) * (amax / 32767.0)).reshape(x.shape)


@dataclass
class Int4State:
    packed: torch.Tensor   # uint8 [out, in // 2]: per 32 columns, 16 bytes (lo: j, hi: j + 16)
    scales: torch.Tensor   # float16 [out, ceil(in / G)]
    offsets: torch.Tensor  # float16 [out, ceil(in / G)]: zeros (zero_form) or mins
    group_size: int
    zero_form: bool        # True: w = (q - offset) * scale; False: w = q * scale + offset
    fallback: dict = field(default_factory=dict)  # torch-kernel forms, built only when used

    def scale_min(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (scale, min) per group with w = q * scale + min."""
        s, f = self.scales.float(), self.offsets.float()
        return s, (-f * s if self.zero_form else f)


@dataclass
class Int8State:
    qweight: torch.Tensor  # int8 [out, in]
    scales: torch.Tensor   # float32 [out, in // G] (G = in: per output channel)
    group_size: int
    fallback: dict = field(default_factory=dict)


def state_to(state, device):
    """The state with its weight tensors on `device` (the layer's: GPU states take gpu_kernels)."""
    moved = {f.name: getattr(state, f.name).to(device) for f in dataclasses.fields(state)
             if isinstance(getattr(state, f.name), torch.Tensor)}
    return dataclasses.replace(state, fallback={}, **moved)


def _on_cpu(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def int4_pack(qweight, scales, zeros, group_size) -> Int4State:
    """Interchange (q, scale, zero) -> kernel state (scales and zeros kept as float16)."""
    return _pack(qweight, scales, zeros, group_size, zero_form=True)


def int4_pack_minform(qweight, scales, mins, group_size) -> Int4State:
    """(q, scale, min) with w = q * scale + min (GGUF Q4_1's own form) -> kernel state."""
    return _pack(qweight, scales, mins, group_size, zero_form=False)


def _pack(qweight, scales, offsets, group_size, zero_form) -> Int4State:
    n, k = qweight.shape
    q = qweight.to(torch.uint8).reshape(n, k // 32, 2, 16)
    packed = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
    return Int4State(packed, scales.to(torch.float16).contiguous(),
                     offsets.to(torch.float16).contiguous(), group_size, zero_form)


def int4_unpack_q(state: Int4State) -> torch.Tensor:
    n, half = state.packed.shape
    p = state.packed.reshape(n, half // 16, 1, 16)
    return torch.cat([p & 15, p >> 4], dim=2).reshape(n, half * 2)


def int4_unpack(state: Int4State):
    """Kernel state -> interchange (qweight, scales, zeros) in float32."""
    s, mn = state.scale_min()
    if state.zero_form:
        zeros = state.offsets.float()
    else:
        zeros = torch.where(s != 0, -mn / torch.where(s != 0, s, 1.0), 0.0)
    return int4_unpack_q(state), s, zeros


def int8_pack(qweight, scales, group_size: int | None = None) -> Int8State:
    k = qweight.shape[1]
    g = group_size or k
    return Int8State(qweight.contiguous(), scales.float().reshape(qweight.shape[0], k // g)
                     .contiguous(), g)


def int8_unpack(state: Int8State):
    """(qweight, per-channel scales [out]) for per-channel states; group scales otherwise."""
    s = state.scales
    return state.qweight, (s[:, 0] if s.shape[1] == 1 else s)


def int4_dequant_rows(state: Int4State, row0: int, row1: int, out=None) -> torch.Tensor:
    """fp32 weight rows [row0, row1)."""
    k, g = state.packed.shape[1] * 2, state.group_size
    if out is None:
        out = torch.empty(row1 - row0, k)
    L = native.lib()
    if L is not None and _q4_ok(k, g):
        L.q4_dequant(state.packed.data_ptr(), state.scales.data_ptr(), state.offsets.data_ptr(),
                     int(state.zero_form), out.data_ptr(), row0, row1, k, g)
        return out
    s, mn = state.scale_min()
    cols = torch.arange(k) // g
    q = int4_unpack_q(state)[row0:row1].float()
    return out.copy_(q * s[row0:row1, cols] + mn[row0:row1, cols])


def int8_dequant_rows(state: Int8State, row0: int, row1: int, out=None) -> torch.Tensor:
    k, g = state.qweight.shape[1], state.group_size
    if out is None:
        out = torch.empty(row1 - row0, k)
    L = native.lib()
    if L is not None and _q8_ok(k, g):
        L.q8_dequant(state.qweight.data_ptr(), state.scales.data_ptr(), out.data_ptr(),
                     row0, row1, k, g)
        return out
    q = state.qweight[row0:row1].float().reshape(row1 - row0, k // g, g)
    return out.copy_((q * state.scales[row0:row1, :, None]).reshape(row1 - row0, k))


def _q4_ok(k: int, g: int) -> bool:
    return k % 32 == 0 and g % 32 == 0 and -(-k // g) <= 1024  # MAX_GROUPS in lowbit.c


def _q8_ok(k: int, g: int) -> bool:
    return k % 16 == 0 and g % 16 == 0


def int4_row_kernel(state: Int4State, M: int, k: int):
    """The C call int4_linear makes for M fp32 rows of k columns, as fn(x_ptr, y_ptr) writing
    fp32 [M, out]; None where it takes another path (widening, torch, no C library)."""
    n, g = state.packed.shape[0], state.group_size
    L = native.lib()
    if L is None or not _q4_ok(k, g) or not _on_cpu(state.packed):
        return None
    tiles = _tiles(M, k, g)
    if M > MAX_ROWS_PACKED["int4"] and not (tiles or _lanes(M, k, g) or _a16(M, k)):
        return None
    w = (state.packed.data_ptr(), state.scales.data_ptr(), state.offsets.data_ptr(),
         int(state.zero_form))
    fn = (L.q4_gemm_amx if tiles else L.q4_gemm_lanes if _lanes(M, k, g)
          else L.q4_gemm_a16 if _a16(M, k) else L.q4_gemm)
    return RowKernel(lambda x, y: fn(x, M, *w, y, n, k, g), fn, RowKernel.LOWBIT, M, *w, n, k, g)


def int4_linear(x: torch.Tensor, state: Int4State) -> torch.Tensor:
    """y = x W^T for x: [M, in] (no bias), in x's dtype."""
    if not _on_cpu(state.packed):
        from turbollm.quantization import gpu_kernels  # imports Triton: GPU states only
        return gpu_kernels.int4_linear(x, state)
    M, k = x.shape
    n, g = state.packed.shape[0], state.group_size
    kernel = int4_row_kernel(state, M, k)
    if kernel is not None:
        return _run_row_kernel(kernel, x, n)
    if M == 1 and native.lib() is None and k % g == 0:
        return _torch_int4_gemv(x, state)
    return _widened_linear(x, n, lambda r0, r1, out: int4_dequant_rows(state, r0, r1, out))


def _run_row_kernel(kernel, x: torch.Tensor, n: int) -> torch.Tensor:
    xf = x.float().contiguous()
    y = torch.empty(x.shape[0], n)
    kernel(xf.data_ptr(), y.data_ptr())
    return y.to(x.dtype)


def int8_row_kernel(state: Int8State, M: int, k: int):
    """Like int4_row_kernel, for int8_linear."""
    n, g = state.qweight.shape[0], state.group_size
    L = native.lib()
    if L is None or not _q8_ok(k, g) or not _on_cpu(state.qweight):
        return None
    tiles = _tiles(M, k, g)
    if M > MAX_ROWS_PACKED["int8"] and not (tiles or _lanes(M, k, g)
                                            or (_a16(M, k) and g % 32 == 0)):
        return None
    w, s = state.qweight.data_ptr(), state.scales.data_ptr()
    fn = (L.q8_gemm_amx if tiles else L.q8_gemm_lanes if _lanes(M, k, g)
          else L.q8_gemm_a16 if _a16(M, k) and g % 32 == 0 else L.q8_gemm)
    return RowKernel(lambda x, y: fn(x, M, w, s, y, n, k, g), fn, RowKernel.Q8, M, w, s, n, k, g)


def int8_linear(x: torch.Tensor, state: Int8State) -> torch.Tensor:
    """y = x W^T for x: [M, in] (no bias), in x's dtype."""
    if not _on_cpu(state.qweight):
        from turbollm.quantization import gpu_kernels  # imports Triton: GPU states only
        return gpu_kernels.int8_linear(x, state)
    M, k = x.shape
    n, g = state.qweight.shape[0], state.group_size
    kernel = int8_row_kernel(state, M, k)
    if kernel is not None:
        return _run_row_kernel(kernel, x, n)
    if M == 1 and g == k and M <= MAX_ROWS_PACKED["int8"]:
        # torch's per-channel int8 kernel (bf16 activations)
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), state.qweight,
                                              _cached_bf16_scales(state))
        return y.to(x.dtype)
    return _widened_linear(x, n, lambda r0, r1, out: int8_dequant_rows(state, r0, r1, out))


_scratch = torch.empty(0)


def _dense_gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] fp32 times the widened fp32 chunk w [N, K]^T: our C GEMM where it serves (up to
    native_ops.MAX_DENSE_ROWS rows; ~half torch's time at 64 rows), else torch's (fp32, or
    bf16 AMX tiles: layers/prefill_gemm.py)."""
    if native_ops.dense_linear_usable(x, w):
        return native_ops.dense_linear(x, w)
    return multi_row.prefill_gemm(x, w)


def _widened_linear(x: torch.Tensor, n: int, dequant_rows) -> torch.Tensor:
    """Many rows: widen the weight to fp32 chunk by chunk (reused scratch) and run a dense GEMM."""
    global _scratch
    M, k = x.shape
    xf = x.float().contiguous()
    rows = max(1, min(n, _SCRATCH_FLOATS // k))
    # A scratch made under inference_mode cannot be written outside it: remake it then.
    if _scratch.numel() < rows * k or (_scratch.is_inference()
                                       and not torch.is_inference_mode_enabled()):
        _scratch = torch.empty(rows * k)
    if rows == n:
        return _dense_gemm(xf, dequant_rows(0, n, _scratch[:n * k].view(n, k))).to(x.dtype)
    y = torch.empty(M, n)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        w = dequant_rows(r0, r1, _scratch[:(r1 - r0) * k].view(r1 - r0, k))
        y[:, r0:r1] = _dense_gemm(xf, w)
    return y.to(x.dtype)


def _cached_bf16_scales(state: Int8State) -> torch.Tensor:
    if "bf16_scales" not in state.fallback:
        state.fallback["bf16_scales"] = state.scales[:, 0].to(torch.bfloat16)
    return state.fallback["bf16_scales"]


def _torch_int4_gemv(x: torch.Tensor, state: Int4State) -> torch.Tensor:
    """torch's int4 kernel (bf16 activations); its form is w = (q - 8) * scale + zero'."""
    fb = state.fallback
    if "int4pack" not in fb:
        q = int4_unpack_q(state).to(torch.int32)
        fb["int4pack"] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        s, mn = state.scale_min()
        fb["sz"] = torch.stack([s.t(), (mn + 8 * s).t()], dim=-1).to(torch.bfloat16).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), fb["int4pack"],
                                                   state.group_size, fb["sz"])
    return y.to(x.dtype)


def state_bytes(state) -> int:
    """Bytes of the weight tensors a kernel state serves from (fallback forms not counted)."""
    return sum(t.numel() * t.element_size() for t in vars(state).values()
               if isinstance(t, torch.Tensor))
