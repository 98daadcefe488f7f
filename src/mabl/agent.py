"""Decentralized execution: what each agent runs at test time (paper §3.3, Fig. 1 right).

:class:`DecentralizedPolicy` holds only the observation encoder (with ``model.obs_norm``'s fixed
statistics), the agent recurrent model f^a, the agent posterior q(z^a | o^i, h^a) and the actor.
It never sees the global state or another agent's observation: agents are batched in one forward for speed, but every
operation acts row by row, so agent i's action distribution is a function of its own
observation history alone (tests/test_decentralized.py proves it on real episodes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mabl.nets import GRUCell, SplitLinear
from mabl.policy import Actor
from mabl.world_model import BiLevelWorldModel, unimix_logits


@dataclass
class AgentCarry:
    h_a: torch.Tensor  # [N, deter]
    z_a: torch.Tensor  # [N, S]
    prev_action: torch.Tensor  # [N, A] as the model sees it (one-hot or tanh(u))


class DecentralizedPolicy(nn.Module):
    def __init__(self, model: BiLevelWorldModel, actor: Actor):
        super().__init__()
        # shared modules (same parameters as in training) - nothing from the global level
        self.obs_encoder: nn.Module = model.obs_encoder
        self.obs_norm = model.obs_norm  # model.obs_norm's statistics (None when off)
        self.agent_in: SplitLinear = model.agent_in
        self.agent_gru: GRUCell = model.agent_gru
        self.agent_post: nn.Sequential = model.agent_post
        self.actor = actor
        self.n_cat = model.n_cat
        self.n_classes, self.unimix = model.cfg.n_classes, model.cfg.unimix
        self.deter, self.stoch = model.cfg.deter, model.stoch
        self.action_dim = model.spec.action_dim

    def initial(self, n_agents: int, device=None) -> AgentCarry:
        z = lambda d: torch.zeros(n_agents, d, device=device)  # noqa: E731
        return AgentCarry(z(self.deter), z(self.stoch), z(self.action_dim))

    @torch.no_grad()
    def features(self, obs: torch.Tensor, carry: AgentCarry, deterministic: bool = False,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The actor's input for agents ``[N]``: returns ``(feat, h_a, z_a)``, feat = [z^a_t, h^a_t].

        h^a_t = f^a(h^a_{t-1}, z^a_{t-1}, a^i_{t-1}); z^a_t ~ q(z^a_t | o^i_t, h^a_t) (its mode if
        ``deterministic``). ``carry.prev_action`` is the action the agent took last (zeros at reset)."""
        h = self.agent_gru(F.relu(self.agent_in(carry.z_a, carry.prev_action)), carry.h_a)
        o = obs if self.obs_norm is None else self.obs_norm(obs)  # model.obs_norm: the training statistics
        logits = unimix_logits(self.agent_post[2](F.relu(self.agent_post[0](h, self.obs_encoder(o)))), self.n_classes,
                               self.unimix)  # model.unimix: the same mixture as in training
        shaped = logits.float().unflatten(-1, (self.n_cat, -1))
        if deterministic:
            idx = shaped.argmax(-1)
        else:
            idx = torch.multinomial(shaped.softmax(-1).reshape(-1, shaped.shape[-1]), 1, generator=generator).reshape(shaped.shape[:-1])
        z = F.one_hot(idx, shaped.shape[-1]).float().flatten(-2)
        return torch.cat([z, h], -1), h, z

    @torch.no_grad()
    def step(self, obs: torch.Tensor, avail: torch.Tensor | None, carry: AgentCarry,
             deterministic: bool = False, generator: torch.Generator | None = None):
        """One decentralized step for agents ``[N]``: returns ``(raw, env_action, carry, logits)``.

        h^a_t = f^a(h^a_{t-1}, z^a_{t-1}, a^i_{t-1}); z^a_t ~ q(z^a_t | o^i_t, h^a_t); a^i_t ~ π(z^a_t, h^a_t).
        """
        feat, h, z = self.features(obs, carry, deterministic, generator)
        pol_params, log_std = self.actor.params(feat, avail)  # once: used to sample and returned
        raw, env_action, _ = self.actor.sample_from_params(pol_params, log_std, deterministic=deterministic)
        new = AgentCarry(h, z, self.actor.env_to_model_action(raw))
        return raw, env_action, new, pol_params
