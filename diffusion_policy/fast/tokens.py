"""The UNet's forward arranged for a sampler's loop at small batch (the "tokens" layout).

The same function as ``ConditionalUnet1D.forward`` (tests check it on random weights), cheaper
when it is called S times with one condition, because of two facts:
- FiLM is affine in ``Mish(g)`` and ``g = [time embedding, observations]``, so every block's scale
  and bias split into a time part (a table over the sampler's S times, computed once per chunk)
  and an observation part (computed once per chunk); a step only adds the two rows it needs. The
  time MLP and every FiLM linear leave the per-step loop.
- Every convolution runs as one matrix product of the activations ``(B, L, C)`` with all its
  taps side by side (``(C, k * O)``), followed by a shifted sum of the k tap outputs. At batch 1 a
  convolution's output is a few thousand numbers (e.g. 1024 channels x 4 steps): a direct
  convolution kernel then runs on a handful of GPU cores while it streams megabytes of weights,
  whereas a wide matrix product with few rows spreads over the whole chip. The shifted sum, the
  bias, GroupNorm, Mish, FiLM and the residual add are elementwise or per-group work that a
  compiler fuses into one kernel after each product; a 1x1 skip convolution rides along in the
  product of the block's first convolution (its columns appended to the taps). The transposed
  (upsampling) convolution is the same product with even and odd outputs gathered from its taps.
  Per step and block: two matrix products and two fused kernels.
A sampler step that is a fixed formula (``StepUpdate``: DDIM with eta = 0, flow Euler) runs right
after the last layer, in the same compiled kernel.

The layout pays off once its small kernels are fused and launched together: compiled
(:meth:`TokensUnet.compile`) or captured in a CUDA graph (``FastPredictor``). Run op by op it is
more, smaller kernels than ``forward``, which is why the reference loop (``Policy.predict``) calls
``forward`` (figures in ``benchmarks/sampling.md``).

:class:`TokensUnet` keeps what it derives from the network (the rearranged weights, until a
parameter changes; the step indices) and never writes into the network.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_policy.nets.unet1d import ConditionalUnet1D, ConvBlock, FiLMResBlock
from diffusion_policy.step_update import StepUpdate


def film_blocks(net: ConditionalUnet1D) -> list[FiLMResBlock]:
    """Every FiLM block of ``net`` in the order its forward runs them."""
    return ([b for level in net.downs for b in level[:2]] + list(net.mids)
            + [b for level in net.ups for b in level[:2]])


def parameter_key(net: nn.Module) -> tuple:
    """Every parameter's storage, version counter, dtype and device: an optimizer step,
    ``load_state_dict`` or ``.to()`` changes one of them, so a cache keyed on it follows the weights."""
    return tuple((p.data_ptr(), p._version, p.dtype, str(p.device)) for p in net.parameters())


class TokensUnet:
    """The tokens layout of one :class:`ConditionalUnet1D`: :meth:`prepare` gives the per-step
    function of a sampler's loop."""

    def __init__(self, net: ConditionalUnet1D):
        if not isinstance(net, ConditionalUnet1D):
            raise TypeError(f"the tokens layout arranges a ConditionalUnet1D, got {type(net).__name__}")
        self.net = net
        self.compiled = None  # the per-step trunk through torch.compile, when compile() was called
        self._weights: tuple | None = None  # (parameter_key, weights)
        self._index: dict[tuple[int, str], list[torch.Tensor]] = {}

    def compile(self, **kwargs) -> None:
        """Run the per-step trunk through ``torch.compile(**kwargs)`` (the tables run once per chunk)."""
        self.compiled = torch.compile(self.trunk, **kwargs)

    def prepare(self, cond: torch.Tensor, times: torch.Tensor, update: StepUpdate | None = None):
        """``f(x (B, H, Da), i) -> forward(x, times[i], cond)`` (float32) for a sampler that calls
        the network at the S times ``times (S,)`` with one condition ``(B, To, F)``. Everything that
        depends on the observations or the times alone is computed here, once. With ``update``,
        ``f`` returns the sampler's next chunk ``update.apply(x, forward(...), i)``, computed with
        the last layer."""
        net = self.net
        B = cond.shape[0]
        cond = cond.reshape(B, -1)
        if cond.shape[1] != net.cond_dim:
            raise ValueError(f"cond flattens to {cond.shape[1]} features, expected {net.cond_dim}")
        times = times.reshape(-1).to(cond.device, torch.float32)
        wdtype = net.final[1].weight.dtype
        sinusoid, mlp = net.time_mlp.net[0], net.time_mlp.net[1:]
        t_emb = mlp(sinusoid(times).to(wdtype))  # (S, time_embed_dim), in the weights' dtype
        time_dim = t_emb.shape[1]
        tables = [film_split(blk, time_dim, t_emb, cond.to(wdtype)) for blk in film_blocks(net)]
        weights = self.weights()
        index = self._indices(len(times), cond.device)
        trunk = self.compiled or self.trunk
        coefs = None if update is None else update.table.to(cond.device)

        def f(x: torch.Tensor, i: int) -> torch.Tensor:
            if x.shape[0] != B:
                raise ValueError(f"x has batch {x.shape[0]}, the condition has {B}")
            return trunk(x, index[i], tables, weights, coefs)

        return f

    def weights(self) -> dict:
        """:func:`sampling_weights` of the network, remade only when a parameter changed (see
        :func:`parameter_key`). Under autograd they are made afresh, uncached."""
        if torch.is_grad_enabled():
            return sampling_weights(self.net)
        key = parameter_key(self.net)
        if self._weights is None or self._weights[0] != key:
            self._weights = (key, sampling_weights(self.net))
        return self._weights[1]

    def _indices(self, n: int, device: torch.device) -> list[torch.Tensor]:
        """One ``(1,)`` long tensor per step on ``device``, made once: the trunk selects its FiLM
        row with a device index (no host-to-device copy per step, one compiled graph for all i)."""
        key = (n, str(device))
        if key not in self._index:
            self._index[key] = [torch.full((1,), i, dtype=torch.long, device=device) for i in range(n)]
        return self._index[key]

    def trunk(self, x: torch.Tensor, index: torch.Tensor, tables: list, weights: dict,
              coefs: torch.Tensor | None = None) -> torch.Tensor:
        """One network call: ``x (B, H, Da)`` -> ``(B, H, Da)`` float32; with ``coefs`` (a
        StepUpdate's table) the sampler's next chunk instead of the output."""
        net = self.net
        B, H, Da = x.shape
        if Da != net.action_dim:
            raise ValueError(f"x has {Da} action dims, the UNet was built for {net.action_dim}")
        net.check_horizon(H)
        films = iter([tab.index_select(0, index) + part for tab, part in tables])  # (B, 2C) each
        blocks = iter(weights["blocks"])
        downs = iter(weights["down"])
        h = x.float()  # (B, L, C): time along dim 1; float32 between the matrix products
        skips = []
        for res1, res2, down in net.downs:
            h = res_block_tokens(res1, h, next(films), next(blocks))
            h = res_block_tokens(res2, h, next(films), next(blocks))
            skips.append(h)
            if not isinstance(down, nn.Identity):
                h = shift_add(mm(h, next(downs)), down.kernel_size[0], down.padding[0], down.stride[0], down.bias)
        for res in net.mids:
            h = res_block_tokens(res, h, next(films), next(blocks))
        for (res1, res2, up), w in zip(net.ups, weights["up"]):
            h = torch.cat([h, skips.pop()], dim=-1)
            h = res_block_tokens(res1, h, next(films), next(blocks))
            h = res_block_tokens(res2, h, next(films), next(blocks))
            h = upsample_taps(mm(h, w), up.bias)
        h = conv_block_tokens(net.final[0], h, weights["final"])
        out = conv_tokens(h, net.final[1])
        return out if coefs is None else StepUpdate.apply_row(x, out, coefs.index_select(0, index))


def sampling_weights(net: ConditionalUnet1D) -> dict:
    """The convolution weights of ``net`` rearranged for the tokens layout (a copy of each)."""
    return {
        "blocks": [block_weights(blk) for blk in film_blocks(net)],
        "down": [tap_weight(level[2].weight) for level in net.downs if not isinstance(level[2], nn.Identity)],
        "up": [upsample_tap_weight(level[2]) for level in net.ups],
        "final": tap_weight(net.final[0].block[0].weight),
    }


# ---------------------------------------------------------------- the blocks on (B, L, C)
def film_split(blk: FiLMResBlock, time_dim: int, t_emb: torch.Tensor, cond: torch.Tensor):
    """``blk``'s FiLM linear map split over ``g = [t_emb, cond]``: ``(time table (S, 2C),
    observation part (B, 2C))``; the FiLM of ``(time i, row b)`` is ``table[i] + part[b]``."""
    lin = blk.film[1]
    w_t, w_c = lin.weight[:, :time_dim], lin.weight[:, time_dim:]
    return F.mish(t_emb) @ w_t.t(), F.linear(F.mish(cond), w_c, lin.bias)


def block_weights(blk: FiLMResBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """``(conv1 taps with the skip's columns appended (C, k O [+ O]), conv2 taps (O, k O))``."""
    w1 = tap_weight(blk.conv1.block[0].weight)
    if not isinstance(blk.skip, nn.Identity):
        w1 = torch.cat([w1, blk.skip.weight[:, :, 0].t()], dim=1)
    return w1, tap_weight(blk.conv2.block[0].weight)


def conv_block_tokens(block: ConvBlock, x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """``block`` (conv, GroupNorm, Mish) on ``(B, L, C)`` activations; ``taps = tap_weight(conv.weight)``."""
    conv, gn, _ = block.block
    y = mm(x, taps)
    return F.mish(group_norm_tokens(shift_add(y, conv.kernel_size[0], conv.padding[0], 1, conv.bias), gn))


def res_block_tokens(blk: FiLMResBlock, x: torch.Tensor, film: torch.Tensor, weights) -> torch.Tensor:
    """``blk.forward`` on ``(B, L, C)`` activations with its FiLM ``(B, 2C)`` and
    :func:`block_weights` given."""
    (conv1, gn1, _), (conv2, gn2, _) = blk.conv1.block, blk.conv2.block
    k, pad, O = conv1.kernel_size[0], conv1.padding[0], blk.out_ch
    y = mm(x, weights[0])  # (B, L, k O [+ O]): the taps of conv1, then the skip
    h = F.mish(group_norm_tokens(shift_add(y[..., : k * O], k, pad, 1, conv1.bias), gn1))
    scale, bias = film.float().unsqueeze(1).chunk(2, dim=-1)  # (B, 1, C) each
    h = scale * h + bias
    h = F.mish(group_norm_tokens(shift_add(mm(h, weights[1]), k, pad, 1, conv2.bias), gn2))
    skip = x if isinstance(blk.skip, nn.Identity) else y[..., k * O :] + blk.skip.bias.float()
    return h + skip


# ---------------------------------------------------------------- (B, L, C) building blocks
def mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w`` with the operands in the weight's dtype (bf16 for a bf16 copy) and the result in
    float32: the activations, shifted sums and norms stay float32 (a compiler fuses the casts)."""
    return (x.to(w.dtype) @ w).float()


def tap_weight(w: torch.Tensor) -> torch.Tensor:
    """A convolution weight ``(O, C, k)`` as ``(C, k O)``: column block ``j`` is tap ``j``."""
    O, C, k = w.shape
    return w.permute(1, 2, 0).reshape(C, k * O)


def shift_add(y: torch.Tensor, k: int, pad: int, stride: int, bias: torch.Tensor | None) -> torch.Tensor:
    """Finish a convolution from its tap products ``y = x @ tap_weight(w)`` ``(B, L, k O)``:
    ``out[l] = bias + sum_j y[stride l + j - pad, tap j]`` (zero outside ``[0, L)``: the padding)."""
    B, L, kO = y.shape
    y = y.unflatten(-1, (k, kO // k))
    yp = F.pad(y, (0, 0, 0, 0, pad, pad))  # pad the time axis
    L_out = (L + 2 * pad - k) // stride + 1
    stop = stride * (L_out - 1) + 1
    out = yp[:, 0:stop:stride, 0]
    for j in range(1, k):
        out = out + yp[:, j : j + stop : stride, j]
    return out if bias is None else out + bias.float()


def upsample_tap_weight(up: nn.ConvTranspose1d) -> torch.Tensor:
    """The weight ``(C, O, 4)`` of ``up`` (kernel 4, stride 2, padding 1) as ``(C, 4 O)``."""
    if (up.kernel_size[0], up.stride[0], up.padding[0], up.output_padding[0]) != (4, 2, 1, 0):
        raise ValueError("the tokens layout handles ConvTranspose1d(kernel 4, stride 2, padding 1) only")
    C, O, k = up.weight.shape
    return up.weight.permute(0, 2, 1).reshape(C, k * O)


def upsample_taps(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Finish the transposed convolution (kernel 4, stride 2, padding 1) from ``y = x @
    upsample_tap_weight(up)`` ``(B, L, 4 O)``: output ``2m`` is ``x[m] W_1 + x[m-1] W_3`` and
    output ``2m+1`` is ``x[m+1] W_0 + x[m] W_2``; returns ``(B, 2L, O)``."""
    B, L, kO = y.shape
    yp = F.pad(y.unflatten(-1, (4, kO // 4)), (0, 0, 0, 0, 1, 1))  # yp[i] = y[i - 1]
    even = yp[:, 1 : L + 1, 1] + yp[:, 0:L, 3]
    odd = yp[:, 2 : L + 2, 0] + yp[:, 1 : L + 1, 2]
    out = torch.stack([even, odd], dim=2).reshape(B, 2 * L, kO // 4)
    return out if bias is None else out + bias.float()


def conv_tokens(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """``conv`` applied to ``x (B, L, C)`` -> ``(B, L', O)`` through its tap products."""
    k, stride, pad = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    return shift_add(mm(x, tap_weight(conv.weight)), k, pad, stride, conv.bias)


def group_norm_tokens(x: torch.Tensor, gn: nn.GroupNorm) -> torch.Tensor:
    """``gn`` on ``(B, L, C)`` activations: statistics per row and group over (time, channels of
    the group); float32 out whatever the activations' dtype."""
    B, L, C = x.shape
    G = gn.num_groups
    xf = x.float().view(B, L, G, C // G)
    var, mean = torch.var_mean(xf, dim=(1, 3), unbiased=False, keepdim=True)
    y = ((xf - mean) * torch.rsqrt(var + gn.eps)).view(B, L, C)
    if gn.affine:
        y = y * gn.weight.float() + gn.bias.float()
    return y
