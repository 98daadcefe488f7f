"""The bi-level world model of MABL (paper §3.1-3.2, Appendix A).

For every agent i there are two levels, all parameters shared across agents:

* global level (top):   h^g_t = f^g(h^g_{t-1}, z^g_{t-1}, **a**_{t-1})        (joint action)
                        posterior q(z^g_t | s_t, z^a_t, h^g_t)                 (bottom-up)
                        prior     p(ẑ^g_t | h^g_t)
* agent level (bottom): h^a_t = f^a(h^a_{t-1}, z^a_{t-1}, a^i_{t-1})
                        posterior q(z^a_t | o^i_t, h^a_t)                       (needs no global input)
                        prior     p(ẑ^a_t | h^a_t, ẑ^g_t)                       (top-down)

plus the observation decoder p(ô^i_t | h^a_t, z^a_t), the reward head p(r̂ | z^a, h^a) and the
termination, available-action and action-decoder heads on (z^a, z^g, h^a, h^g).
Latents are 32 categoricals x 32 classes with straight-through sampling; both KL terms use
KL balancing. ``bilevel=False`` removes the global level (the Dreamer-v2 ablation);
``single_global=True`` keeps one global latent for all agents (the MABL-SG ablation).

Data layout of a sequence batch (time-major ``[T, B, ...]``): ``obs [T,B,N,O]``, ``state [T,B,S]``,
``prev_action [T,B,N,A]`` (one-hot or continuous, the action that led to step t; zeros when
``is_first``), ``reward [T,B,N]`` (reward for arriving at t), ``cont [T,B]`` (0 where step t is
terminal), ``avail [T,B,N,A]``, ``is_first [T,B]``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mabl.config import WorldModelConfig
from mabl.envs.base import EnvSpec
from mabl.nets import GRUCell, SplitLinear, mlp, sample_onehot


@dataclass
class LatentState:
    """The model carry for a batch ``[..., N]`` of agents.

    ``h_a, z_a``: agent level ``[..., N, deter]`` / ``[..., N, S]``;
    ``h_g, z_g``: global level ``[..., G, ...]`` with G = N (per-agent global latents, the
    paper's design) or G = 1 (MABL-SG); ``None`` without the global level.
    ``z`` are flattened one-hot samples (S = categoricals x classes).
    """

    h_a: torch.Tensor
    z_a: torch.Tensor
    h_g: torch.Tensor | None = None
    z_g: torch.Tensor | None = None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "LatentState":
        return LatentState(**{f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name)))
                              for f in fields(self)})


# ------------------------------------------------------------------------------------------
# Losses as pure functions (each testable alone).

def categorical_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, n_cat: int) -> torch.Tensor:
    """KL(p || q) of ``n_cat`` independent categoricals, summed over them: ``[...]``."""
    p = p_logits.float().unflatten(-1, (n_cat, -1))
    q = q_logits.float().unflatten(-1, (n_cat, -1))
    logp, logq = p.log_softmax(-1), q.log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum((-2, -1))


def kl_balanced(post_logits: torch.Tensor, prior_logits: torch.Tensor, n_cat: int, balance: float) -> torch.Tensor:
    """KL balancing (DreamerV2; paper Table 2): ``balance·KL(sg(q)||p) + (1-balance)·KL(q||sg(p))``.

    The first term (weight 0.8, "cross entropy") trains the prior toward the posterior;
    the second (weight 0.2, "entropy") regularizes the posterior. The value equals KL(q||p).
    """
    prior_side = categorical_kl(post_logits.detach(), prior_logits, n_cat)
    post_side = categorical_kl(post_logits, prior_logits.detach(), n_cat)
    return balance * prior_side + (1.0 - balance) * post_side


def gaussian_nll(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log N(target; pred, 1) up to a constant, summed over the last dim."""
    return 0.5 * (pred.float() - target).pow(2).sum(-1)


def bernoulli_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log Bernoulli(target; sigmoid(logits)), summed over the last dim."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none").sum(-1)


class BiLevelWorldModel(nn.Module):
    """``initial / observe / imagine_step / loss`` of the bi-level model; see the module docstring."""

    def __init__(self, spec: EnvSpec, cfg: WorldModelConfig):
        super().__init__()
        self.spec, self.cfg = spec, cfg
        n, a = spec.n_agents, spec.action_dim
        H, L, D, E = cfg.hidden, cfg.layers, cfg.deter, cfg.embed
        self.n_cat = cfg.n_categoricals
        S = self.stoch = cfg.n_categoricals * cfg.n_classes
        self.bilevel, self.single_global = cfg.bilevel, cfg.single_global
        self.feat_a = D + S
        self.feat_g = D + S if self.bilevel else 0

        # agent level
        self.obs_encoder = mlp(spec.obs_dim, H, L, E)
        self.agent_in = SplitLinear([S, a], H)  # f^a input: (z^a_{t-1}, a^i_{t-1})
        self.agent_gru = GRUCell(H, D)
        self.agent_post = nn.Sequential(SplitLinear([D, E], H), nn.ReLU(), nn.Linear(H, S))  # q(z^a|h^a,o)
        prior_in = [D, S] if self.bilevel else [D]
        self.agent_prior = nn.Sequential(SplitLinear(prior_in, H), nn.ReLU(), nn.Linear(H, S))  # p(ẑ^a|h^a,ẑ^g)
        if self.bilevel:
            self.state_encoder = mlp(spec.state_dim, H, L, E)
            self.global_in = SplitLinear([S, n * a], H)  # f^g input: (z^g_{t-1}, joint action)
            self.global_gru = GRUCell(H, D)
            self.global_post = nn.Sequential(SplitLinear([D, E, S], H), nn.ReLU(), nn.Linear(H, S))  # q(z^g|h^g,s,z^a)
            self.global_prior = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, S))  # p(ẑ^g|h^g)

        # heads
        both = self.feat_a + self.feat_g
        self.obs_decoder = mlp(self.feat_a, H, L, spec.obs_dim)
        self.reward_head = mlp(self.feat_a, H, L, 1)
        self.cont_head = mlp(both, H, L, 1)
        self.avail_head = mlp(both, H, L, a) if spec.has_action_mask else None
        self.action_decoder = mlp(both, H, L, a)

    # -- carries ---------------------------------------------------------------------------
    @property
    def n_global(self) -> int:
        return 1 if self.single_global else self.spec.n_agents

    def initial(self, batch: tuple[int, ...], device=None, dtype=torch.float32) -> LatentState:
        n, D, S = self.spec.n_agents, self.cfg.deter, self.stoch
        z = lambda k, d: torch.zeros(*batch, k, d, device=device, dtype=dtype)  # noqa: E731
        if not self.bilevel:
            return LatentState(z(n, D), z(n, S))
        g = self.n_global
        return LatentState(z(n, D), z(n, S), z(g, D), z(g, S))

    def _expand_g(self, x: torch.Tensor) -> torch.Tensor:
        """Global-level tensors ``[..., G, d]`` seen per agent ``[..., N, d]``."""
        return x.expand(*x.shape[:-2], self.spec.n_agents, x.shape[-1]) if self.single_global else x

    def features(self, st: LatentState) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Agent features ``[z^a, h^a]`` and global features ``[z^g, h^g]`` per agent."""
        fa = torch.cat([st.z_a, st.h_a], -1)
        fg = None if st.h_g is None else self._expand_g(torch.cat([st.z_g, st.h_g], -1))
        return fa, fg

    def joint_action(self, action: torch.Tensor) -> torch.Tensor:
        """``[..., N, A]`` -> the joint action ``[..., G, N*A]`` fed to the global recurrence."""
        j = action.flatten(-2)
        return j.unsqueeze(-2).expand(*j.shape[:-1], self.n_global, j.shape[-1])

    def _z_a_for_global(self, z_a: torch.Tensor) -> torch.Tensor:
        return z_a.mean(-2, keepdim=True) if self.single_global else z_a

    # -- posterior rollout on data (training, imagination starts) ---------------------------
    def observe(self, obs, state, prev_action, is_first, carry: LatentState | None = None, sample: bool = True):
        """Posterior states of a data sequence (Eq. 2 of App. A, applied step by step).

        Everything that does not depend on the recurrence (encoders, the data actions'
        projections, the priors) is computed batched over all time steps.

        Returns ``(post, priors, last)``: ``post`` a :class:`LatentState` ``[T, B, ...]`` plus
        posterior logits in ``priors['post_a' / 'post_g']``, prior logits in
        ``priors['prior_a' / 'prior_g']``, and the final carry.
        """
        T, B = obs.shape[:2]
        if carry is None:
            carry = self.initial((B,), obs.device, obs.dtype)
        keep = (1.0 - is_first.to(obs.dtype))[..., None, None]  # [T,B,1,1]
        # time-batched projections
        post_a_x = self.agent_post[0].part(1, self.obs_encoder(obs))  # [T,B,N,H]
        act_x = self.agent_in.part(1, prev_action)  # [T,B,N,H]
        if self.bilevel:
            s_emb = self.state_encoder(state).unsqueeze(-2)  # [T,B,1,E]
            post_g_x = self.global_post[0].part(1, s_emb)  # [T,B,1,H]
            jact_x = self.global_in.part(1, prev_action.flatten(-2).unsqueeze(-2))  # [T,B,1,H]

        h_a, z_a, h_g, z_g = carry.h_a, carry.z_a, carry.h_g, carry.z_g
        hs_a, zs_a, ls_a, hs_g, zs_g, ls_g = [], [], [], [], [], []
        for t in range(T):
            k = keep[t]
            h_a, z_a = h_a * k, z_a * k
            h_a = self.agent_gru(F.relu(self.agent_in.part(0, z_a) + act_x[t]), h_a)
            post_in = F.relu(self.agent_post[0].part(0, h_a) + post_a_x[t])
            logit_a = self.agent_post[2](post_in)
            z_a = self._sample(logit_a, sample)
            hs_a.append(h_a), zs_a.append(z_a), ls_a.append(logit_a)
            if self.bilevel:
                h_g, z_g = h_g * k, z_g * k
                h_g = self.global_gru(F.relu(self.global_in.part(0, z_g) + jact_x[t]), h_g)
                g_in = self.global_post[0].part(0, h_g) + post_g_x[t] + self.global_post[0].part(2, self._z_a_for_global(z_a))
                logit_g = self.global_post[2](F.relu(g_in))
                z_g = self._sample(logit_g, sample)
                hs_g.append(h_g), zs_g.append(z_g), ls_g.append(logit_g)

        post = LatentState(torch.stack(hs_a), torch.stack(zs_a),
                           torch.stack(hs_g) if self.bilevel else None, torch.stack(zs_g) if self.bilevel else None)
        logits = {"post_a": torch.stack(ls_a)}
        # priors, batched over time
        if self.bilevel:
            logits["post_g"] = torch.stack(ls_g)
            logits["prior_g"] = self.global_prior(post.h_g)
            zhat_g = self._expand_g(self._sample(logits["prior_g"], sample))
            logits["prior_a"] = self._agent_prior(post.h_a, zhat_g)
        else:
            logits["prior_a"] = self._agent_prior(post.h_a)
        return post, logits, LatentState(h_a, z_a, h_g, z_g)

    def _agent_prior(self, h_a: torch.Tensor, zhat_g: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of p(ẑ^a | h^a, ẑ^g) (top-down; without the global level p(ẑ^a | h^a))."""
        if zhat_g is None:
            return self.agent_prior(h_a)
        return self.agent_prior[2](F.relu(self.agent_prior[0](h_a, zhat_g)))

    def _sample(self, logits: torch.Tensor, sample: bool) -> torch.Tensor:
        shaped = logits.unflatten(-1, (self.n_cat, -1))
        if sample:
            z = sample_onehot(shaped)
        else:
            z = F.one_hot(shaped.argmax(-1), shaped.shape[-1]).to(torch.float32)
        return z.flatten(-2).to(logits.dtype) if logits.dtype != torch.float32 else z.flatten(-2)

    # -- prior step (imagination) -----------------------------------------------------------
    def imagine_step(self, st: LatentState, action: torch.Tensor) -> LatentState:
        """One transition of the priors (§3.1 'Transition Model') under agents' actions ``[..., N, A]``."""
        h_a = self.agent_gru(F.relu(self.agent_in(st.z_a, action)), st.h_a)
        if not self.bilevel:
            z_a = self._sample(self._agent_prior(h_a), True)
            return LatentState(h_a, z_a)
        h_g = self.global_gru(F.relu(self.global_in(st.z_g, self.joint_action(action))), st.h_g)
        z_g = self._sample(self.global_prior(h_g), True)
        z_a = self._sample(self._agent_prior(h_a, self._expand_g(z_g)), True)
        return LatentState(h_a, z_a, h_g, z_g)

    # -- heads ------------------------------------------------------------------------------
    def _both(self, fa, fg):
        return fa if fg is None else torch.cat([fa, fg], -1)

    def heads(self, st: LatentState) -> dict[str, torch.Tensor]:
        fa, fg = self.features(st)
        both = self._both(fa, fg)
        out = {"reward": self.reward_head(fa).squeeze(-1), "cont": self.cont_head(both).squeeze(-1)}
        if self.avail_head is not None:
            out["avail"] = self.avail_head(both)
        return out

    # -- loss (§3.2) ------------------------------------------------------------------------
    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], LatentState]:
        """L(ψ) = L_ELBO + L_r + L_γ + L_A + L_a, each averaged over time, batch and agents.

        Returns the total loss, the detached terms, and the posterior states (for imagination).
        """
        cfg = self.cfg
        post, logits, _ = self.observe(batch["obs"], batch["state"], batch["prev_action"], batch["is_first"])
        fa, fg = self.features(post)
        both = self._both(fa, fg)
        terms: dict[str, torch.Tensor] = {}
        if cfg.obs_loss == "mse":
            terms["obs"] = gaussian_nll(self.obs_decoder(fa), batch["obs"]).mean()
        else:
            terms["obs"] = F.smooth_l1_loss(self.obs_decoder(fa).float(), batch["obs"], reduction="none").sum(-1).mean()
        terms["kl_a"] = cfg.kl_scale * kl_balanced(logits["post_a"], logits["prior_a"], self.n_cat, cfg.kl_balance).mean()
        if self.bilevel:
            terms["kl_g"] = cfg.kl_scale * kl_balanced(logits["post_g"], logits["prior_g"], self.n_cat, cfg.kl_balance).mean()
        terms["reward"] = (0.5 * (self.reward_head(fa).squeeze(-1).float() - batch["reward"]).pow(2)).mean()
        cont_target = batch["cont"].unsqueeze(-1).expand(*batch["cont"].shape, self.spec.n_agents)
        terms["cont"] = F.binary_cross_entropy_with_logits(self.cont_head(both).squeeze(-1).float(), cont_target).mean()
        if self.avail_head is not None:
            terms["avail"] = bernoulli_nll(self.avail_head(both), batch["avail"]).mean() / self.spec.action_dim
        # action decoder: the action taken at step t is the prev_action of step t+1 (if same episode)
        nxt = batch["prev_action"][1:]
        valid = (1.0 - batch["is_first"][1:].float()).unsqueeze(-1)  # [T-1,B,1]
        pred = self.action_decoder(both[:-1])
        if self.spec.discrete:
            ce = -(pred.float().log_softmax(-1) * nxt).sum(-1)
        else:
            ce = gaussian_nll(pred, nxt)
        terms["action"] = (ce * valid).sum() / (valid.sum() * self.spec.n_agents).clamp(min=1.0)
        total = sum(terms.values())
        metrics = {k: v.detach() for k, v in terms.items()}
        with torch.no_grad():
            metrics["kl_a_raw"] = categorical_kl(logits["post_a"], logits["prior_a"], self.n_cat).mean()
            if self.bilevel:
                metrics["kl_g_raw"] = categorical_kl(logits["post_g"], logits["prior_g"], self.n_cat).mean()
        return total, metrics, post.map(lambda x: x.detach())
