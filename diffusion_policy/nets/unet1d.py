"""Conditional 1D temporal UNet over an action chunk ``(B, H, Da)``.

Architecture of Diffusion Policy (Chi et al. 2023, sec. 3.2 and Fig. 3): a 1D UNet (Janner et al.
2022, "Planning with Diffusion") whose convolutions run along the chunk's time axis, with the
action dimensions as channels. Every residual block is conditioned by FiLM (Perez et al. 2018):
a linear map of the global condition gives a per-channel scale and bias. The global condition is
the flattened observation features ``(B, To*F)`` concatenated with an embedding of the time ``t``.

Each level halves the chunk in time except the last, so ``H`` must be divisible by
``2 ** (len(down_dims) - 1)`` (4 for the default three levels).

Sampling path (``prepare_sampling``): the same function, arranged for a sampler's loop at small
batch. Two facts make it cheaper than calling ``forward`` once per step:
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
Tests check it against ``forward`` on random inputs. The path pays off once its small kernels
are fused and launched together: compiled (``compile_sampling``) or captured in a CUDA graph
(``diffusion_policy.inference.FastPredictor``). Run op by op it is more, smaller kernels than
``forward`` (measured: DDIM-10 on 2 CPU cores, small preset, 59 vs 52 ms; compiled 31 ms), so
``sampling_layout="auto"`` takes it only for a compiled trunk; ``forward`` (direct convolutions)
is also the training path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_policy.nets.time_embedding import TimeMLP, broadcast_time
from diffusion_policy.step_update import StepUpdate

SAMPLING_LAYOUTS = ("auto", "tokens", "fused", "direct")


class ConvBlock(nn.Module):
    """Conv1d -> GroupNorm -> Mish, length preserving (odd kernel, 'same' padding)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, n_groups: int):
        super().__init__()
        if out_ch % n_groups != 0:
            raise ValueError(f"channels ({out_ch}) must be divisible by n_groups ({n_groups})")
        self.block = nn.Sequential(
            nn.Conv1d(in_ch, out_ch, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, out_ch),
            nn.Mish(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)

    def tokens(self, x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
        """The same block on ``(B, L, C)`` activations; ``taps = tap_weight(conv.weight)``."""
        conv, gn, _ = self.block
        y = mm(x, taps)
        return F.mish(group_norm_tokens(shift_add(y, conv.kernel_size[0], conv.padding[0], 1, conv.bias), gn))


class FiLMResBlock(nn.Module):
    """Two conv blocks; between them the features are modulated by ``scale * h + bias`` (FiLM)."""

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.conv1 = ConvBlock(in_ch, out_ch, kernel_size, n_groups)
        self.conv2 = ConvBlock(out_ch, out_ch, kernel_size, n_groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * out_ch))
        self.skip = nn.Conv1d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.out_ch = out_ch

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)  # (B, C, T)
        scale, bias = self.film(cond).unsqueeze(-1).chunk(2, dim=1)  # (B, C, 1) each
        h = scale * h + bias
        h = self.conv2(h)
        return h + self.skip(x)

    def film_split(self, time_dim: int, t_emb: torch.Tensor, cond: torch.Tensor):
        """FiLM's linear map split over ``g = [t_emb, cond]``: ``(time table (S, 2C), observation
        part (B, 2C))``; the FiLM of ``(time i, row b)`` is ``table[i] + part[b]``."""
        lin = self.film[1]
        w_t, w_c = lin.weight[:, :time_dim], lin.weight[:, time_dim:]
        return F.mish(t_emb) @ w_t.t(), F.linear(F.mish(cond), w_c, lin.bias)

    def sampling_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(conv1 taps with the skip's columns appended (C, k O [+ O]), conv2 taps (O, k O))``."""
        w1 = tap_weight(self.conv1.block[0].weight)
        if not isinstance(self.skip, nn.Identity):
            w1 = torch.cat([w1, self.skip.weight[:, :, 0].t()], dim=1)
        return w1, tap_weight(self.conv2.block[0].weight)

    def tokens(self, x: torch.Tensor, film: torch.Tensor, weights) -> torch.Tensor:
        """``forward`` on ``(B, L, C)`` activations with the FiLM ``(B, 2C)`` and
        :meth:`sampling_weights` given."""
        (conv1, gn1, _), (conv2, gn2, _) = self.conv1.block, self.conv2.block
        k, pad, O = conv1.kernel_size[0], conv1.padding[0], self.out_ch
        y = mm(x, weights[0])  # (B, L, k O [+ O]): the taps of conv1, then the skip
        h = F.mish(group_norm_tokens(shift_add(y[..., : k * O], k, pad, 1, conv1.bias), gn1))
        scale, bias = film.float().unsqueeze(1).chunk(2, dim=-1)  # (B, 1, C) each
        h = scale * h + bias
        h = F.mish(group_norm_tokens(shift_add(mm(h, weights[1]), k, pad, 1, conv2.bias), gn2))
        skip = x if isinstance(self.skip, nn.Identity) else y[..., k * O :] + self.skip.bias.float()
        return h + skip


class ConditionalUnet1D(nn.Module):
    """``forward(x (B, H, Da), t (B,), cond (B, To, F)) -> (B, H, Da)``.

    ``cond_dim`` is the size of the flattened condition, ``To * F``.
    """

    def __init__(
        self,
        action_dim: int,
        cond_dim: int,
        down_dims: list[int] | tuple[int, ...] = (256, 512, 1024),
        kernel_size: int = 5,
        n_groups: int = 8,
        time_embed_dim: int = 256,
    ):
        super().__init__()
        down_dims = list(down_dims)
        if not down_dims:
            raise ValueError("down_dims must name at least one level, got []")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (length-preserving padding), got {kernel_size}")
        self.action_dim = action_dim
        self.cond_dim = cond_dim
        self.time_mlp = TimeMLP(time_embed_dim)
        gdim = time_embed_dim + cond_dim  # global condition: [time embedding, observations]

        def block(i: int, o: int) -> FiLMResBlock:
            return FiLMResBlock(i, o, gdim, kernel_size, n_groups)

        dims = [action_dim] + down_dims
        levels = list(zip(dims[:-1], dims[1:]))  # (in, out) per level
        self.downs = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(levels):
            last = i == len(levels) - 1
            self.downs.append(
                nn.ModuleList([
                    block(d_in, d_out),
                    block(d_out, d_out),
                    nn.Identity() if last else nn.Conv1d(d_out, d_out, 3, stride=2, padding=1),
                ])
            )
        mid = down_dims[-1]
        self.mids = nn.ModuleList([block(mid, mid), block(mid, mid)])
        self.ups = nn.ModuleList()
        for d_in, d_out in reversed(levels[1:]):
            # input: upsampled features concatenated with the skip connection of the same level
            self.ups.append(
                nn.ModuleList([
                    block(2 * d_out, d_in),
                    block(d_in, d_in),
                    nn.ConvTranspose1d(d_in, d_in, 4, stride=2, padding=1),
                ])
            )
        self.final = nn.Sequential(
            ConvBlock(down_dims[0], down_dims[0], kernel_size, n_groups),
            nn.Conv1d(down_dims[0], action_dim, 1),
        )
        self.downsample_factor = 2 ** (len(down_dims) - 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        B, H, Da = x.shape
        if Da != self.action_dim:
            raise ValueError(f"x has {Da} action dims, the UNet was built for {self.action_dim}")
        if H % self.downsample_factor != 0:
            raise ValueError(
                f"horizon H={H} must be divisible by {self.downsample_factor} "
                f"(2 ** (len(down_dims) - 1)) for this UNet"
            )
        cond = cond.reshape(B, -1)  # (B, To*F)
        if cond.shape[1] != self.cond_dim:
            raise ValueError(f"cond flattens to {cond.shape[1]} features, expected {self.cond_dim}")
        g = torch.cat([self.time_mlp(broadcast_time(t, B, x.device)), cond], dim=-1)  # (B, gdim)

        h = x.transpose(1, 2)  # (B, Da, H): channels = action dims, convolve over time
        skips = []
        for res1, res2, down in self.downs:
            h = res2(res1(h, g), g)
            skips.append(h)
            h = down(h)
        for res in self.mids:
            h = res(h, g)
        for res1, res2, up in self.ups:
            h = torch.cat([h, skips.pop()], dim=1)
            h = up(res2(res1(h, g), g))
        return self.final(h).transpose(1, 2)  # (B, H, Da)

    # ------------------------------------------------------------------------ sampling path
    def _blocks(self) -> list[FiLMResBlock]:
        """Every FiLM block in the order the trunk runs them."""
        return ([b for level in self.downs for b in level[:2]] + list(self.mids)
                + [b for level in self.ups for b in level[:2]])

    # "tokens" (the sampling path), "fused" (the sampling path as one Triton kernel per
    # convolution, diffusion_policy.nets.fused_unet; CUDA; for batches up to fused_max_batch,
    # above which it streams the weights once per row and "tokens" is faster), "direct"
    # (forward at every step), "auto": tokens when the trunk is compiled, else direct (see the
    # module docstring)
    sampling_layout = "auto"
    fused_max_batch = 2

    def prepare_sampling(self, cond: torch.Tensor, times: torch.Tensor, update=None):
        """``f(x (B, H, Da), i) -> forward(x, times[i], cond)`` for a sampler that calls the network
        at the S times ``times (S,)`` with one condition (see the module docstring). Everything
        that depends on the observations or the times alone is computed here, once. With
        ``update`` (a :class:`~diffusion_policy.step_update.StepUpdate`), ``f`` returns the
        sampler's next chunk ``update.apply(x, forward(...), i)``, computed with the last layer."""
        B = cond.shape[0]
        layout = self.sampling_layout
        if layout not in SAMPLING_LAYOUTS:
            raise ValueError(f"sampling_layout must be one of {SAMPLING_LAYOUTS}, got {layout!r}")
        if layout == "auto":
            layout = "direct" if self._trunk_compiled is None else "tokens"
        if layout == "direct":
            if update is None:
                return lambda x, i: self(x, times[i : i + 1].expand(B), cond)
            return lambda x, i: update.apply(x, self(x, times[i : i + 1].expand(B), cond), i)
        if layout == "fused":
            if B <= self.fused_max_batch:
                from diffusion_policy.nets.fused_unet import fused_sampler

                return fused_sampler(self).prepare(cond, times, update)
            layout = "tokens"
        cond = cond.reshape(B, -1)
        if cond.shape[1] != self.cond_dim:
            raise ValueError(f"cond flattens to {cond.shape[1]} features, expected {self.cond_dim}")
        times = times.reshape(-1).to(cond.device, torch.float32)
        wdtype = self.final[1].weight.dtype
        sinusoid, mlp = self.time_mlp.net[0], self.time_mlp.net[1:]
        t_emb = mlp(sinusoid(times).to(wdtype))  # (S, time_embed_dim), in the weights' dtype
        time_dim = t_emb.shape[1]
        tables = [blk.film_split(time_dim, t_emb, cond.to(wdtype)) for blk in self._blocks()]
        weights = self._cached_sampling_weights()
        index = self._index_cache(len(times), cond.device)
        trunk = self._trunk_compiled or self._trunk
        coefs = None if update is None else update.table.to(cond.device)

        def f(x: torch.Tensor, i: int) -> torch.Tensor:
            if x.shape[0] != B:
                raise ValueError(f"x has batch {x.shape[0]}, the condition has {B}")
            return trunk(x, index[i], tables, weights, coefs)

        return f

    _trunk_compiled = None

    def sampling_weights(self) -> dict:
        """The convolution weights rearranged for the sampling path (a copy of each)."""
        return {
            "blocks": [blk.sampling_weights() for blk in self._blocks()],
            "down": [tap_weight(level[2].weight) for level in self.downs if not isinstance(level[2], nn.Identity)],
            "up": [upsample_tap_weight(level[2]) for level in self.ups],
            "final": tap_weight(self.final[0].block[0].weight),
        }

    def _cached_sampling_weights(self) -> dict:
        """:meth:`sampling_weights`, remade only when a weight changed: the key is every
        parameter's storage and version counter (an optimizer step, ``load_state_dict`` or
        ``.to()`` changes one of them). Under autograd the weights are made afresh, uncached."""
        if torch.is_grad_enabled():
            return self.sampling_weights()
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in self.parameters())
        cached = self.__dict__.get("_sampling_cache")
        if cached is None or cached[0] != key:
            cached = (key, self.sampling_weights())
            self.__dict__["_sampling_cache"] = cached
        return cached[1]

    def compile_sampling(self, **kwargs) -> None:
        """Run the sampling path's per-step trunk through ``torch.compile(**kwargs)``."""
        self._trunk_compiled = torch.compile(self._trunk, **kwargs)

    def _index_cache(self, n: int, device: torch.device) -> list[torch.Tensor]:
        """One ``(1,)`` long tensor per step on ``device``, made once: the trunk selects its FiLM
        row with a device index (no host-to-device copy per step, one compiled graph for all i)."""
        cache = self.__dict__.setdefault("_index", {})
        key = (n, str(device))
        if key not in cache:
            cache[key] = [torch.full((1,), i, dtype=torch.long, device=device) for i in range(n)]
        return cache[key]

    def _trunk(self, x: torch.Tensor, index: torch.Tensor, tables: list, weights: dict,
               coefs: torch.Tensor | None = None) -> torch.Tensor:
        """One network call of the sampling path: ``x (B, H, Da)`` -> ``(B, H, Da)`` float32; with
        ``coefs`` (a StepUpdate's table) the sampler's next chunk instead of the output."""
        B, H, Da = x.shape
        if Da != self.action_dim or H % self.downsample_factor != 0:
            raise ValueError(f"x has shape {tuple(x.shape)}: expected {self.action_dim} action dims and H "
                             f"divisible by {self.downsample_factor}")
        films = iter([tab.index_select(0, index) + part for tab, part in tables])  # (B, 2C) each
        blocks = iter(weights["blocks"])
        downs = iter(weights["down"])
        h = x.float()  # (B, L, C): time along dim 1; float32 between the matrix products
        skips = []
        for res1, res2, down in self.downs:
            h = res1.tokens(h, next(films), next(blocks))
            h = res2.tokens(h, next(films), next(blocks))
            skips.append(h)
            if not isinstance(down, nn.Identity):
                h = shift_add(mm(h, next(downs)), down.kernel_size[0], down.padding[0], down.stride[0], down.bias)
        for res in self.mids:
            h = res.tokens(h, next(films), next(blocks))
        for (res1, res2, up), w in zip(self.ups, weights["up"]):
            h = torch.cat([h, skips.pop()], dim=-1)
            h = res1.tokens(h, next(films), next(blocks))
            h = res2.tokens(h, next(films), next(blocks))
            h = upsample_taps(mm(h, w), up.bias)
        h = self.final[0].tokens(h, weights["final"])
        out = conv_tokens(h, self.final[1])
        return out if coefs is None else StepUpdate.apply_row(x, out, coefs.index_select(0, index))


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
        raise ValueError("the sampling path handles ConvTranspose1d(kernel 4, stride 2, padding 1) only")
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
