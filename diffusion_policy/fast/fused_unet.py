"""The UNet's tokens layout as one Triton kernel per convolution (``FastPredictor(fused=True)``).

The compiled tokens layout (``diffusion_policy.fast.tokens``) runs about 60 kernels per network
call at batch 1: a matrix product per convolution, then a kernel for its shifted sum, GroupNorm,
Mish, FiLM and residual add. Each costs a few microseconds of launch and latency, far more than
its arithmetic. Here a convolution is one kernel (``diffusion_policy.fast.fused_kernels``): a
convolution leaves one partial sum per slice of its input channels, and the work that follows it
(adding those sums and the bias, GroupNorm over the consumer's own slice of whole groups, Mish,
FiLM, the residual) runs while the *next* convolution loads its input; the sampler's step runs in
the last layer's epilogue. A network call is 30 kernels for the default UNet, about half the
compiled layout's (latencies in ``benchmarks/sampling.md``).

Each batch row's programs stream all the weights, so the path pays at batch 1 and ties at batch
2; ``FastPredictor`` takes it up to ``UnetSampler.fused_max_batch`` rows (2) and the tokens
layout above (``benchmarks/sampling.md``).

:class:`FusedUnet` walks the network once per horizon (as the tokens trunk does) and records each
convolution's launch: which buffer it reads, how that input is finished, which buffers it writes.
The weights are rearranged per tile of 16 output channels (32 in layers of 1024 channels) into
contiguous blocks when it is built; its owner (``diffusion_policy.fast.runner.UnetSampler``)
builds a new one when a parameter changes. It needs CUDA and Triton (the tests also run it in
Triton's CPU interpreter), GroupNorm groups of a power of two >= 16 channels (a clear error
otherwise), and the UNet's own layer shapes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_policy.fast.tokens import film_blocks

BN = 16  # the fewest output channels per program (the smallest tile of a tensor-core product)
# programmatic dependent launch: off; the next kernel launched as each program starts; as it ends
PDL_MODES = {"off": 0, "early": 1, "late": 2}


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, (n - 1).bit_length()))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass
class _Act:
    """An activation ``(B, L, C)``: buffer ``buf`` holding ``split`` partial sums ``(split, B, L, C)``
    (a convolution's output, one per channel slice of its producer; ``bias`` still to add) or,
    with ``split`` 1 and no bias, the activation itself. ``norm``: ``(GroupNorm, FiLM block index
    or None, residual _Act or None)`` when its consumer must still apply them (then Mish too).
    ``mat``: a buffer its consumer writes the finished activation to (a later layer needs it)."""
    buf: str
    L: int
    C: int
    split: int = 1
    bias: torch.Tensor | None = None
    norm: tuple | None = None
    mat: str | None = None

    @property
    def finished(self) -> bool:
        return self.split == 1 and self.bias is None and self.norm is None


@dataclass
class _Launch:
    a: _Act
    b: str | None  # a second input concatenated after ``a`` (an up level's skip connection)
    w: torch.Tensor  # (NT, CA_PAD + CB_PAD, KT, BN): BN output channels per program
    bias: torch.Tensor  # (NT * BN,) float32
    out: str
    L_out: int
    O: int
    ws: torch.Tensor | None = None  # the 1x1 skip convolution: (NTS, CA_PAD + CB_PAD, 1, BN)
    bs: torch.Tensor | None = None
    skip_out: str | None = None
    split: int = 1  # programs per output tile: one per slice of input channels
    update: bool = False
    consts: dict = field(default_factory=dict)


def _tiles(w: torch.Tensor, parts: list[tuple[int, int]], dtype: torch.dtype, bn: int) -> torch.Tensor:
    """A convolution weight ``(O, C, k)`` as ``(NT, C_PAD, k, bn)``: the program of output tile
    ``nt`` and a slice of input channels reads one contiguous block, every tap side by side.
    ``parts``: the input channels' ``(count, padded count)`` per input."""
    O, C, k = w.shape
    wt = w.permute(2, 1, 0)  # (k, C, O)
    chunks, start = [], 0
    for count, padded in parts:
        chunks.append(F.pad(wt[:, start : start + count], (0, 0, 0, padded - count)))
        start += count
    wt = F.pad(torch.cat(chunks, dim=1), (0, _round_up(O, bn) - O))  # (k, C_PAD, NT * bn)
    return wt.unflatten(2, (-1, bn)).permute(2, 1, 0, 3).contiguous().to(dtype)


def _bias(b: torch.Tensor | None, O: int, device: torch.device, bn: int) -> torch.Tensor:
    b = torch.zeros(O, device=device) if b is None else b.detach().float()
    return F.pad(b, (0, _round_up(O, bn) - O)).contiguous()


class FusedUnet:
    """Plans and runs the fused sampling path of one :class:`ConditionalUnet1D`. ``block_k``: the
    most input channels one program reads when its input needs no GroupNorm (with GroupNorm: one
    group); ``num_warps`` per program; ``pdl``: programmatic dependent launch (Hopper and later;
    all measured in ``benchmarks/fused_profile.py``)."""

    block_k = 128
    num_warps = 4
    block_n_wide = 32  # output channels per program in layers of wide_channels or more (else 16)
    wide_channels = 1024
    partials = torch.float32  # the dtype of the convolutions' partial sums
    pdl = "late"
    max_tile = 4096  # most float32 elements of one program's input slice (rows x channels)

    def __init__(self, net):
        self.net = net
        self.dtype = net.final[1].weight.dtype
        blocks = film_blocks(net)
        for gn in [m for m in net.modules() if isinstance(m, nn.GroupNorm)]:
            cg = gn.num_channels // gn.num_groups
            if cg < BN or cg & (cg - 1):
                raise ValueError(f"the fused sampling path needs GroupNorm groups of a power of two >= {BN} "
                                 f"channels; this UNet has groups of {cg} ({gn.num_channels} channels in "
                                 f"{gn.num_groups} groups): use FastPredictor without fused=True")
        # every block's FiLM linear, concatenated: one product per chunk for the time table and
        # one for the observation part
        lin = [blk.film[1] for blk in blocks]
        w_all = torch.cat([l.weight for l in lin]).detach()
        self.time_dim = w_all.shape[1] - net.cond_dim
        self.film_wt = w_all[:, : self.time_dim].contiguous()
        self.film_wc = w_all[:, self.time_dim :].contiguous()
        self.film_b = torch.cat([l.bias for l in lin]).detach()
        self.film_offsets = [0]
        for l in lin:
            self.film_offsets.append(self.film_offsets[-1] + l.out_features)
        # GroupNorm's affine parameters in float32 (the kernel's arithmetic)
        self._gn = {id(m): (m.weight.detach().float().contiguous(), m.bias.detach().float().contiguous())
                    for m in net.modules() if isinstance(m, nn.GroupNorm)}
        self._plans: dict[int, tuple[list[_Launch], dict]] = {}
        self._buffers: dict[tuple, dict] = {}
        self._time_tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # ---------------------------------------------------------------------------- planning
    def _plan(self, H: int) -> tuple[list[_Launch], dict]:
        """The launches for horizon ``H`` and the buffers they use (name -> shape, ``B`` for the
        batch size)."""
        if H not in self._plans:
            self._launches: list[_Launch] = []
            self._shapes: dict[str, tuple] = {}
            self._walk(H)
            self._plans[H] = (self._launches, self._shapes)
        return self._plans[H]

    def _buffer(self, name: str, *shape) -> str:
        name = f"{name}{len(self._shapes)}"
        self._shapes[name] = shape
        return name

    def _materialize(self, h: _Act) -> _Act:
        """``h`` as a finished buffer (written by ``h``'s consumer unless ``h`` is finished)."""
        if h.finished:
            return h
        if h.mat is None:
            h.mat = self._buffer("act", "B", h.L, h.C)
        return _Act(h.mat, h.L, h.C)

    def _conv(self, conv: nn.Module, h: _Act, *, extra: _Act | None = None, gn: nn.GroupNorm | None = None,
              skip: nn.Conv1d | None = None, update: bool = False) -> tuple[_Launch, _Act]:
        transposed = isinstance(conv, nn.ConvTranspose1d)
        k, stride, pad = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        w = conv.weight.detach()
        if transposed:
            if conv.output_padding[0] != 0 or conv.dilation[0] != 1:
                raise ValueError(f"the fused sampling path handles ConvTranspose1d without output padding or "
                                 f"dilation; got output_padding={conv.output_padding[0]}, "
                                 f"dilation={conv.dilation[0]}")
            w = w.transpose(0, 1)  # (C, O, k) -> (O, C, k)
            L_out = (h.L - 1) * stride - 2 * pad + k
        else:
            if conv.dilation[0] != 1 or conv.groups != 1:
                raise ValueError(f"the fused sampling path handles plain Conv1d layers (dilation 1, groups 1); "
                                 f"got dilation={conv.dilation[0]}, groups={conv.groups}")
            L_out = (h.L + 2 * pad - k) // stride + 1
        O = w.shape[0]
        CA, CB = h.C, (extra.C if extra is not None else 0)
        # rows of the input tile: a tile of fewer elements than the program has threads crashes a
        # Triton 3.6 pass (thread locality)
        LP = _pow2(h.L, 1)
        cg_in = h.norm[0].num_channels // h.norm[0].num_groups if h.norm is not None else BN
        if update:  # the last layer: one slice of every input channel, so the program can finish
            BK = _pow2(CA + CB)
        elif h.norm is not None:
            BK = cg_in  # a slice holds one whole GroupNorm group: its statistics are its own
        else:
            BK = min(self.block_k, _pow2(CA))
            while CA % BK and BK > 16:
                BK //= 2
        LP = max(LP, _pow2(-(-32 * self.num_warps // BK), 1))
        parts = [(CA, _round_up(CA, BK)), (CB, _round_up(CB, BK))]
        split = (parts[0][1] + parts[1][1]) // BK  # programs per output tile, one per channel slice
        bn = self.block_n_wide if max(CA, CB, O) >= self.wide_channels else BN
        launch = _Launch(
            a=h, b=None if extra is None else self._materialize(extra).buf,
            w=_tiles(w, parts, self.dtype, bn), bias=_bias(conv.bias, O, w.device, bn),
            out=self._buffer("out", *(() if update else (split,)), "B", L_out, O), L_out=L_out, O=O,
            split=split, update=update)
        if skip is not None:
            launch.ws = _tiles(skip.weight.detach(), parts, self.dtype, bn)
            launch.bs = _bias(skip.bias, O, w.device, bn)
            launch.skip_out = self._buffer("skip", split, "B", h.L, O)
        res = h.norm[2] if h.norm is not None else None
        launch.consts = dict(
            CA=CA, CB=CB, CA_PAD=parts[0][1], CB_PAD=parts[1][1], O=O,
            A_SPLIT=h.split, A_BIAS=h.bias is not None, NORM=h.norm is not None,
            FILM=h.norm is not None and h.norm[1] is not None, RES=res is not None,
            RES_SPLIT=res.split if res is not None else 1, RES_BIAS=res is not None and res.bias is not None,
            HAS_B=extra is not None, HAS_SKIP=skip is not None,
            # partial sums read per load: as many as fit max_tile elements
            SPC=self._chunk(h.split, LP * BK), RES_SPC=self._chunk(res.split if res is not None else 1, LP * BK),
            KT=k, STRIDE=stride, PAD=pad, TRANSPOSED=transposed, CG=cg_in,
            LP=LP, BM=_pow2(max(h.L, L_out)), BK=BK, BN=bn, IEEE=self.dtype == torch.float32)
        self._launches.append(launch)
        out = _Act(launch.out, L_out, O, split=1 if update else split, bias=None if update else launch.bias)
        if gn is not None:
            out.norm = (gn, None, None)
        return launch, out

    def _chunk(self, split: int, tile: int) -> int:
        """How many of ``split`` partial sums of ``tile`` elements one load reads."""
        n = 1
        while n < split and 2 * n * tile <= self.max_tile:
            n *= 2
        return n

    def _block(self, blk, h: _Act, film: int, extra: _Act | None = None) -> _Act:
        """One FiLM residual block: two launches; returns its output, pending (finished by the
        next convolution)."""
        (conv1, gn1, _), (conv2, gn2, _) = blk.conv1.block, blk.conv2.block
        if isinstance(blk.skip, nn.Identity):
            if extra is not None:
                raise ValueError("a block with a concatenated input needs a 1x1 skip convolution")
            residual = self._materialize(h)
            _, a = self._conv(conv1, h, gn=gn1)
        else:
            launch, a = self._conv(conv1, h, extra=extra, gn=gn1, skip=blk.skip)
            residual = _Act(launch.skip_out, h.L, launch.O, split=launch.split, bias=launch.bs)
        a.norm = (gn1, film, None)
        _, out = self._conv(conv2, a, gn=gn2)
        out.norm = (gn2, None, residual)
        return out

    def _walk(self, H: int) -> None:
        net = self.net
        h = _Act("x", H, net.action_dim)
        films = iter(range(len(self.film_offsets) - 1))
        skips = []
        n_skips = len(net.ups)
        for li, (res1, res2, down) in enumerate(net.downs):
            h = self._block(res1, h, next(films))
            h = self._block(res2, h, next(films))
            if li >= len(net.downs) - n_skips:  # an up level concatenates this output
                skips.append(self._materialize(h))
            if not isinstance(down, nn.Identity):
                _, h = self._conv(down, h)
        for res in net.mids:
            h = self._block(res, h, next(films))
        for res1, res2, up in net.ups:
            h = self._block(res1, h, next(films), extra=skips.pop())
            h = self._block(res2, h, next(films))
            _, h = self._conv(up, h)
        (conv, gn, _) = net.final[0].block
        _, h = self._conv(conv, h, gn=gn)
        self._conv(net.final[1], h, update=True)

    # ----------------------------------------------------------------------------- running
    def _time_table(self, times: torch.Tensor) -> torch.Tensor:
        """Every block's FiLM part that depends on the time alone, ``(S, sum 2C)`` float32 for
        the network times ``times (S,)``. Kept for the ``times`` tensor itself (a sampling plan's
        ``times``, which the method keeps per steps and device): the same tensor object gets the same
        table without a kernel, so such a tensor must not be modified in place. Not kept while a
        CUDA graph is being captured (the table is then filled only when the graph replays)."""
        hit = self._time_tables.get(id(times))
        if hit is not None and hit[0] is times:
            return hit[1]
        net = self.net
        sinusoid, mlp = net.time_mlp.net[0], net.time_mlp.net[1:]
        t_emb = mlp(sinusoid(times.reshape(-1).float()).to(self.dtype))
        table = (F.mish(t_emb) @ self.film_wt.t()).float().contiguous()
        if not (times.is_cuda and torch.cuda.is_current_stream_capturing()):
            if len(self._time_tables) >= 16:
                self._time_tables.pop(next(iter(self._time_tables)))
            self._time_tables[id(times)] = (times, table)  # the reference keeps id(times) unique
        return table

    def _state(self, H: int, B: int, device: torch.device) -> tuple[list[_Launch], dict]:
        """The launches for horizon ``H`` and their buffers for ``B`` rows, kept across chunks."""
        key = (H, B, str(device))
        if key not in self._buffers:
            launches, shapes = self._plan(H)
            self._buffers[key] = {
                n: torch.empty([B if d == "B" else d for d in shape], device=device,
                               dtype=self.partials if n.startswith(("out", "skip")) else torch.float32)
                for n, shape in shapes.items()}
        return self._plan(H)[0], self._buffers[key]

    def prepare(self, cond: torch.Tensor, times: torch.Tensor, update=None):
        """As ``TokensUnet.prepare``: ``f(x, i)`` -> the network's output at ``times[i]``, or the
        sampler's next chunk with ``update``."""
        from diffusion_policy.fast.fused_kernels import conv_kernel

        net = self.net
        B = cond.shape[0]
        cond = cond.reshape(B, -1)
        if cond.shape[1] != net.cond_dim:
            raise ValueError(f"cond flattens to {cond.shape[1]} features, expected {net.cond_dim}")
        dev = cond.device
        film_t = self._time_table(times if times.device == dev else times.to(dev))  # (S, sum 2C)
        film_p = F.linear(F.mish(cond.to(self.dtype)), self.film_wc, self.film_b).float().contiguous()
        pdl = (PDL_MODES[self.pdl] if dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 9
               and os.environ.get("TRITON_INTERPRET") != "1" else 0)
        rows = None if update is None else update.rows

        def f(x: torch.Tensor, i: int) -> torch.Tensor:
            if x.ndim != 3 or x.shape[0] != B or x.shape[2] != net.action_dim:
                raise ValueError(f"x has shape {tuple(x.shape)}, expected ({B}, H, {net.action_dim})")
            H = x.shape[1]
            net.check_horizon(H)
            launches, bufs = self._state(H, B, dev)
            bufs = dict(bufs)
            bufs["x"] = x = x.float().contiguous()
            out = torch.empty_like(x)  # the result is the caller's: a fresh tensor every call
            bufs[launches[-1].out] = out
            u = rows[i] if rows is not None else None
            for ln in launches:
                self._launch(conv_kernel, ln, bufs, B, i, u, film_t, film_p, pdl)
            return out

        return f

    def _launch(self, kernel, ln: _Launch, bufs: dict, B: int, i: int, u, film_t, film_p, pdl: bool) -> None:
        """Run one launch at step ``i``; ``u``: the sampler's update row (for the last layer) or None;
        ``pdl``: launch it as a programmatic dependent of the kernel before it."""
        a = ln.a
        gn, film, res = a.norm if a.norm is not None else (None, None, None)
        gamma, beta = self._gn[id(gn)] if gn is not None else (ln.bias, ln.bias)
        nt = ln.w.shape[0]
        ntt = nt + (0 if ln.ws is None else ln.ws.shape[0])
        out = bufs[ln.out]
        kernel[(B, ntt, ln.split)](
            bufs[a.buf], a.bias if a.bias is not None else ln.bias, gamma, beta,
            float(gn.eps) if gn is not None else 0.0,
            film_t, film_p, film_t.shape[1], self.film_offsets[film] if film is not None else 0, i,
            bufs[res.buf] if res is not None else out,
            res.bias if res is not None and res.bias is not None else ln.bias,
            bufs[a.mat] if a.mat else out, bufs[ln.b] if ln.b else out, ln.w,
            ln.ws if ln.ws is not None else ln.w,
            out, bufs[ln.skip_out] if ln.skip_out else out, ln.bias,
            bufs["x"], *(u or (0.0,) * 6), B, a.L, ln.L_out, nt,
            MAT=a.mat is not None, FINAL=ln.update, UPDATE=ln.update and u is not None, **ln.consts, PDL=pdl,
            num_warps=self.num_warps, **({"launch_pdl": True} if pdl else {}))
