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
- The convolutions run as matrix products over unfolded windows, with activations laid out
  ``(B, L, C)``. At batch 1 a convolution's output is a few thousand numbers (e.g. 1024 channels x
  4 steps): a direct convolution kernel then runs on a handful of GPU cores while it streams
  megabytes of weights, whereas a matrix product with few rows is what GEMM libraries split across
  the whole chip. The transposed (upsampling) convolution becomes one product over 3-step windows
  with even and odd outputs as two halves of its columns.
Tests check it against ``forward`` on random inputs; ``forward`` (direct convolutions) stays the
training path, where batches are large and the direct kernels win. On the CPU the direct kernels
also win once a chunk batch has more than ``CPU_TOKEN_ROWS`` rows of time steps (2 cores, small
preset: 44 vs 77 ms at batch 1, but 410 vs 290 ms at batch 50); ``sampling_layout`` chooses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_policy.nets.time_embedding import TimeMLP, broadcast_time

SAMPLING_LAYOUTS = ("auto", "tokens", "direct")
CPU_TOKEN_ROWS = 256  # "auto" on the CPU: the (B, L, C) path up to B * H rows, direct convs above


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

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The same block on ``(B, L, C)`` activations (see the module's sampling path)."""
        conv, gn, _ = self.block
        return F.mish(group_norm_tokens(conv_tokens(x, conv), gn))


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

    def tokens(self, x: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
        """``forward`` on ``(B, L, C)`` activations with the FiLM ``(B, 2C)`` given."""
        conv, gn, _ = self.conv1.block
        h = F.mish(group_norm_tokens(conv_tokens(x, conv), gn))
        scale, bias = film.to(h.dtype).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, C) each
        h = self.conv2.tokens(scale * h + bias)
        skip = x if isinstance(self.skip, nn.Identity) else conv_tokens(x, self.skip)
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

    sampling_layout = "auto"  # "tokens" (the sampling path), "direct" (forward), "auto"

    def prepare_sampling(self, cond: torch.Tensor, times: torch.Tensor, horizon: int | None = None):
        """``f(x (B, H, Da), i) -> forward(x, times[i], cond)`` for a sampler that calls the network
        at the S times ``times (S,)`` with one condition (see the module docstring). Everything
        that depends on the observations or the times alone is computed here, once. ``horizon``
        (H, if known) lets ``sampling_layout="auto"`` pick the layout on the CPU."""
        B = cond.shape[0]
        layout = self.sampling_layout
        if layout not in SAMPLING_LAYOUTS:
            raise ValueError(f"sampling_layout must be one of {SAMPLING_LAYOUTS}, got {layout!r}")
        if layout == "auto" and cond.device.type == "cpu" and B * (horizon or 16) > CPU_TOKEN_ROWS:
            layout = "direct"
        if layout == "direct":
            return lambda x, i: self(x, times[i : i + 1].expand(B), cond)
        cond = cond.reshape(B, -1)
        if cond.shape[1] != self.cond_dim:
            raise ValueError(f"cond flattens to {cond.shape[1]} features, expected {self.cond_dim}")
        times = times.reshape(-1).to(cond.device, torch.float32)
        wdtype = self.final[1].weight.dtype
        sinusoid, mlp = self.time_mlp.net[0], self.time_mlp.net[1:]
        t_emb = mlp(sinusoid(times).to(wdtype))  # (S, time_embed_dim), in the weights' dtype
        time_dim = t_emb.shape[1]
        tables = [blk.film_split(time_dim, t_emb.to(wdtype), cond.to(wdtype)) for blk in self._blocks()]
        up_weights = [upsample_weight(level[2]) for level in self.ups]
        index = self._index_cache(len(times), cond.device)
        trunk = self._trunk_compiled or self._trunk

        def f(x: torch.Tensor, i: int) -> torch.Tensor:
            if x.shape[0] != B:
                raise ValueError(f"x has batch {x.shape[0]}, the condition has {B}")
            return trunk(x, index[i], tables, up_weights)

        return f

    _trunk_compiled = None

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

    def _trunk(self, x: torch.Tensor, index: torch.Tensor, tables: list, up_weights: list) -> torch.Tensor:
        """One network call of the sampling path: ``x (B, H, Da)`` -> ``(B, H, Da)`` float32."""
        B, H, Da = x.shape
        if Da != self.action_dim or H % self.downsample_factor != 0:
            raise ValueError(f"x has shape {tuple(x.shape)}: expected {self.action_dim} action dims and H "
                             f"divisible by {self.downsample_factor}")
        films = iter([tab.index_select(0, index) + part for tab, part in tables])  # (B, 2C) each
        h = x.to(self.final[1].weight.dtype)  # (B, L, C): time along dim 1
        skips = []
        for res1, res2, down in self.downs:
            h = res2.tokens(res1.tokens(h, next(films)), next(films))
            skips.append(h)
            if not isinstance(down, nn.Identity):
                h = conv_tokens(h, down)
        for res in self.mids:
            h = res.tokens(h, next(films))
        for (res1, res2, up), w in zip(self.ups, up_weights):
            h = torch.cat([h, skips.pop()], dim=-1)
            h = upsample_tokens(res2.tokens(res1.tokens(h, next(films)), next(films)), w, up.bias)
        h = self.final[0].tokens(h)
        return conv_tokens(h, self.final[1]).float()


# ---------------------------------------------------------------- (B, L, C) building blocks
def conv_tokens(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """``conv`` applied to ``x (B, L, C)`` -> ``(B, L', O)``, as one matrix product over the
    unfolded windows (``(B, L', C * k) @ (C * k, O)``; the weight ``(O, C, k)`` flattens to match)."""
    k, stride, pad = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    w = conv.weight
    if k == 1 and stride == 1 and pad == 0:
        return F.linear(x, w[:, :, 0], conv.bias)
    B, L, C = x.shape
    cols = F.pad(x, (0, 0, pad, pad)).unfold(1, k, stride)  # (B, L', C, k)
    return F.linear(cols.reshape(B, cols.shape[1], C * k), w.reshape(w.shape[0], C * k), conv.bias)


def upsample_weight(up: nn.ConvTranspose1d) -> torch.Tensor:
    """The weight ``(2 O, C * 3)`` of ``up`` (kernel 4, stride 2, padding 1) as a product over
    3-step windows ``[x[m-1], x[m], x[m+1]]``: output ``2m`` is ``x[m] W_1 + x[m-1] W_3`` and
    output ``2m+1`` is ``x[m+1] W_0 + x[m] W_2`` (``W_j = up.weight[:, :, j]``, shape (C, O))."""
    if (up.kernel_size[0], up.stride[0], up.padding[0], up.output_padding[0]) != (4, 2, 1, 0):
        raise ValueError("upsample_weight handles ConvTranspose1d(kernel 4, stride 2, padding 1) only")
    w = up.weight  # (C, O, 4)
    zero = torch.zeros_like(w[:, :, 0])
    even = torch.stack([w[:, :, 3], w[:, :, 1], zero], dim=-1)  # taps m-1, m, m+1: (C, O, 3)
    odd = torch.stack([zero, w[:, :, 2], w[:, :, 0]], dim=-1)
    both = torch.cat([even, odd], dim=1)  # (C, 2 O, 3)
    return both.permute(1, 0, 2).reshape(2 * w.shape[1], w.shape[0] * 3)


def upsample_tokens(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Transposed convolution (kernel 4, stride 2, padding 1) on ``x (B, L, C)`` -> ``(B, 2L, O)``
    with ``weight`` from :func:`upsample_weight`."""
    B, L, C = x.shape
    O = weight.shape[0] // 2
    cols = F.pad(x, (0, 0, 1, 1)).unfold(1, 3, 1).reshape(B, L, C * 3)
    out = (cols @ weight.t()).view(B, L, 2, O)  # [..., 0, :] -> output 2m, [..., 1, :] -> 2m+1
    if bias is not None:
        out = out + bias
    return out.reshape(B, 2 * L, O)


def group_norm_tokens(x: torch.Tensor, gn: nn.GroupNorm) -> torch.Tensor:
    """``gn`` on ``(B, L, C)`` activations: statistics per row and group over (time, channels of
    the group), in float32 whatever the activations' dtype."""
    B, L, C = x.shape
    G = gn.num_groups
    xf = x.float().view(B, L, G, C // G)
    var, mean = torch.var_mean(xf, dim=(1, 3), unbiased=False, keepdim=True)
    y = ((xf - mean) * torch.rsqrt(var + gn.eps)).view(B, L, C)
    if gn.affine:
        y = y * gn.weight.float() + gn.bias.float()
    return y.to(x.dtype)
