"""The actor π(a^i | z^a, h^a) shared by all agents, for discrete and continuous actions.

Discrete: a categorical over ``action_dim`` logits with unavailable actions masked out.
Continuous: a squashed Gaussian: u ~ N(μ, σ), a = tanh(u) in [-1, 1]. The actor keeps
the pre-squash ``u`` as "the action" for PPO so log-probabilities are exact:
log π(a) = log N(u; μ, σ) - Σ log(1 - tanh(u)^2). Where agents drive different numbers of
actuators (``EnvSpec.action_dims``), an agent's padding dimensions are marked by a log-std of
:data:`PAD_LOG_STD`: they are never sampled (u = 0, so the env and the world model see 0) and
add nothing to the log-probability or the entropy. The mask is the ``avail`` argument when one is
given (the env's per-step mask, True on driven dimensions), else the actor's static per-agent mask.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mabl.nets import mlp

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0
PAD_LOG_STD = -100.0  # below LOG_STD_MIN: marks a padding dimension of a continuous action
_MASKED = -1e9


def masked_logits(logits: torch.Tensor, avail: torch.Tensor | None) -> torch.Tensor:
    """Unavailable actions get a logit of -1e9; rows with no available action keep all."""
    logits = logits.float()
    if avail is None:
        return logits
    avail = avail.bool()
    avail = avail | ~avail.any(-1, keepdim=True)
    return logits.masked_fill(~avail, _MASKED)


def tanh_gaussian_log_prob(u: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log-density of a = tanh(u) with u ~ N(mean, exp(log_std)), summed over the action dims
    (padding dimensions, log_std = :data:`PAD_LOG_STD`, excluded)."""
    valid = log_std >= LOG_STD_MIN
    if not bool(valid.all()):
        log_std = torch.where(valid, log_std, torch.zeros_like(log_std))
    var = (2 * log_std).exp()
    normal = -0.5 * ((u - mean) ** 2 / var + 2 * log_std + math.log(2 * math.pi))
    # log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), numerically stable
    log_det = 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))
    return torch.where(valid, normal - log_det, torch.zeros_like(normal)).sum(-1)


class Actor(nn.Module):
    def __init__(self, in_dim: int, action_dim: int, hidden: int, layers: int, discrete: bool,
                 dim_mask=None):
        super().__init__()
        self.discrete = discrete
        self.action_dim = action_dim
        self.net = mlp(in_dim, hidden, layers, action_dim if discrete else 2 * action_dim)
        # continuous actions of unequal agents: [N, A] True on the dimensions agent i drives
        # (EnvSpec.action_dim_mask())
        mask = None if discrete or dim_mask is None else torch.as_tensor(dim_mask, dtype=torch.bool)
        self.register_buffer("dim_mask", mask, persistent=False)

    def params(self, feat: torch.Tensor, avail: torch.Tensor | None = None):
        return self.params_from_out(self.net(feat), avail)

    def params_from_out(self, out: torch.Tensor, avail: torch.Tensor | None = None):
        """Distribution parameters from the network output (for callers that run ``net`` fused)."""
        out = out.float()
        if self.discrete:
            return masked_logits(out, avail), None
        mean, log_std = out.chunk(2, -1)
        log_std = log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
        mask = avail if avail is not None else self.dim_mask
        if mask is not None and not bool(mask.all()):
            mask = mask.bool()
            mean = torch.where(mask, mean, torch.zeros_like(mean))
            log_std = torch.where(mask, log_std, torch.full_like(log_std, PAD_LOG_STD))
        return mean, log_std

    def sample(self, feat, avail=None, deterministic: bool = False):
        """Returns ``(raw, env_action, log_prob)``: raw is the index / pre-squash u."""
        return self.sample_from_params(*self.params(feat, avail), deterministic=deterministic)

    def sample_from_params(self, p, log_std, deterministic: bool = False):
        if self.discrete:
            if deterministic:
                idx = p.argmax(-1)
            else:
                idx = torch.multinomial(p.softmax(-1).reshape(-1, p.shape[-1]), 1).reshape(p.shape[:-1])
            logp = p.log_softmax(-1).gather(-1, idx.unsqueeze(-1)).squeeze(-1)
            return idx, idx, logp
        u = p if deterministic else p + log_std.exp() * torch.randn_like(p)
        if not deterministic and bool((log_std < LOG_STD_MIN).any()):  # padding dimensions: exactly 0
            u = torch.where(log_std >= LOG_STD_MIN, u, torch.zeros_like(u))
        return u, torch.tanh(u), tanh_gaussian_log_prob(u, p, log_std)

    def explore_from_params(self, logits: torch.Tensor, raw: torch.Tensor, eps: float):
        """``ppo.imagine_explore``: each of ``raw``'s discrete actions replaced, with probability
        ``eps``, by a uniform draw from the actions ``logits`` (masked, :func:`masked_logits`) leaves
        available. Returns ``(raw, log_prob, explored)``: the log-probability under the actor, not
        under the mixture (no importance correction: PPO then scores a drawn action as the actor's
        own), and where the drawn action differs from the actor's."""
        if not self.discrete:
            raise ValueError("imagination exploration needs discrete actions")
        avail = logits > _MASKED / 2
        uniform = torch.rand(logits.shape, device=logits.device).masked_fill(~avail, -1.0).argmax(-1)
        swap = torch.rand(raw.shape, device=raw.device) < eps
        new = torch.where(swap, uniform, raw)
        return new, logits.log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1), new != raw

    def log_prob_entropy(self, feat, raw, avail=None):
        return self.log_prob_entropy_from_params(*self.params(feat, avail), raw)

    def log_prob_entropy_from_params(self, p, log_std, raw):
        if self.discrete:
            logp_all = p.log_softmax(-1)
            logp = logp_all.gather(-1, raw.long().unsqueeze(-1)).squeeze(-1)
            ent = -(logp_all.exp() * logp_all).sum(-1)
            return logp, ent
        logp = tanh_gaussian_log_prob(raw, p, log_std)
        ent = (log_std + 0.5 * math.log(2 * math.pi * math.e))  # entropy of u (pre-squash), per dim
        ent = torch.where(log_std >= LOG_STD_MIN, ent, torch.zeros_like(ent)).sum(-1)
        return logp, ent

    def env_to_model_action(self, raw: torch.Tensor) -> torch.Tensor:
        """What the world model sees of an action: one-hot index or tanh(u)."""
        if self.discrete:
            return F.one_hot(raw.long(), self.action_dim).float()
        return torch.tanh(raw)
