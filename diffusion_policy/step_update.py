"""A sampler step as a tensor formula, shared by the methods (whose sampling plans compute its
coefficients from their schedules) and the fast paths (``diffusion_policy.fast``, which run it
with the network's last layer, knowing only the formula): neither imports the other for it."""
from __future__ import annotations

import torch


class StepUpdate:
    """A sampler step that is a fixed function of the chunk ``x`` and the network's output at
    each step ``i``: ``x_next = cx x + c0 clamp(a0 x + a1 out, -clip, clip) + co out``, one row
    ``(a0, a1, cx, c0, co, clip)`` per step. DDIM with eta = 0 (every prediction type, clipped or
    not) and the Euler step of flow matching have this form. A fast path that is given one runs
    it right after the network's last layer (in the same compiled or fused kernel)."""

    def __init__(self, rows: list[tuple[float, ...]], device: torch.device):
        self.rows = [tuple(float(v) for v in r) for r in rows]
        bad = [i for i, r in enumerate(self.rows) if len(r) != 6]
        if bad:
            raise ValueError(f"StepUpdate row {bad[0]} has {len(self.rows[bad[0]])} values; each row is "
                             f"(a0, a1, cx, c0, co, clip)")
        self.table = torch.tensor(self.rows, dtype=torch.float32, device=device)  # (S, 6)

    @staticmethod
    def apply_row(x: torch.Tensor, out: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """The update with coefficients ``row`` (a ``(6,)`` or ``(1, 6)`` tensor), float32."""
        a0, a1, cx, c0, co, clip = row.reshape(6, 1, 1, 1).float()
        x, out = x.float(), out.float()
        return cx * x + c0 * torch.clamp(a0 * x + a1 * out, -clip, clip) + co * out

    def apply(self, x: torch.Tensor, out: torch.Tensor, i: int) -> torch.Tensor:
        return self.apply_row(x, out, self.table[i])
