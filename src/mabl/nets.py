"""Small building blocks shared by the world model and the MARL algorithm."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(in_dim: int, hidden: int, layers: int, out_dim: int) -> nn.Sequential:
    """``layers`` hidden ReLU layers of width ``hidden`` then a linear output (paper App. B.1: ReLU MLPs)."""
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), nn.ReLU()]
        d = hidden
    mods.append(nn.Linear(d, out_dim))
    return nn.Sequential(*mods)


class SplitLinear(nn.Module):
    """``W [x_1; x_2; ...] + b`` for inputs given separately.

    Equivalent to a Linear on the concatenation, but each part can be projected
    on its own: the parts known for the whole sequence (observation embeddings,
    data actions) are projected once for all time steps outside the recurrence,
    and only the recurrent parts are multiplied inside the loop.
    """

    def __init__(self, in_dims: list[int], out_dim: int):
        super().__init__()
        self.in_dims = list(in_dims)
        self.parts = nn.ModuleList(nn.Linear(d, out_dim, bias=(i == 0)) for i, d in enumerate(in_dims))

    def part(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.parts[i](x)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = self.parts[0](xs[0])
        for lin, x in zip(self.parts[1:], xs[1:]):
            out = out + lin(x)
        return out


class GRUCell(nn.Module):
    """The GRU variant of DreamerV2/V3: one matmul on ``[x, h]`` for all three gates.

    r = σ(W_r[x,h]), c = tanh(r ⊙ W_c[x,h]), u = σ(W_u[x,h] - 1), h' = u ⊙ c + (1 - u) ⊙ h.
    """

    def __init__(self, in_dim: int, size: int):
        super().__init__()
        self.size = size
        self.lin = nn.Linear(in_dim + size, 3 * size)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        parts = self.lin(torch.cat([x, h], -1))
        return gru_update(parts, h, self.size).to(h.dtype)


def gru_update(parts: torch.Tensor, h: torch.Tensor, size: int) -> torch.Tensor:
    """The gate arithmetic of :class:`GRUCell` given ``parts = W[x, h] + b`` (computed in fp32)."""
    reset, cand, update = parts.float().split(size, -1)
    reset = torch.sigmoid(reset)
    cand = torch.tanh(reset * cand)
    update = torch.sigmoid(update - 1.0)
    return update * cand + (1.0 - update) * h.float()


def sample_onehot(logits: torch.Tensor, straight_through: bool = True) -> torch.Tensor:
    """One sample per categorical (last dim) as a one-hot vector, Gumbel-max.

    With ``straight_through`` the gradient flows through the probabilities
    (``onehot + p - stop_grad(p)``, DreamerV2), so the forward value is the exact
    one-hot sample and the backward pass is that of ``softmax(logits)``.
    """
    logits = logits.float()
    u = torch.rand_like(logits).clamp_(1e-10, 1.0)
    idx = (logits - torch.log(-torch.log(u))).argmax(-1)
    onehot = F.one_hot(idx, logits.shape[-1]).to(logits.dtype)
    if straight_through and logits.requires_grad:
        probs = torch.softmax(logits, -1)
        onehot = onehot + probs - probs.detach()
    return onehot


def mode_onehot(logits: torch.Tensor) -> torch.Tensor:
    return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float32)


class Ensemble(nn.Module):
    """``members`` independent one-hidden-layer ReLU MLPs ``in_dim -> hidden -> out_dim`` evaluated
    together (stacked weights, one batched matmul per layer). ``forward(x [..., in_dim])`` returns
    ``[members, ..., out_dim]``. Each member is initialized as ``nn.Linear`` layers are
    (uniform in ±1/sqrt(fan_in)), independently, so they disagree where they have not been trained."""

    def __init__(self, members: int, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.members = members
        b1, b2 = in_dim ** -0.5, hidden ** -0.5
        self.w1 = nn.Parameter(torch.empty(members, in_dim, hidden).uniform_(-b1, b1))
        self.b1 = nn.Parameter(torch.empty(members, 1, hidden).uniform_(-b1, b1))
        self.w2 = nn.Parameter(torch.empty(members, hidden, out_dim).uniform_(-b2, b2))
        self.b2 = nn.Parameter(torch.empty(members, 1, out_dim).uniform_(-b2, b2))

    def forward(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Every member on ``x``, matmuls in ``dtype`` (e.g. bf16 where it is fast), the output in fp32."""
        lead = x.shape[:-1]
        c = lambda t: t.to(dtype)  # noqa: E731
        flat = c(x.reshape(1, -1, x.shape[-1]))
        hid = F.relu(torch.baddbmm(c(self.b1), flat.expand(self.members, -1, -1), c(self.w1)))
        out = torch.baddbmm(c(self.b2), hid, c(self.w2)).float()
        return out.reshape(self.members, *lead, out.shape[-1])
