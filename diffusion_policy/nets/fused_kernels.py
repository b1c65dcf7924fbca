"""Triton kernel of the fused sampling path (``diffusion_policy.nets.fused_unet``): one launch
computes one convolution of the UNet for every batch row.

Program (batch row ``b``, tile ``nt`` of ``BN`` output channels, slice ``s`` of ``BK`` input
channels):
1. Load the input slice ``(rows, BK)``. When the input is the raw output of an earlier
   convolution, finish that layer on the fly: GroupNorm (the group's statistics merged from the
   per-tile partial statistics its producer wrote), Mish, FiLM (time table row + observation
   row), residual add; tile 0 also writes the finished activation once when a later skip
   connection needs it.
2. One matrix product of the slice with every tap's weights side by side, ``(BK, k BN)``
   (one contiguous block of the rearranged weights).
3. Write the tap products to scratch and read them back with the rows shifted per tap: output
   row ``o`` adds tap ``t`` of input row ``o stride + t - pad`` (for the transposed up-sampling
   convolution, of the input row ``j`` with ``j stride + t - pad = o``). This is the convolution
   of the slice.
4. With several slices per tile, leave that in scratch; the last program of the tile to arrive
   (an atomic counter per tile, reset after) adds the slices in a fixed order: deterministic.
5. Finish: bias; the raw output with its partial statistics (mean and sum of squared deviations
   over the tile) for the consumer's GroupNorm, or, in the last layer, the sampler's step
   ``x_next = cx x + c0 clamp(a0 x + a1 out) + co out``.
Tiles past the convolution's compute the block's 1x1 skip convolution from the same input.

Measured on an H200 (``benchmarks/sampling.md``): variants that shifted the rows with 0/1 matrix
products, or looped over several channel slices per program, were slower. At batch 1 every step
is a chain of dependent memory round trips; fewer steps in the chain is what pays.
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
def _product(b, c0, wslab, a, bsrc, CA, CB, L_in, a_stats, a_gamma, a_beta, eps, a_nstat, a_tiles,
             film_t, film_p, film_w, film_off, step, res, mat, write_mat,
             NORM: tl.constexpr, FILM: tl.constexpr, RES: tl.constexpr, MAT: tl.constexpr,
             HAS_B: tl.constexpr, CA_PAD: tl.constexpr, KT: tl.constexpr, KTP: tl.constexpr,
             CG: tl.constexpr, NTPG: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
             IEEE: tl.constexpr):
    """The input channels ``[c0, c0 + BK)`` (of ``a``, then ``bsrc``) times every tap's weights,
    side by side: ``(BM input rows, KTP * BN)``, column ``t BN + j`` = tap t, channel j."""
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
    kk = tl.arange(0, BK)
    q = tl.arange(0, KTP * BN)
    wt = tl.load(wslab + kk[:, None] * (KT * BN) + q[None, :], mask=(q < KT * BN)[None, :], other=0.0)
    return _dot(v.to(wt.dtype), wt, IEEE)


@triton.jit
def _gather(part, first, L_in, L_out, SPLIT: tl.constexpr, SP2: tl.constexpr, KT: tl.constexpr,
            STRIDE: tl.constexpr, PAD: tl.constexpr, TRANSPOSED: tl.constexpr, RS: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr):
    """The convolution's ``(BM output rows, BN)`` tile from the ``SPLIT`` slices' tap products
    ``part[first + s]`` ``(BM input rows, RS >= KT BN)``: output row o adds tap t of input row
    ``o STRIDE + t - PAD`` (transposed: of the input row j with ``j STRIDE + t - PAD = o``)."""
    o = tl.arange(0, BM)
    j = tl.arange(0, BN)
    sp = tl.arange(0, SP2)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for t in tl.static_range(KT):
        if TRANSPOSED:
            num = o + (PAD - t)
            r = num // STRIDE
            ok = (num >= 0) & (num % STRIDE == 0) & (r < L_in)
        else:
            r = o * STRIDE + (t - PAD)
            ok = (r >= 0) & (r < L_in)
        ok = ok & (o < L_out)
        ptr = part + ((first + sp)[:, None, None] * BM + r[None, :, None]) * RS + t * BN + j[None, None, :]
        vals = tl.load(ptr, mask=(sp < SPLIT)[:, None, None] & ok[None, :, None], other=0.0,
                       cache_modifier=".cg")
        acc += tl.sum(vals, axis=0)
    return acc


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
    out, out_stats, skip_out, part, sums, counter,
    x, u_a0, u_a1, u_cx, u_c0, u_co, u_clip,
    L_in, L_out, NT, NTT,
    CA: tl.constexpr, CB: tl.constexpr, CA_PAD: tl.constexpr, CB_PAD: tl.constexpr, O: tl.constexpr,
    NORM: tl.constexpr, FILM: tl.constexpr, RES: tl.constexpr, MAT: tl.constexpr, HAS_B: tl.constexpr,
    HAS_SKIP: tl.constexpr, STATS: tl.constexpr, UPDATE: tl.constexpr,
    KT: tl.constexpr, KTP: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, TRANSPOSED: tl.constexpr,
    CG: tl.constexpr, NTPG: tl.constexpr, SPLIT: tl.constexpr, SP2: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr,
):
    """Program (b, nt, s): batch row b, output tile nt (past NT: the skip convolution's tiles),
    input channels [s BK, (s + 1) BK). Each program writes its tap products to ``part`` and reads
    them back with the rows shifted per tap (the convolution of its channel slice); with SPLIT > 1
    slices it leaves that in ``sums`` and the last of the tile's programs to arrive (a counter per
    tile, reset after) adds the slices in a fixed order (deterministic) and finishes the tile."""
    b = tl.program_id(0)
    nt = tl.program_id(1)
    s = tl.program_id(2)
    c0 = s * BK
    CIN: tl.constexpr = CA_PAD + CB_PAD
    r = tl.arange(0, BM)
    tile = (b * NTT + nt) * SPLIT
    if nt < NT:  # the convolution
        taps = _product(b, c0, w + (nt * CIN + c0) * (KT * BN), a, bsrc, CA, CB, L_in, a_stats, a_gamma,
                        a_beta, eps, a_nstat, a_tiles, film_t, film_p, film_w, film_off, step, res, mat, nt == 0,
                        NORM, FILM, RES, MAT, HAS_B, CA_PAD, KT, KTP, CG, NTPG, BM, BK, BN, IEEE)
        cols = tl.arange(0, KTP * BN)
        tl.store(part + ((tile + s) * BM + r[:, None]) * (KT * BN) + cols[None, :], taps,
                 mask=(cols < KT * BN)[None, :])
    else:
        if HAS_SKIP:  # the block's 1x1 skip convolution
            skip = _product(b, c0, ws + ((nt - NT) * CIN + c0) * BN, a, bsrc, CA, CB, L_in, a_stats, a_gamma,
                            a_beta, eps, a_nstat, a_tiles, film_t, film_p, film_w, film_off, step, res, mat, False,
                            NORM, FILM, RES, False, HAS_B, CA_PAD, 1, 1, CG, NTPG, BM, BK, BN, IEEE)
            n = tl.arange(0, BN)  # in a slot of the same size as the convolution's
            tl.store(part + ((tile + s) * BM + r[:, None]) * (KT * BN) + n[None, :], skip)
    tl.debug_barrier()  # every thread's tap products are written before they are read back shifted
    if nt < NT:
        acc = _gather(part, tile + s, L_in, L_out, 1, 1, KT, STRIDE, PAD, TRANSPOSED, KT * BN, BM, BN)
    else:
        acc = _gather(part, tile + s, L_in, L_in, 1, 1, 1, 1, 0, False, KT * BN, BM, BN)
    if SPLIT == 1:
        _finish(acc, b, nt, NT, L_in, L_out, bias, bs, out, out_stats, skip_out,
                x, u_a0, u_a1, u_cx, u_c0, u_co, u_clip, O, STATS, UPDATE, HAS_SKIP, BM, BN)
    else:
        n = tl.arange(0, BN)
        tl.store(sums + ((tile + s) * BM + r[:, None]) * BN + n[None, :], acc)
        tl.debug_barrier()  # every thread's partial sum is written before the counter moves
        # acq_rel: the partial sums of the programs that arrived before are visible to the last one
        if tl.atomic_add(counter + b * NTT + nt, 1) == SPLIT - 1:
            sp = tl.arange(0, SP2)
            ptrs = sums + ((tile + sp)[:, None, None] * BM + r[None, :, None]) * BN + n[None, None, :]
            parts = tl.load(ptrs, mask=(sp < SPLIT)[:, None, None], other=0.0, cache_modifier=".cg")
            _finish(tl.sum(parts, axis=0), b, nt, NT, L_in, L_out, bias, bs, out, out_stats, skip_out,
                    x, u_a0, u_a1, u_cx, u_c0, u_co, u_clip, O, STATS, UPDATE, HAS_SKIP, BM, BN)
            tl.store(counter + b * NTT + nt, 0)  # ready for the next launch
