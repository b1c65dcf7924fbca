"""Triton kernel of the fused sampling path (``diffusion_policy.fast.fused_unet``): one launch
computes one convolution of the UNet for every batch row.

Program (batch row ``b``, tile ``nt`` of ``BN`` output channels, slice ``s`` of ``BK`` input
channels):
1. Read the program's weights: one ``(BK, BN)`` block per tap, contiguous in the rearranged
   weights. They depend on no earlier kernel, so with programmatic dependent launch (``PDL``)
   this happens while the previous kernel is still running; only then does the program wait.
2. Read the input slice ``(rows, BK)`` and finish it. A convolution's output is left as one
   partial sum per channel slice of its producer (``A_SPLIT`` of them, no bias): add them and the
   bias; when the producer's output goes through GroupNorm, the slice holds whole groups, so the
   statistics come from the slice itself; then Mish, FiLM (time table row + observation row) and
   the residual (itself a set of partial sums, or a finished buffer). Tile 0 also writes the
   finished slice once when a later layer needs it (``MAT``).
3. Per tap ``t``, gather the rows that tap reads (``o stride + t - pad``; for the transposed
   up-sampling convolution, the row ``j`` with ``j stride + t - pad = o``) and multiply them by
   the tap's weights, accumulating: the convolution of this slice of input channels.
4. Store it as this slice's partial sum; its consumer adds the slices. Only the last layer (one
   slice) adds its bias and runs the sampler's step, ``x_next = cx x + c0 clamp(a0 x + a1 out) +
   co out``.
Tiles past the convolution's compute the block's 1x1 skip convolution from the same input.

Each program reads its input once from L2 and writes once: no scratch round trips, counters or
atomics, and every sum runs in a fixed order (deterministic). Measured on an H200
(``benchmarks/sampling.md``): the previous design, which reduced the slices inside the launch
(tap products through scratch, then an atomic counter per tile and the last program adding the
slices), spent most of its time in that chain of dependent memory round trips.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _mish(v):
    # mish(v) = v tanh(softplus(v)) = v n / (n + 2) with n = e^v (e^v + 2): one exp, one division
    e = tl.exp(tl.minimum(v, 20.0))
    n = e * (e + 2.0)
    return tl.where(v > 20.0, v, v * n / (n + 2.0))


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        r = tl.dot(a, b, acc, input_precision="ieee")
    else:
        r = tl.dot(a, b, acc)
    return r


@triton.jit
def _row(ptr, ch, cmask, LP: tl.constexpr):
    """A per-channel vector at ``ptr + ch``, read as an ``(LP, BK)`` tile whose rows are all the
    same: loaded straight in the layout of the activation tile. (A vector loaded on its own
    would be moved into that layout through shared memory, after waiting for the load.)"""
    rows = tl.arange(0, LP)
    return tl.load(ptr + ch[None, :] + rows[:, None] * 0, mask=cmask[None, :] & (rows < LP)[:, None], other=0.0)


@triton.jit
def _partials(src, NS: tl.constexpr, bias, HAS_BIAS: tl.constexpr, b, B, L, C, c0,
              LP: tl.constexpr, BK: tl.constexpr, SPC: tl.constexpr):
    """Rows ``[0, LP)`` x channels ``[c0, c0 + BK)`` of batch row ``b`` of ``src`` ``(NS, B, L, C)``
    summed over its ``NS`` partial sums, plus ``bias``; float32, zero outside ``L`` rows and ``C``
    channels. The loads of ``SPC`` partial sums at a time are issued together, before any add."""
    rows = tl.arange(0, LP)
    ch = c0 + tl.arange(0, BK)
    cmask = ch < C
    m = (rows < L)[:, None] & cmask[None, :]
    off = (b * L + rows)[:, None] * C + ch[None, :]
    v = tl.zeros((LP, BK), dtype=tl.float32)
    if HAS_BIAS:
        v += _row(bias, ch, cmask, LP)
    for first in tl.static_range(0, NS, SPC):
        parts = ()
        for j in tl.static_range(SPC):
            if first + j < NS:
                parts = parts + (tl.load(src + (first + j) * B * L * C + off, mask=m, other=0.0),)
        for j in tl.static_range(len(parts)):
            v += parts[j].to(tl.float32)
    return tl.where(m, v, 0.0)


@triton.jit
def _input_tile(src, NS: tl.constexpr, src_bias, SRC_BIAS: tl.constexpr, b, B, c0, L, C,
                gamma, beta, eps, film_t, film_p, film_w, film_off, step,
                res, RES_NS: tl.constexpr, res_bias, RES_BIAS: tl.constexpr, mat, write_mat,
                NORM: tl.constexpr, FILM: tl.constexpr, RES: tl.constexpr, MAT: tl.constexpr,
                CG: tl.constexpr, LP: tl.constexpr, BK: tl.constexpr, SPC: tl.constexpr,
                RES_SPC: tl.constexpr):
    """The input's rows ``[0, LP)`` x channels ``[c0, c0 + BK)`` of batch row ``b``, finished:
    partial sums added, then (``NORM``) GroupNorm over the slice's whole groups of ``CG``
    channels, Mish, FiLM, residual. Float32, zero outside ``L`` rows and ``C`` channels.
    Every load is issued before the first reduction: a reduction synchronises the program's
    warps, and no load is moved across that."""
    rows = tl.arange(0, LP)
    ch = c0 + tl.arange(0, BK)
    m = (rows < L)[:, None] & (ch < C)[None, :]
    v = _partials(src, NS, src_bias, SRC_BIAS, b, B, L, C, c0, LP, BK, SPC)
    if NORM:
        cmask = ch < C
        gam = _row(gamma, ch, cmask, LP)
        bet = _row(beta, ch, cmask, LP)
        if FILM:
            t_row = film_t + step * film_w + film_off
            p_row = film_p + b * film_w + film_off
            scale = _row(t_row, ch, cmask, LP) + _row(p_row, ch, cmask, LP)
            shift = _row(t_row + C, ch, cmask, LP) + _row(p_row + C, ch, cmask, LP)
        if RES:
            r = _partials(res, RES_NS, res_bias, RES_BIAS, b, B, L, C, c0, LP, BK, RES_SPC)
        G: tl.constexpr = BK // CG
        n = (L * CG).to(tl.float32)
        v3 = tl.reshape(v, (LP, G, CG))
        mean = tl.sum(tl.sum(v3, axis=2), axis=0) / n
        d = tl.where((rows < L)[:, None, None], v3 - mean[None, :, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(d * d, axis=2), axis=0) / n + eps)
        v = tl.reshape(d * rstd[None, :, None], (LP, BK))
        v = _mish(v * gam + bet)
        if FILM:
            v = v * scale + shift
        if RES:
            v += r
        v = tl.where(m, v, 0.0)
    if MAT:
        tl.store(mat + (b * L + rows)[:, None] * C + ch[None, :], v, mask=m & write_mat)
    return v


@triton.jit
def _conv_slice(v, taps, L_in, L_out, KT: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                TRANSPOSED: tl.constexpr, LP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                BN: tl.constexpr, IEEE: tl.constexpr):
    """The convolution ``(BM output rows, BN)`` of the input slice ``v`` ``(LP, BK)`` with the
    taps' weights ``taps[t]`` ``(BK, BN)``: per tap, the rows it reads, gathered, times its
    weights. Output row o reads input row ``o STRIDE + t - PAD`` (transposed: the row j with
    ``j STRIDE + t - PAD = o``)."""
    o = tl.arange(0, BM)
    v = v.to(taps[0].dtype)
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
        r = tl.minimum(tl.maximum(r, 0), LP - 1)
        rows = tl.gather(v, tl.broadcast_to(r[:, None], (BM, BK)), axis=0)
        rows = tl.where(ok[:, None], rows, tl.zeros_like(rows))
        acc = _dot(rows, taps[t], acc, IEEE)
    return acc


@triton.jit
def _weights(wslab, KT: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
    """The taps' weight blocks ``(BK, BN)`` of one program, from its contiguous slab ``(BK, KT
    BN)`` (every tap side by side)."""
    kk = tl.arange(0, BK)
    j = tl.arange(0, BN)
    taps = ()
    for t in tl.static_range(KT):
        taps = taps + (tl.load(wslab + kk[:, None] * (KT * BN) + t * BN + j[None, :]),)
    return taps


@triton.jit
def _tile(taps, dst, n, b, s, c0, a, a_bias, gamma, beta, eps, film_t, film_p, film_w, film_off, step,
          res, res_bias, mat, write_mat, bsrc, bias, x, u_a0, u_a1, u_cx, u_c0, u_co, u_clip,
          B, L_in, L_out, CA, CB, CA_PAD, O,
          A_SPLIT: tl.constexpr, A_BIAS: tl.constexpr, NORM: tl.constexpr, FILM: tl.constexpr,
          RES: tl.constexpr, RES_SPLIT: tl.constexpr, RES_BIAS: tl.constexpr, MAT: tl.constexpr,
          HAS_B: tl.constexpr, FINAL: tl.constexpr, UPDATE: tl.constexpr, PDL: tl.constexpr,
          KT: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, TRANSPOSED: tl.constexpr,
          CG: tl.constexpr, LP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
          SPC: tl.constexpr, RES_SPC: tl.constexpr, IEEE: tl.constexpr):
    """Steps 2-4 of one program, once its weights ``taps`` are in flight."""
    if PDL:
        gdc_wait()  # every earlier kernel has finished and its writes are visible
    if HAS_B:
        if c0 >= CA_PAD:  # the concatenated second input: a finished buffer
            v = _input_tile(bsrc, 1, bias, False, b, B, c0 - CA_PAD, L_in, CB,
                            gamma, beta, eps, film_t, film_p, film_w, film_off, step,
                            res, 1, bias, False, mat, False, False, False, False, False, CG, LP, BK, 1, 1)
        else:
            v = _input_tile(a, A_SPLIT, a_bias, A_BIAS, b, B, c0, L_in, CA,
                            gamma, beta, eps, film_t, film_p, film_w, film_off, step,
                            res, RES_SPLIT, res_bias, RES_BIAS, mat, write_mat,
                            NORM, FILM, RES, MAT, CG, LP, BK, SPC, RES_SPC)
    else:
        v = _input_tile(a, A_SPLIT, a_bias, A_BIAS, b, B, c0, L_in, CA,
                        gamma, beta, eps, film_t, film_p, film_w, film_off, step,
                        res, RES_SPLIT, res_bias, RES_BIAS, mat, write_mat,
                        NORM, FILM, RES, MAT, CG, LP, BK, SPC, RES_SPC)
    acc = _conv_slice(v, taps, L_in, L_out, KT, STRIDE, PAD, TRANSPOSED, LP, BM, BK, BN, IEEE)
    o = tl.arange(0, BM)
    m = (o < L_out)[:, None] & (n < O)[None, :]
    if FINAL:  # one slice: the whole convolution; its bias, then the sampler's step on the chunk x
        off = (b * L_out + o)[:, None] * O + n[None, :]
        y = acc + tl.load(bias + n)[None, :]
        if UPDATE:
            xv = tl.load(x + off, mask=m, other=0.0)
            x0 = tl.minimum(tl.maximum(u_a0 * xv + u_a1 * y, -u_clip), u_clip)
            y = u_cx * xv + u_c0 * x0 + u_co * y
        tl.store(dst + off, y, mask=m)
    else:
        tl.store(dst + ((s * B + b) * L_out + o)[:, None] * O + n[None, :], acc, mask=m)
    if PDL == 2:
        gdc_launch_dependents()  # the next kernel may start reading its weights


@triton.jit(do_not_specialize=["step"])
def conv_kernel(
    a, a_bias, gamma, beta, eps,
    film_t, film_p, film_w, film_off, step,
    res, res_bias, mat, bsrc, w, ws,
    out, skip_out, bias, x, u_a0, u_a1, u_cx, u_c0, u_co, u_clip,
    B, L_in, L_out, NT,
    CA: tl.constexpr, CB: tl.constexpr, CA_PAD: tl.constexpr, CB_PAD: tl.constexpr, O: tl.constexpr,
    A_SPLIT: tl.constexpr, A_BIAS: tl.constexpr, NORM: tl.constexpr, FILM: tl.constexpr,
    RES: tl.constexpr, RES_SPLIT: tl.constexpr, RES_BIAS: tl.constexpr, MAT: tl.constexpr,
    HAS_B: tl.constexpr, HAS_SKIP: tl.constexpr, FINAL: tl.constexpr, UPDATE: tl.constexpr,
    KT: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, TRANSPOSED: tl.constexpr,
    CG: tl.constexpr, LP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
    BN: tl.constexpr, SPC: tl.constexpr, RES_SPC: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
):
    """Program (b, nt, s): batch row b, output tile nt (past NT: the skip convolution's tiles),
    input channels [s BK, (s + 1) BK). Writes that slice's partial sum of the tile to slot s of
    ``out`` ``(SPLIT, B, L_out, O)`` (or ``skip_out`` ``(SPLIT, B, L_in, O)``); the last layer
    (``FINAL``, one slice) writes the network's output ``(B, L_out, O)``, or with ``UPDATE`` the
    sampler's next chunk."""
    if PDL == 1:
        gdc_launch_dependents()  # the next kernel may start reading its weights
    b = tl.program_id(0)
    nt = tl.program_id(1)
    s = tl.program_id(2)
    c0 = s * BK
    CIN: tl.constexpr = CA_PAD + CB_PAD
    if nt < NT:  # the convolution
        taps = _weights(w + (nt * CIN + c0) * (KT * BN), KT, BK, BN)
        _tile(taps, out, nt * BN + tl.arange(0, BN), b, s, c0, a, a_bias, gamma, beta, eps,
              film_t, film_p, film_w, film_off, step, res, res_bias, mat, nt == 0, bsrc, bias, x,
              u_a0, u_a1, u_cx, u_c0, u_co, u_clip, B, L_in, L_out, CA, CB, CA_PAD, O,
              A_SPLIT, A_BIAS, NORM, FILM, RES, RES_SPLIT, RES_BIAS, MAT, HAS_B, FINAL, UPDATE, PDL,
              KT, STRIDE, PAD, TRANSPOSED, CG, LP, BM, BK, BN, SPC, RES_SPC, IEEE)
    else:
        if HAS_SKIP:  # the block's 1x1 skip convolution, from the same input (length preserving)
            taps1 = _weights(ws + ((nt - NT) * CIN + c0) * BN, 1, BK, BN)
            _tile(taps1, skip_out, (nt - NT) * BN + tl.arange(0, BN), b, s, c0, a, a_bias, gamma, beta, eps,
                  film_t, film_p, film_w, film_off, step, res, res_bias, mat, False, bsrc, bias, x,
                  u_a0, u_a1, u_cx, u_c0, u_co, u_clip, B, L_in, L_in, CA, CB, CA_PAD, O,
                  A_SPLIT, A_BIAS, NORM, FILM, RES, RES_SPLIT, RES_BIAS, MAT, HAS_B, False, False, PDL,
                  1, 1, 0, False, CG, LP, BM, BK, BN, SPC, RES_SPC, IEEE)
