"""Triton backend of ``fused_logprobs``: the maths and the autograd live in logprob.py, the merge in partials.py.

Forward: one kernel. Each program owns BLOCK_T rows and a contiguous split of the vocabulary; it walks
its split a [BLOCK_T, BLOCK_V] logit tile at a time (a K-loop of tl.dot over H) and keeps the online
partials m, s, a, zt of logprob.py in registers. Programs over different splits of the same rows write
their partials to a tiny [splits, T] buffer that ``merge_partials`` combines: splitting the vocabulary
gives the GPU enough programs when T is small (T=8k is only 64 row blocks for 132 SMs).

Backward: the vocabulary in chunks of DZ_CHUNK_COLS (4096) columns. For each chunk one kernel recomputes the
logit tiles and writes the logit gradient dz [T, chunk] in the input dtype (what the naive bf16 path's
autograd would hold, here one chunk at a time), then two cuBLAS GEMMs consume it:
    grad_weight[chunk] = dz.T @ hidden   -- complete over T in one GEMM: fp32 inside, written once
    grad_hidden       += dz @ weight[chunk] -- summed over chunks in an fp32 [T, H] accumulator
So the backward does three GEMM-sized products (recompute, two gradients), the forward one: 4 against
the naive path's 3. The fp32 [T, H] accumulator is the price of fp32 accumulation across chunks
(2H/V of the naive bf16 logits, 4.7% for Qwen2.5's H=3584, V=152064); chunking the vocabulary rather
than the rows keeps it [T, H] rather than [V, H], smaller whenever T < V. Some such accumulator is
unavoidable with one recompute and fp32 sums: whatever the tile order, at some moment min(T, V) rows of
one gradient are partial sums (bench/RESULTS.md works it out); only a second recompute avoids it.

Loads: pointer arithmetic (the measured default), or Hopper's tensor-memory accelerator (TMA) through
host-side tensor descriptors when ``OVR_LOGPROB_TMA=1``: a descriptor load moves a whole tile with one
instruction and zero-fills past the tensor's edges (no clamped indices, no K mask). TMA needs rows whose
byte stride and base are multiples of 16 and a GPU of compute capability >= 9; inputs that are not get
the pointer kernels. The two variants compute the same tiles in the same order. Whether TMA closes the
gap to cuBLAS has not been measured yet: ``bench/logprob.py --gpu --tune`` times both side by side.

Importing this module works without triton or CUDA (``available()`` says whether it can run).
Under TRITON_INTERPRET=1 (set before triton is imported) the kernels run on CPU tensors, for tests.
"""

import functools
import os

import torch

from .partials import merge_partials

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
    _IMPORT_ERROR = None
except Exception as exc:  # noqa: BLE001 - any failure means "not available", reported on use
    triton = TensorDescriptor = None
    _IMPORT_ERROR = exc

    class tl:  # stand-in so the annotations below evaluate; the kernels are never launched
        constexpr = None


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


# Columns of the logit gradient materialised per backward step: T * 4096 * 2 bytes of workspace
# (2.7% of the naive bf16 logits at V=152064). Each step's grad_hidden GEMM re-reads and re-writes
# the fp32 [T, H] accumulator, which argues for wide chunks; on an H100 at T=8k, 4096 and 8192
# columns measured the same time (58.9 vs 59.2 ms), so the smaller one.
DZ_CHUNK_COLS = int(os.environ.get("OVR_LOGPROB_DZ_CHUNK_COLS", 4096))

# Tile shapes. GPU: a 128x256 fp32 accumulator over 8 warps, 64-wide K steps, 3-stage pipeline
# (48 KB of shared memory per stage in bf16). fp32 inputs halve the K step to fit shared memory.
# GROUP_T row blocks are scheduled together so the weight tiles they share stay in L2.
GPU_CONFIG = dict(BLOCK_T=128, BLOCK_V=256, BLOCK_K=64, GROUP_T=8, num_warps=8, num_stages=3)
GPU_CONFIG_FP32 = dict(BLOCK_T=128, BLOCK_V=128, BLOCK_K=32, GROUP_T=8, num_warps=8, num_stages=3)
# The interpreter runs each program in numpy: few, large-ish programs are fastest.
INTERPRET_CONFIG = dict(BLOCK_T=32, BLOCK_V=64, BLOCK_K=32, GROUP_T=4, num_warps=4, num_stages=1)

# Tile loads through TMA descriptors where the inputs allow it (see the module doc). Off by default
# until a GPU run shows it faster.
USE_TMA = os.environ.get("OVR_LOGPROB_TMA", "0") == "1"


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available():
    """True when the Triton kernels can run on CUDA tensors here."""
    return triton is not None and torch.cuda.is_available()


def check_usable(hidden):
    if triton is None:
        raise RuntimeError(f"backend='triton' needs the triton package, which failed to import: "
                           f"{_IMPORT_ERROR!r}; use backend='torch' or 'auto'")
    if hidden.device.type != "cuda" and not _interpreting():
        raise ValueError(f"backend='triton' needs CUDA tensors, got hidden on {hidden.device} with "
                         f"shape {tuple(hidden.shape)}; use backend='torch' or 'auto'")
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"backend='triton' takes fp32, bf16 or fp16, got hidden {hidden.dtype}; "
                         "use backend='torch'")


def _config(hidden):
    if _interpreting():
        return dict(INTERPRET_CONFIG)
    return dict(GPU_CONFIG_FP32 if hidden.dtype == torch.float32 else GPU_CONFIG)


def _cdiv(a, b):
    return (a + b - 1) // b


@functools.lru_cache(maxsize=None)
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_programs_target(device):
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4


def _num_splits(t_blocks, v_blocks, sms):
    """Vocabulary splits per row block: enough programs for >= 4 waves, little waste.

    All programs walk the same number of tiles (per_split, padding included), so the waste is the
    idle part of the last wave plus the padding tiles; score = useful tiles / tile slots paid for.
    """
    best, best_score = 1, -1.0
    for n in range(1, min(v_blocks, 256) + 1):
        per_split = _cdiv(v_blocks, n)
        n_eff = _cdiv(v_blocks, per_split)
        programs = t_blocks * n_eff
        if programs < 4 * sms and n < min(v_blocks, 256):
            continue
        score = t_blocks * v_blocks / (_cdiv(programs, sms) * sms * per_split)
        if score > best_score + 1e-9:
            best, best_score = n_eff, score
        if score > 0.97:
            break
    return best


def _tma_usable(*tensors):
    """TMA descriptors need 2-D tensors with unit column stride, 16-byte aligned row strides and bases,
    and (on a GPU) compute capability >= 9."""
    if not USE_TMA or TensorDescriptor is None:
        return False
    for t in tensors:
        if t.dim() != 2 or t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 \
                or t.data_ptr() % 16:
            return False
    device = tensors[0].device
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9


def _dot_precision(dtype):
    # fp32 inputs: exact fp32 products (tf32 would cost ~3e-4 relative error in the logits).
    return "ieee" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@_jit
def _logit_tile(h_ptr, w_ptr, rows64, cols64, H, stride_ht, stride_hk, stride_wv, stride_wk,
                inv_temp, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """[BLOCK_T, BLOCK_V] fp32 tile of hidden @ weight.T * inv_temp.

    rows64 / cols64 are already clamped into range (out-of-range rows and columns re-read the last
    valid one and are masked by the caller), so only the K edge needs a mask, and only if H is not a
    multiple of BLOCK_K. int64 offsets: rows * stride can pass 2**31 for long inputs.
    """
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows64[:, None] * stride_ht + ks[None, :] * stride_hk
    w_ptrs = w_ptr + cols64[:, None] * stride_wv + ks[None, :] * stride_wk
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            h = tl.load(h_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = (k0 + ks) < H
            h = tl.load(h_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K * stride_hk
        w_ptrs += BLOCK_K * stride_wk
    return acc * inv_temp


@_jit
def _logit_tile_tma(h_desc, w_desc, row0, col0, H, inv_temp, BLOCK_K: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """The same tile as ``_logit_tile`` from TMA descriptors (blocks [BLOCK_T, BLOCK_K] of hidden and
    [BLOCK_V, BLOCK_K] of weight): rows, columns and K past the edges load as zeros."""
    acc = tl.zeros((h_desc.block_shape[0], w_desc.block_shape[0]), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        h = h_desc.load([row0, k0])
        w = w_desc.load([col0, k0])
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc * inv_temp


@_jit
def _grouped_pid(pid, num_t_blocks, num_other, GROUP_T: tl.constexpr):
    """Map a linear program id to (row block, other block) with GROUP_T row blocks varying fastest,
    so programs running together share the other operand's tiles in L2 and touch few row blocks."""
    per_group = GROUP_T * num_other
    first_t = (pid // per_group) * GROUP_T
    group_size = tl.minimum(num_t_blocks - first_t, GROUP_T)
    local = pid % per_group
    return first_t + local % group_size, local // group_size


@_jit
def _forward_kernel(h_ptr, w_ptr, tgt_ptr, m_ptr, s_ptr, a_ptr, zt_ptr,
                    T, V, H, stride_ht, stride_hk, stride_wv, stride_wk, inv_temp,
                    num_t_blocks, num_splits, blocks_per_split,
                    WITH_ENTROPY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_K: tl.constexpr, GROUP_T: tl.constexpr, EVEN_K: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """h_ptr / w_ptr are TMA descriptors when USE_TMA, pointers otherwise."""
    pid_t, pid_s = _grouped_pid(tl.program_id(0), num_t_blocks, num_splits, GROUP_T)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rows64 = tl.minimum(rows, T - 1).to(tl.int64)
    target = tl.load(tgt_ptr + rows64)

    # Start from a finite "minus infinity": with -inf, (m - m_new) * s would be -inf * 0 = nan.
    m = tl.full((BLOCK_T,), -1.0e30, dtype=tl.float32)
    s = tl.zeros((BLOCK_T,), dtype=tl.float32)
    a = tl.zeros((BLOCK_T,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_T,), dtype=tl.float32)
    # Every split walks blocks_per_split tiles (a plain scalar loop bound); the last split's tiles
    # past V are all padding, which the -1e30 fill below turns into no-ops.
    for i in range(0, blocks_per_split):
        col0 = (pid_s * blocks_per_split + i) * BLOCK_V
        cols = col0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        if USE_TMA:
            z = _logit_tile_tma(h_ptr, w_ptr, pid_t * BLOCK_T, col0, H, inv_temp, BLOCK_K,
                                DOT_PRECISION)
        else:
            z = _logit_tile(h_ptr, w_ptr, rows64, tl.minimum(cols, V - 1).to(tl.int64), H,
                            stride_ht, stride_hk, stride_wv, stride_wk, inv_temp,
                            BLOCK_T, BLOCK_V, BLOCK_K, EVEN_K, DOT_PRECISION)
        # Columns past V get a finite -1e30: exp gives exactly 0 and e * d stays 0 (-inf would make
        # 0 * -inf = nan), and a tile of padding only leaves m, s, a, zt as they were. Every split
        # has at least one real tile, so m ends as a real logit.
        z = tl.where(col_ok[None, :], z, -1.0e30)
        m_new = tl.maximum(m, tl.max(z, 1))
        alpha = tl.exp(m - m_new)
        d = z - m_new[:, None]
        e = tl.exp(d)
        if WITH_ENTROPY:
            # a holds sum e (z - m); moving to m_new: alpha * (a + (m - m_new) s), before s moves.
            a = alpha * (a + (m - m_new) * s) + tl.sum(e * d, 1)
        s = s * alpha + tl.sum(e, 1)
        m = m_new
        # A target outside this split never matches; one past V (a later tensor-parallel shard's
        # id) must not match a padding column either, hence col_ok.
        hit = (cols[None, :] == target[:, None]) & col_ok[None, :]
        zt += tl.sum(tl.where(hit, z, 0.0), 1)

    out = pid_s.to(tl.int64) * T + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(zt_ptr + out, zt, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(a_ptr + out, a, mask=row_ok)


@_jit
def _dlogits_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, ez_ptr, g_ptr, gent_ptr, dz_ptr,
                    T, V, H, v_start, width, stride_ht, stride_hk, stride_wv, stride_wk, stride_dzt,
                    inv_temp, num_t_blocks, num_v_blocks,
                    WITH_ENTROPY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_K: tl.constexpr, GROUP_T: tl.constexpr, EVEN_K: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """dz[t, c] = dL/d(hidden @ weight.T)[t, v_start + c] for c < width (g already holds 1/temp).

    With USE_TMA, h_ptr / w_ptr / dz_ptr are TMA descriptors (dz_ptr's over the chunk's [T, width])."""
    pid_t, pid_v = _grouped_pid(tl.program_id(0), num_t_blocks, num_v_blocks, GROUP_T)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rows64 = tl.minimum(rows, T - 1).to(tl.int64)
    cols_local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols_local < width
    cols = v_start + cols_local
    if USE_TMA:
        z = _logit_tile_tma(h_ptr, w_ptr, pid_t * BLOCK_T, v_start + pid_v * BLOCK_V, H, inv_temp,
                            BLOCK_K, DOT_PRECISION)
    else:
        z = _logit_tile(h_ptr, w_ptr, rows64, tl.minimum(cols, V - 1).to(tl.int64), H,
                        stride_ht, stride_hk, stride_wv, stride_wk, inv_temp,
                        BLOCK_T, BLOCK_V, BLOCK_K, EVEN_K, DOT_PRECISION)
    lse = tl.load(lse_ptr + rows64)
    g = tl.load(g_ptr + rows64)
    target = tl.load(tgt_ptr + rows64)
    p = tl.exp(z - lse[:, None])
    if WITH_ENTROPY:
        ez = tl.load(ez_ptr + rows64)
        g_ent = tl.load(gent_ptr + rows64)
        coef = g[:, None] + g_ent[:, None] * (z - ez[:, None])
    else:
        coef = g[:, None]
    dz = tl.where(cols[None, :] == target[:, None], g[:, None], 0.0) - p * coef
    if USE_TMA:   # the descriptor clips rows past T and columns past width
        dz_ptr.store([pid_t * BLOCK_T, pid_v * BLOCK_V], dz.to(dz_ptr.dtype))
    else:
        ptrs = dz_ptr + rows64[:, None] * stride_dzt + cols_local[None, :]
        tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Host side (called by logprob._FusedLogprobs)
# ----------------------------------------------------------------------------------------------
def _tile_sources(hidden, weight, cfg, use_tma):
    """What the kernels read tiles from: the tensors themselves, or TMA descriptors over them."""
    if not use_tma:
        return hidden, weight
    return (TensorDescriptor.from_tensor(hidden, [cfg["BLOCK_T"], cfg["BLOCK_K"]]),
            TensorDescriptor.from_tensor(weight, [cfg["BLOCK_V"], cfg["BLOCK_K"]]))


def partial_stats(hidden, weight, local_targets, inv_temp, with_entropy):
    num_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    cfg = _config(hidden)
    bt, bv = cfg["BLOCK_T"], cfg["BLOCK_V"]
    t_blocks, v_blocks = _cdiv(num_rows, bt), _cdiv(vocab, bv)
    n_splits = _num_splits(max(t_blocks, 1), v_blocks, _num_programs_target(device))
    per_split = _cdiv(v_blocks, n_splits)
    n_splits = _cdiv(v_blocks, per_split)        # no empty split

    bufs = torch.empty(4, n_splits, num_rows, dtype=torch.float32, device=device)
    m, s, a, zt = bufs.unbind(0)
    if num_rows:
        targets = local_targets.to(torch.int64).contiguous()
        use_tma = _tma_usable(hidden, weight)
        h_src, w_src = _tile_sources(hidden, weight, cfg, use_tma)
        _forward_kernel[(t_blocks * n_splits,)](
            h_src, w_src, targets, m, s, a, zt,
            num_rows, vocab, hidden_size, hidden.stride(0), hidden.stride(1),
            weight.stride(0), weight.stride(1), float(inv_temp),
            t_blocks, n_splits, per_split,
            WITH_ENTROPY=with_entropy, BLOCK_T=bt, BLOCK_V=bv, BLOCK_K=cfg["BLOCK_K"],
            GROUP_T=cfg["GROUP_T"], EVEN_K=hidden_size % cfg["BLOCK_K"] == 0,
            DOT_PRECISION=_dot_precision(hidden.dtype), USE_TMA=use_tma,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return merge_partials(m, s, a if with_entropy else None, zt, dim=0)


def _add_product_fp32(acc, a, b):
    """acc += a @ b with acc fp32 and a, b possibly bf16/fp16, accumulated in fp32 by cuBLAS."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):
            pass          # older torch: fall through (one [T, H] temporary in the input dtype)
    acc.add_(a @ b)


def backward(hidden, weight, local_targets, lse, mean_logit, g_logp, g_ent, inv_temp,
             need_hidden, need_weight):
    num_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    grad_hidden = torch.zeros(num_rows, hidden_size, dtype=torch.float32, device=device) \
        if need_hidden else None
    grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=device) if need_weight else None
    if num_rows == 0:
        if need_weight:
            grad_weight.zero_()
        return grad_hidden, grad_weight

    cfg = _config(hidden)
    bt, bv = cfg["BLOCK_T"], cfg["BLOCK_V"]
    chunk = min(_cdiv(DZ_CHUNK_COLS, bv) * bv, _cdiv(vocab, bv) * bv)
    dz_buf = torch.empty(num_rows, chunk, dtype=hidden.dtype, device=device)
    targets = local_targets.to(torch.int64).contiguous()
    with_entropy = g_ent is not None
    t_blocks = _cdiv(num_rows, bt)
    use_tma = _tma_usable(hidden, weight, dz_buf)
    h_src, w_src = _tile_sources(hidden, weight, cfg, use_tma)
    for v0 in range(0, vocab, chunk):
        width = min(chunk, vocab - v0)
        v_blocks = _cdiv(width, bv)
        dz_dst = TensorDescriptor.from_tensor(dz_buf[:, :width], [bt, bv]) if use_tma else dz_buf
        _dlogits_kernel[(t_blocks * v_blocks,)](
            h_src, w_src, targets, lse, mean_logit if with_entropy else lse, g_logp,
            g_ent if with_entropy else g_logp, dz_dst,
            num_rows, vocab, hidden_size, v0, width, hidden.stride(0), hidden.stride(1),
            weight.stride(0), weight.stride(1), dz_buf.stride(0), float(inv_temp),
            t_blocks, v_blocks,
            WITH_ENTROPY=with_entropy, BLOCK_T=bt, BLOCK_V=bv, BLOCK_K=cfg["BLOCK_K"],
            GROUP_T=cfg["GROUP_T"], EVEN_K=hidden_size % cfg["BLOCK_K"] == 0,
            DOT_PRECISION=_dot_precision(hidden.dtype), USE_TMA=use_tma,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        dz = dz_buf[:, :width]
        if need_weight:
            torch.mm(dz.T, hidden, out=grad_weight[v0:v0 + width])
        if need_hidden:
            _add_product_fp32(grad_hidden, dz, weight[v0:v0 + width])
    return grad_hidden, grad_weight
