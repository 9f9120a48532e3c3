"""Low-bit linears on CUDA: Triton kernels that read the packed int4 / int8 / fp8 weights.

The CPU kernels (csrc/lowbit.c) cannot read device memory, so on a GPU the same kernel states
(kernels.Int4State / Int8State, fp8.Fp8State, moved to the device at install) are served here,
the weight crossing memory at 4 or 8 bits per value. By activation rows M:
- M up to ROW_KERNEL_MAX_ROWS (decode): row kernels, one program per BN weight rows and one
  activation row, reducing over K without tensor cores;
- then up to WIDEN_FROM_ROWS: tile kernels, whose 4/8-bit values go to tl.dot as they are and
  whose group scales apply once per K slice;
- from WIDEN_FROM_ROWS (prefill), and always without Triton: the weight is widened on the
  device and torch's matmul runs (`widened_*`).
The int4/int8 kernels also run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 set
before this module is imported), which is how the tests check them without a GPU.
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the widened path below serves
    triton = None

# Tile shapes and launch settings of each kernel: scripts/gpu_tune.py's choice on an H100
# (docs/benchmarks.md, session 12). tl.dot needs at least 16 in every dimension; BK spans whole
# 32-column int4 blocks (their 16 bytes hold columns j and j + 16 in one byte).
TILE_CONFIG = {
    "int4_rows": dict(BN=16, BK=512, num_warps=4, num_stages=3),
    "bytes_rows": dict(BN=8, BK=512, num_warps=4, num_stages=3),
    "int4_dot": dict(BM=16, BN=64, BK=64, num_warps=4, num_stages=3),
    "int8_dot": dict(BM=16, BN=64, BK=128, num_warps=4, num_stages=3),
}
# Up to this many activation rows (decode) each row is a dot-product pass over the weight (the
# row kernels: no tensor cores, every program streaming weight bytes); above, the tl.dot tile
# kernels multiply. Measured on an H100: int4 rows win at 1-2 rows (1.1-2.1x cuBLAS bf16 at
# one), but one-byte weights already win with tiles at 2 (1.0-2.0x bf16 up to 16 rows).
ROW_KERNEL_MAX_ROWS = {"int4": 2, "bytes": 1}
# From this many activation rows (prefill) the weight is widened and cuBLAS multiplies (fp8:
# torch._scaled_mm on its tensor cores). Widening through torch ops ran at 0.03-0.1x bf16 at
# 2-64 rows on the H100; the one-pass Triton widening that replaced it (one read of the packed
# bytes, one write of the copy) has not run on a GPU yet, so the 256 is not re-measured.
WIDEN_FROM_ROWS = 256


def load_tile_config(path: str) -> None:
    """Take the configurations scripts/gpu_tune.py chose on this GPU (a JSON file)."""
    global ROW_KERNEL_MAX_ROWS, WIDEN_FROM_ROWS
    with open(path) as fh:
        tuned = json.load(fh)
    rows = tuned.pop("row_kernel_max_rows", {})
    if isinstance(rows, int):  # one threshold for both families (the first tuner's form)
        rows = {"int4": rows, "bytes": rows}
    ROW_KERNEL_MAX_ROWS = {**ROW_KERNEL_MAX_ROWS, **rows}
    WIDEN_FROM_ROWS = int(tuned.pop("widen_from_rows", WIDEN_FROM_ROWS))
    for name, cfg in tuned.items():
        if name not in TILE_CONFIG:
            raise ValueError(f"{path}: unknown kernel {name!r}; expected {sorted(TILE_CONFIG)}")
        TILE_CONFIG[name] = dict(cfg)


def available() -> bool:
    return triton is not None


if triton is not None:
    @triton.jit
    def _int4_rows_kernel(x_ptr, w_ptr, s_ptr, f_ptr, y_ptr, N, K, NG, stride_xm, stride_ym,
                          G: tl.constexpr, ZERO_FORM: tl.constexpr, BN: tl.constexpr,
                          BK: tl.constexpr):
        """y[m, rn] for one activation row m (program axis 1) and BN weight rows: the BK-column
        slice is held as [BN, groups, bytes of a group], so each group's dot is summed before
        its scale applies once, and its min term is one product with the group's sum of x."""
        GB: tl.constexpr = G // 2        # bytes of one group
        NGB: tl.constexpr = BK // G      # groups per slice
        m = tl.program_id(1)
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        gi = tl.arange(0, NGB)
        bi = tl.arange(0, GB)
        n_ok = rn < N
        col_in = gi[:, None] * G + (bi[None, :] // 16) * 32 + bi[None, :] % 16  # low nibble's
        byte_in = gi[:, None] * GB + bi[None, :]
        acc = tl.zeros((BN,), dtype=tl.float32)
        for k0 in range(0, K, BK):
            cols = k0 + col_in                                      # [NGB, GB]
            k_ok = cols < K
            wb = tl.load(w_ptr + rn[:, None, None] * (K // 2) + (k0 // 2 + byte_in)[None, :, :],
                         mask=n_ok[:, None, None] & k_ok[None, :, :], other=0)
            x_lo = tl.load(x_ptr + m * stride_xm + cols, mask=k_ok, other=0.0).to(tl.float32)
            x_hi = tl.load(x_ptr + m * stride_xm + cols + 16, mask=k_ok, other=0.0).to(tl.float32)
            dots = tl.sum((wb & 15).to(tl.float32) * x_lo[None, :, :]
                          + (wb >> 4).to(tl.float32) * x_hi[None, :, :], axis=2)  # [BN, NGB]
            g = k0 // G + gi
            g_ok = n_ok[:, None] & (g < NG)[None, :]
            sc = tl.load(s_ptr + rn[:, None] * NG + g[None, :], mask=g_ok, other=0.0).to(tl.float32)
            f = tl.load(f_ptr + rn[:, None] * NG + g[None, :], mask=g_ok, other=0.0).to(tl.float32)
            mn = -f * sc if ZERO_FORM else f
            xsum = tl.sum(x_lo + x_hi, axis=1)                       # [NGB]
            acc += tl.sum(sc * dots + mn * xsum[None, :], axis=1)
        tl.store(y_ptr + m * stride_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _bytes_rows_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, NG, stride_xm, stride_ym,
                           G: tl.constexpr, PER_ROW: tl.constexpr, E4M3: tl.constexpr,
                           BN: tl.constexpr, BK: tl.constexpr):
        """y[m, rn] from one-byte weights (int8, or fp8 e4m3 passed as uint8 bytes: E4M3): with
        one scale per row (PER_ROW) the products are summed unscaled and scaled once at the
        end; with groups (GGUF Q8_0) each value takes its group's scale."""
        m = tl.program_id(1)
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        n_ok = rn < N
        acc = tl.zeros((BN, BK), dtype=tl.float32)
        for k0 in range(0, K, BK):
            cols = k0 + rk
            k_ok = cols < K
            w = tl.load(w_ptr + rn[:, None] * K + cols[None, :],
                        mask=n_ok[:, None] & k_ok[None, :], other=0)
            if E4M3:  # masked-off bytes are 0, which is e4m3's +0
                w = w.to(tl.float8e4nv, bitcast=True)
            w = w.to(tl.float32)
            x = tl.load(x_ptr + m * stride_xm + cols, mask=k_ok, other=0.0).to(tl.float32)
            if PER_ROW:
                acc += w * x[None, :]
            else:
                sc = tl.load(s_ptr + rn[:, None] * NG + (cols // G)[None, :],
                             mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                acc += w * sc * x[None, :]
        y = tl.sum(acc, axis=1)
        if PER_ROW:
            y = y * tl.load(s_ptr + rn * NG, mask=n_ok, other=0.0)
        tl.store(y_ptr + m * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _int4_kernel(x_ptr, w_ptr, s_ptr, f_ptr, y_ptr, M, N, K, NG, stride_xm, stride_ym,
                     G: tl.constexpr, ZERO_FORM: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr):
        """A BM x BN tile of y; each BK-column slice lies in one group (BK divides G), so the
        4-bit values go to the tensor cores as they are (exact in x's dtype) and the group's
        scale and min apply once per slice to the [BM, BN] partial product."""
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        j = tl.arange(0, BK // 2)                # byte of the K slice
        col_lo = (j // 16) * 32 + j % 16          # column of its low nibble (high: + 16)
        m_ok, n_ok = rm < M, rn < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            cols = k0 + col_lo
            k_ok = cols < K
            wb = tl.load(w_ptr + rn[:, None] * (K // 2) + (k0 // 2 + j)[None, :],
                         mask=n_ok[:, None] & k_ok[None, :], other=0)
            x_lo = tl.load(x_ptr + rm[:, None] * stride_xm + cols[None, :],
                           mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            x_hi = tl.load(x_ptr + rm[:, None] * stride_xm + (cols + 16)[None, :],
                           mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            part = tl.dot(x_lo, tl.trans((wb & 15).to(x_lo.dtype)), input_precision="ieee")
            part += tl.dot(x_hi, tl.trans((wb >> 4).to(x_lo.dtype)), input_precision="ieee")
            g = k0 // G
            sc = tl.load(s_ptr + rn * NG + g, mask=n_ok, other=0.0).to(tl.float32)
            f = tl.load(f_ptr + rn * NG + g, mask=n_ok, other=0.0).to(tl.float32)
            mn = -f * sc if ZERO_FORM else f
            xsum = tl.sum(x_lo.to(tl.float32) + x_hi.to(tl.float32), axis=1)
            acc += part * sc[None, :] + xsum[:, None] * mn[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _int8_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, NG, stride_xm, stride_ym,
                     G: tl.constexpr, PER_ROW: tl.constexpr, E4M3: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """A BM x BN tile of y; int8 values (and e4m3 bytes, E4M3) are exact in bf16/fp16/fp32
        and go to the tensor cores as they are; the scale applies at the end (one per row) or
        per slice (BK divides G)."""
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        m_ok, n_ok = rm < M, rn < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            cols = k0 + rk
            k_ok = cols < K
            wq = tl.load(w_ptr + rn[:, None] * K + cols[None, :],
                         mask=n_ok[:, None] & k_ok[None, :], other=0)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + cols[None, :],
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if E4M3:
                wq = wq.to(tl.float8e4nv, bitcast=True)
            part = tl.dot(x, tl.trans(wq.to(x.dtype)), input_precision="ieee")
            if PER_ROW:
                acc += part
            else:
                sc = tl.load(s_ptr + rn * NG + k0 // G, mask=n_ok, other=0.0)
                acc += part * sc[None, :]
        if PER_ROW:
            acc = acc * tl.load(s_ptr + rn * NG, mask=n_ok, other=0.0)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


    @triton.jit
    def _int4_widen_kernel(w_ptr, s_ptr, f_ptr, out_ptr, N, K, NG, G: tl.constexpr,
                           ZERO_FORM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """out[N, K] = the int4 weight in out's dtype, one BN x BK block per program: the
        packed bytes are read once and the widened values written once."""
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        j = tl.program_id(1) * (BK // 2) + tl.arange(0, BK // 2)  # bytes of the block
        col = (j // 16) * 32 + j % 16                              # low nibble's column
        ok = (rn < N)[:, None] & (col < K)[None, :]
        wb = tl.load(w_ptr + rn[:, None] * (K // 2) + j[None, :], mask=ok, other=0)
        sf = rn[:, None] * NG + (col // G)[None, :]  # j and j + 16 share their group
        sc = tl.load(s_ptr + sf, mask=ok, other=0.0).to(tl.float32)
        f = tl.load(f_ptr + sf, mask=ok, other=0.0).to(tl.float32)
        mn = -f * sc if ZERO_FORM else f
        dst = out_ptr + rn[:, None] * K + col[None, :]
        ty = out_ptr.dtype.element_ty
        tl.store(dst, ((wb & 15).to(tl.float32) * sc + mn).to(ty), mask=ok)
        tl.store(dst + 16, ((wb >> 4).to(tl.float32) * sc + mn).to(ty), mask=ok)

    @triton.jit
    def _bytes_widen_kernel(w_ptr, s_ptr, out_ptr, N, K, NG, G: tl.constexpr,
                            BN: tl.constexpr, BK: tl.constexpr):
        """out[N, K] = int8 weights times their scales, in out's dtype."""
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        cols = tl.program_id(1) * BK + tl.arange(0, BK)
        ok = (rn < N)[:, None] & (cols < K)[None, :]
        w = tl.load(w_ptr + rn[:, None] * K + cols[None, :], mask=ok, other=0)
        sc = tl.load(s_ptr + rn[:, None] * NG + (cols // G)[None, :], mask=ok, other=0.0)
        tl.store(out_ptr + rn[:, None] * K + cols[None, :],
                 (w.to(tl.float32) * sc).to(out_ptr.dtype.element_ty), mask=ok)

def _launch(kernel, name: str, M: int, N: int, *args, group: int = 0, **constexprs):
    """Launch with TILE_CONFIG[name]; `group` fits the slice to the weight's groups: a row
    kernel's slice holds whole groups, a tile kernel's slice lies inside one (0: one scale per
    row, any slice)."""
    cfg = dict(TILE_CONFIG[name])
    launch = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    if "BM" in cfg:
        grid = (triton.cdiv(M, cfg["BM"]), triton.cdiv(N, cfg["BN"]))
        while group and group % cfg["BK"]:  # groups are multiples of 32: this ends at >= 32
            cfg["BK"] //= 2
    else:  # row kernels: one program per BN weight rows and activation row
        grid = (triton.cdiv(N, cfg["BN"]), M)
        cfg["BK"] = max(cfg["BK"], group)
    kernel[grid](*args, **constexprs, **cfg, **launch)


def _row_kernel_groups(group_size: int) -> bool:
    """The int4 row kernel's [groups, bytes] slices need a power-of-two group of whole blocks
    (32, 64, 128, ...); other groups (e.g. 96) take the tile kernel."""
    return group_size >= 32 and group_size & (group_size - 1) == 0


def int4_linear(x: torch.Tensor, state) -> torch.Tensor:
    """y = x W^T for x [M, K] on the state's device, in x's dtype."""
    if triton is None or x.shape[0] >= WIDEN_FROM_ROWS:
        return widened_int4(x, state)
    x = x.contiguous()
    M, K = x.shape
    N, G = state.packed.shape[0], state.group_size
    NG = state.scales.shape[1]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    args = (x, state.packed, state.scales, state.offsets, y)
    if M <= ROW_KERNEL_MAX_ROWS["int4"] and _row_kernel_groups(G):
        _launch(_int4_rows_kernel, "int4_rows", M, N, *args, N, K, NG, x.stride(0), y.stride(0),
                group=G, G=G, ZERO_FORM=bool(state.zero_form))
    else:
        _launch(_int4_kernel, "int4_dot", M, N, *args, M, N, K, NG, x.stride(0), y.stride(0),
                group=G, G=G, ZERO_FORM=bool(state.zero_form))
    return y


def int8_linear(x: torch.Tensor, state) -> torch.Tensor:
    """y = x W^T for x [M, K] on the state's device, in x's dtype."""
    if triton is None or x.shape[0] >= WIDEN_FROM_ROWS:
        return widened_int8(x, state)
    return bytes_linear(x, state.qweight, state.scales, state.group_size)


def bytes_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    """y = x (qweight * scales)^T from one-byte weights [N, K] (int8, or fp8 e4m3) and fp32
    scales [N, K / group_size] (one per row: group_size = K). fp8 needs a GPU that converts
    e4m3 (compute capability >= 8.9)."""
    e4m3 = qweight.dtype == torch.float8_e4m3fn
    if e4m3:
        qweight = qweight.view(torch.uint8)
    x = x.contiguous()
    M, K = x.shape
    N, G = qweight.shape[0], group_size
    scales = scales.reshape(N, -1)
    per_row = G >= K
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M <= ROW_KERNEL_MAX_ROWS["bytes"]:
        _launch(_bytes_rows_kernel, "bytes_rows", M, N, x, qweight, scales, y, N, K,
                scales.shape[1], x.stride(0), y.stride(0), G=G, PER_ROW=per_row, E4M3=e4m3)
    else:
        _launch(_int8_kernel, "int8_dot", M, N, x, qweight, scales, y, M, N, K, scales.shape[1],
                x.stride(0), y.stride(0), group=0 if per_row else G, G=G, PER_ROW=per_row,
                E4M3=e4m3)
    return y


# Block of the widening kernels: the weight is read and the widened copy written once each.
WIDEN_BLOCK = dict(BN=32, BK=128)


def widened_int4(x: torch.Tensor, state) -> torch.Tensor:
    """x times the whole weight widened to x's dtype (prefill: cuBLAS then multiplies)."""
    return F.linear(x, widen_int4(state, x.dtype))


def widened_int8(x: torch.Tensor, state) -> torch.Tensor:
    return F.linear(x, widen_int8(state.qweight, state.scales, state.group_size, x.dtype))


def widen_int4(state, dtype: torch.dtype) -> torch.Tensor:
    """The int4 weight [N, K] in `dtype`: Triton's one-pass kernel where it runs, else torch."""
    n, half = state.packed.shape
    if triton is None:
        return widen_int4_torch(state, dtype)
    out = torch.empty(n, half * 2, dtype=dtype, device=state.packed.device)
    bn, bk = WIDEN_BLOCK["BN"], WIDEN_BLOCK["BK"]
    _int4_widen_kernel[(triton.cdiv(n, bn), triton.cdiv(half * 2, bk))](
        state.packed, state.scales, state.offsets, out, n, half * 2, state.scales.shape[1],
        G=state.group_size, ZERO_FORM=bool(state.zero_form), BN=bn, BK=bk)
    return out


def widen_int8(qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                dtype: torch.dtype) -> torch.Tensor:
    """int8 weights [N, K] times their scales, in `dtype`."""
    n, k = qweight.shape
    scales = scales.reshape(n, -1)
    if triton is None:
        return widen_int8_torch(qweight, scales, group_size, dtype)
    out = torch.empty(n, k, dtype=dtype, device=qweight.device)
    bn, bk = WIDEN_BLOCK["BN"], WIDEN_BLOCK["BK"]
    _bytes_widen_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        qweight, scales, out, n, k, scales.shape[1], G=group_size, BN=bn, BK=bk)
    return out


def widen_int4_torch(state, dtype: torch.dtype) -> torch.Tensor:
    """The reference widening in torch ops (several fp32 passes over the weight)."""
    n, half = state.packed.shape
    p = state.packed.reshape(n, half // 16, 1, 16)
    q = torch.cat([p & 15, p >> 4], dim=2).reshape(n, half * 2).float()
    s, mn = state.scale_min()
    cols = torch.arange(half * 2, device=q.device) // state.group_size
    return (q * s[:, cols] + mn[:, cols]).to(dtype)


def widen_int8_torch(qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                      dtype: torch.dtype) -> torch.Tensor:
    n, k = qweight.shape
    w = qweight.float().reshape(n, -1, group_size) * scales.reshape(n, -1)[:, :, None]
    return w.reshape(n, k).to(dtype)
