"""Triton kernel of the fused sampling path (``diffusion_policy.nets.fused_unet``): one launch
computes one convolution of the UNet for every batch row and every tile of ``BN`` output channels.

A program (batch row ``b``, output tile ``nt``) does, for each block of ``BK`` input channels:
1. load the input tile ``(rows, BK)``; when the input is the raw output of an earlier convolution,
   finish that layer on the fly: GroupNorm (group statistics merged from the per-tile partial
   statistics its producer wrote), Mish, FiLM (time table row + observation row), residual add;
   optionally write the finished activation out once (tile 0), for a later skip connection;
2. for each tap ``t``: shift the tile's rows with a 0/1 matrix product (``S_t @ A``, exact in any
   precision; it also does the stride of the down-sampling and the interleaving of the transposed
   up-sampling convolution) and accumulate ``(S_t A) @ W_t`` in float32.
The epilogue adds the bias and writes the raw output with its partial statistics (mean and sum of
squared deviations over the tile) for the consumer's GroupNorm; or, for the last layer, applies
the sampler's step ``x_next = cx x + c0 clamp(a0 x + a1 out) + co out``. Programs past the
convolution's tiles compute the block's 1x1 skip convolution from the same input.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _mish(v):
    # mish(v) = v tanh(softplus(v)) = v n / (n + 2) with n = e^v (e^v + 2): one exp, one division
    e = tl.exp(tl.minimum(v, 20.0))
    n = e * (e + 2.0)
    return tl.where(v > 20.0, v, v * n / (n + 2.0))


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        r = tl.dot(a, b, input_precision="ieee")
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def _input_tile(src, b, c0, L, C, stats, gamma, beta, eps, n_stat, stat_tiles,
                film_t, film_p, film_w, film_off, step, res, mat, write_mat,
                NORM: tl.constexpr, FILM: tl.constexpr, RES: tl.constexpr, MAT: tl.constexpr,
                CG: tl.constexpr, NTPG: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """Rows ``[0, BM)`` x channels ``[c0, c0 + BK)`` of batch row ``b`` of the input, float32,
    zero outside ``L`` rows and ``C`` channels; finished (GroupNorm, Mish, FiLM, residual) when
    ``NORM``."""
    rows = tl.arange(0, BM)
    ch = c0 + tl.arange(0, BK)
    cmask = ch < C
    m = (rows < L)[:, None] & cmask[None, :]
    off = (b * L + rows)[:, None] * C + ch[None, :]
    v = tl.load(src + off, mask=m, other=0.0).to(tl.float32)
    if NORM:
        # the channel block lies in one group; merge its NTPG tiles' (mean, M2) (Chan et al.)
        tiles = tl.arange(0, NTPG)
        sp = stats + (b * stat_tiles + (c0 // CG) * NTPG + tiles) * 2
        mt = tl.load(sp)
        m2t = tl.load(sp + 1)
        mean = tl.sum(mt, axis=0) / NTPG
        d = mt - mean
        var = (tl.sum(m2t, axis=0) + n_stat * tl.sum(d * d, axis=0)) / (NTPG * n_stat)
        rstd = 1.0 / tl.sqrt(var + eps)
        gam = tl.load(gamma + ch, mask=cmask, other=0.0)
        bet = tl.load(beta + ch, mask=cmask, other=0.0)
        v = _mish((v - mean) * rstd * gam[None, :] + bet[None, :])
        if FILM:
            fo = film_off + ch
            scale = (tl.load(film_t + step * film_w + fo, mask=cmask, other=0.0)
                     + tl.load(film_p + b * film_w + fo, mask=cmask, other=0.0))
            shift = (tl.load(film_t + step * film_w + fo + C, mask=cmask, other=0.0)
                     + tl.load(film_p + b * film_w + fo + C, mask=cmask, other=0.0))
            v = v * scale[None, :] + shift[None, :]
        if RES:
            v = v + tl.load(res + off, mask=m, other=0.0)
        v = tl.where(m, v, 0.0)
        if MAT:
            tl.store(mat + off, v, mask=m & write_mat)
    return v


@triton.jit
def _taps(acc, v, w, k0, L_in, L_out, CIN: tl.constexpr, KT: tl.constexpr, STRIDE: tl.constexpr,
          PAD: tl.constexpr, TRANSPOSED: tl.constexpr, SHIFT: tl.constexpr, BM: tl.constexpr,
          BK: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    """``acc += sum_t S_t v W_t[k0 : k0 + BK]``; ``w`` points at this tile's ``(KT, CIN, BN)``
    weights. Regular: output row ``o`` takes input row ``o STRIDE + t - PAD``; transposed: input
    row ``j`` feeds output row ``j STRIDE + t - PAD``."""
    wdt = w.dtype.element_ty
    v = v.to(wdt)
    ro = tl.arange(0, BM)
    ri = tl.arange(0, BM)
    kk = tl.arange(0, BK)
    nn = tl.arange(0, BN)
    for t in tl.static_range(KT):
        wt = tl.load(w + (t * CIN + k0 + kk)[:, None] * BN + nn[None, :])
        if SHIFT:
            if TRANSPOSED:
                hit = ro[:, None] == ri[None, :] * STRIDE + (t - PAD)
            else:
                hit = ri[None, :] == ro[:, None] * STRIDE + (t - PAD)
            hit = hit & (ri[None, :] < L_in) & (ro[:, None] < L_out)
            s = tl.where(hit, 1.0, 0.0).to(wdt)
            sv = _dot(s, v, IEEE).to(wdt)
        else:
            sv = v
        acc += _dot(sv, wt, IEEE)
    return acc


@triton.jit
def _slice(acc, b, c0, w, a, bsrc, CA, CB, L_in, L_out, a_stats, a_gamma, a_beta, eps, a_nstat, a_tiles,
           film_t, film_p, film_w, film_off, step, res, mat, write_mat,
           NORM: tl.constexpr, FILM: tl.constexpr, RES: tl.constexpr, MAT: tl.constexpr,
           HAS_B: tl.constexpr, CA_PAD: tl.constexpr, CIN: tl.constexpr, KT: tl.constexpr,
           STRIDE: tl.constexpr, PAD: tl.constexpr, TRANSPOSED: tl.constexpr, SHIFT: tl.constexpr,
           CG: tl.constexpr, NTPG: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
           IEEE: tl.constexpr):
    """``acc`` plus the contribution of input channels ``[c0, c0 + BK)`` (of ``a``, then ``bsrc``)."""
    if HAS_B:
        if c0 < CA_PAD:
            v = _input_tile(a, b, c0, L_in, CA, a_stats, a_gamma, a_beta, eps, a_nstat, a_tiles,
                            film_t, film_p, film_w, film_off, step, res, mat, write_mat,
                            NORM, FILM, RES, MAT, CG, NTPG, BM, BK)
        else:
            v = _input_tile(bsrc, b, c0 - CA_PAD, L_in, CB, a_stats, a_gamma, a_beta, eps, a_nstat, a_tiles,
                            film_t, film_p, film_w, film_off, step, res, mat, write_mat,
                            False, False, False, False, CG, NTPG, BM, BK)
    else:
        v = _input_tile(a, b, c0, L_in, CA, a_stats, a_gamma, a_beta, eps, a_nstat, a_tiles,
                        film_t, film_p, film_w, film_off, step, res, mat, write_mat,
                        NORM, FILM, RES, MAT, CG, NTPG, BM, BK)
    return _taps(acc, v, w, c0, L_in, L_out, CIN, KT, STRIDE, PAD, TRANSPOSED, SHIFT, BM, BK, BN, IEEE)


@triton.jit
def _finish(acc, b, nt, NT, L_in, L_out, bias, bs, out, out_stats, skip_out,
            x, u_a0, u_a1, u_cx, u_c0, u_co, u_clip,
            O: tl.constexpr, STATS: tl.constexpr, UPDATE: tl.constexpr, HAS_SKIP: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr):
    """Bias and store: the convolution's tile (with its partial statistics, or the sampler's
    step), or a tile of the 1x1 skip convolution."""
    ro = tl.arange(0, BM)
    if nt < NT:
        n = nt * BN + tl.arange(0, BN)
        y = acc + tl.load(bias + n)[None, :]
        m = (ro < L_out)[:, None] & (n < O)[None, :]
        off = (b * L_out + ro)[:, None] * O + n[None, :]
        if STATS:  # partial GroupNorm statistics of this tile (all BN channels are real here)
            cnt = (L_out * BN).to(tl.float32)
            mean = tl.sum(tl.sum(tl.where(m, y, 0.0), axis=1), axis=0) / cnt
            d = tl.where(m, y - mean, 0.0)
            m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
            tl.store(out_stats + (b * NT + nt) * 2, mean)
            tl.store(out_stats + (b * NT + nt) * 2 + 1, m2)
        if UPDATE:  # the sampler's step on the chunk x
            xv = tl.load(x + off, mask=m, other=0.0)
            x0 = tl.minimum(tl.maximum(u_a0 * xv + u_a1 * y, -u_clip), u_clip)
            y = u_cx * xv + u_c0 * x0 + u_co * y
        tl.store(out + off, y, mask=m)
    else:
        if HAS_SKIP:  # length preserving: L_in rows
            n = (nt - NT) * BN + tl.arange(0, BN)
            y = acc + tl.load(bs + n)[None, :]
            m = (ro < L_in)[:, None] & (n < O)[None, :]
            tl.store(skip_out + (b * L_in + ro)[:, None] * O + n[None, :], y, mask=m)


@triton.jit(do_not_specialize=["step"])
def conv_kernel(
    a, a_stats, a_gamma, a_beta, eps, a_nstat, a_tiles,
    film_t, film_p, film_w, film_off, step,
    res, mat, bsrc, w, bias, ws, bs,
    out, out_stats, skip_out, part, counter,
    x, u_a0, u_a1, u_cx, u_c0, u_co, u_clip,
    L_in, L_out, NT, NTT,
    CA: tl.constexpr, CB: tl.constexpr, CA_PAD: tl.constexpr, CB_PAD: tl.constexpr, O: tl.constexpr,
    NORM: tl.constexpr, FILM: tl.constexpr, RES: tl.constexpr, MAT: tl.constexpr, HAS_B: tl.constexpr,
    HAS_SKIP: tl.constexpr, STATS: tl.constexpr, UPDATE: tl.constexpr,
    KT: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, TRANSPOSED: tl.constexpr,
    SHIFT: tl.constexpr, CG: tl.constexpr, NTPG: tl.constexpr, SPLIT: tl.constexpr, SP2: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr,
):
    """Program (b, nt, s): batch row b, output tile nt (past NT: the skip convolution's tiles),
    input channels [s BK, (s + 1) BK). With SPLIT > 1 slices, each program leaves its partial
    sum in ``part``; the last of a tile's programs to arrive (a counter per tile, reset after)
    adds them in a fixed order and finishes the tile: deterministic, and every slice's weights
    stream at once."""
    b = tl.program_id(0)
    nt = tl.program_id(1)
    c0 = tl.program_id(2) * BK
    CIN: tl.constexpr = CA_PAD + CB_PAD
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if nt < NT:  # the convolution
        acc = _slice(acc, b, c0, w + nt * (KT * CIN * BN), a, bsrc, CA, CB, L_in, L_out,
                     a_stats, a_gamma, a_beta, eps, a_nstat, a_tiles, film_t, film_p, film_w, film_off, step,
                     res, mat, nt == 0, NORM, FILM, RES, MAT, HAS_B, CA_PAD, CIN, KT, STRIDE, PAD,
                     TRANSPOSED, SHIFT, CG, NTPG, BM, BK, BN, IEEE)
    else:
        if HAS_SKIP:  # the block's 1x1 skip convolution
            acc = _slice(acc, b, c0, ws + (nt - NT) * (CIN * BN), a, bsrc, CA, CB, L_in, L_in,
                         a_stats, a_gamma, a_beta, eps, a_nstat, a_tiles, film_t, film_p, film_w, film_off,
                         step, res, mat, False, NORM, FILM, RES, False, HAS_B, CA_PAD, CIN, 1, 1, 0,
                         False, False, CG, NTPG, BM, BK, BN, IEEE)
    if SPLIT == 1:
        _finish(acc, b, nt, NT, L_in, L_out, bias, bs, out, out_stats, skip_out,
                x, u_a0, u_a1, u_cx, u_c0, u_co, u_clip, O, STATS, UPDATE, HAS_SKIP, BM, BN)
    else:
        r = tl.arange(0, BM)
        n = tl.arange(0, BN)
        tile = (b * NTT + nt) * SPLIT
        tl.store(part + (tile + tl.program_id(2)) * (BM * BN) + r[:, None] * BN + n[None, :], acc)
        tl.debug_barrier()  # every thread's partial is written before the counter moves
        arrived = tl.atomic_add(counter + b * NTT + nt, 1)  # acq_rel: the partials are visible
        if arrived == SPLIT - 1:
            sp = tl.arange(0, SP2)
            ptrs = part + (tile + sp)[:, None, None] * (BM * BN) + r[None, :, None] * BN + n[None, None, :]
            parts = tl.load(ptrs, mask=(sp < SPLIT)[:, None, None], other=0.0, cache_modifier=".cg")
            _finish(tl.sum(parts, axis=0), b, nt, NT, L_in, L_out, bias, bs, out, out_stats, skip_out,
                    x, u_a0, u_a1, u_cx, u_c0, u_co, u_clip, O, STATS, UPDATE, HAS_SKIP, BM, BN)
            tl.store(counter + b * NTT + nt, 0)  # ready for the next launch
