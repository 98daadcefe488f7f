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
from mabl.fast import (PLAIN, FusedLinears, LoopLinear, Speed, kl_balanced_fused, mlp_forward, mlp_tail, mode_flat, no_autocast,
                       onehot_indices, onehot_linear, onehot_weight, sample_st)
from mabl.nets import Ensemble, GRUCell, SplitLinear, gru_update, mlp, sample_onehot


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


def unimix_logits(logits: torch.Tensor, n_classes: int, mix: float) -> torch.Tensor:
    """Log-probabilities of the mixture ``(1 - mix)·softmax(logits) + mix/K`` per categorical of ``K = n_classes``
    (DreamerV3's "unimix"; :attr:`WorldModelConfig.unimix`), fp32 ``[..., C*K]``. Being normalized
    log-probabilities they are valid logits of the mixed distribution for every consumer (sampling,
    KL, softmax); ``mix = 0`` returns ``logits`` unchanged."""
    if mix == 0.0:
        return logits
    p = torch.softmax(logits.float().unflatten(-1, (-1, n_classes)), -1)
    return torch.log(p * (1.0 - mix) + mix / n_classes).flatten(-2)


def gaussian_nll(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log N(target; pred, 1) up to a constant, summed over the last dim."""
    return 0.5 * (pred.float() - target).pow(2).sum(-1)


def bernoulli_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log Bernoulli(target; sigmoid(logits)), summed over the last dim."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none").sum(-1)


class ObsNorm(nn.Module):
    """Per-feature standardization ``(o - mean) / max(std, floor)`` with running statistics.

    :meth:`update` merges a batch's mean and variance into the running ones with weight
    n_batch / (count + n_batch), count capped at ``window``: the exact pooled statistics until
    ``window`` observations have been seen, an exponential average over about the last ``window`` after.
    """

    FLOOR = 0.05

    def __init__(self, dim: int, window: int):
        super().__init__()
        self.window = float(window)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.zeros(()))

    def std(self) -> torch.Tensor:
        return self.var.sqrt().clamp_min(self.FLOOR)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.mean.to(obs.dtype)) / self.std().to(obs.dtype)

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std().to(x.dtype) + self.mean.to(x.dtype)

    @torch.no_grad()
    def update(self, obs: torch.Tensor) -> None:
        x = obs.reshape(-1, obs.shape[-1]).double()
        n = float(x.shape[0])
        if n == 0:
            return
        m, v = x.mean(0), x.var(0, unbiased=False)
        c = float(self.count)
        w = n / (c + n)
        delta = m - self.mean.double()
        self.var.copy_(((1 - w) * self.var.double() + w * v + w * (1 - w) * delta**2).float())
        self.mean.copy_((self.mean.double() + w * delta).float())
        self.count.fill_(min(c + n, self.window))


class BiLevelWorldModel(nn.Module):
    """``initial / observe / imagine_step / loss`` of the bi-level model; see the module docstring."""

    def __init__(self, spec: EnvSpec, cfg: WorldModelConfig, speed: Speed | None = None):
        super().__init__()
        self.spec, self.cfg = spec, cfg
        # speed switches (mabl.fast): none of them changes the math; PLAIN = the reference path
        self.speed: Speed = speed or PLAIN
        n, a = spec.n_agents, spec.action_dim
        H, L, D, E = cfg.hidden, cfg.layers, cfg.deter, cfg.embed
        self.n_cat = cfg.n_categoricals
        S = self.stoch = cfg.n_categoricals * cfg.n_classes
        self.bilevel, self.single_global = cfg.bilevel, cfg.single_global
        self.feat_a = D + S
        self.feat_g = D + S if self.bilevel else 0

        # agent level
        # model.obs_norm (extension): per-feature standardization of o^i (identity when off: no buffers)
        self.obs_norm = ObsNorm(spec.obs_dim, cfg.obs_norm_window) if cfg.obs_norm else None
        self.obs_encoder = mlp(spec.obs_dim, H, L, E)
        self.agent_in = SplitLinear([S, a], H)  # f^a input: (z^a_{t-1}, a^i_{t-1})
        self.agent_gru = GRUCell(H, D)
        self.agent_post = nn.Sequential(SplitLinear([D, E], H), nn.ReLU(), nn.Linear(H, S))  # q(z^a|h^a,o)
        prior_in = [D, S] if self.bilevel else [D]
        self.agent_prior = nn.Sequential(SplitLinear(prior_in, H), nn.ReLU(), nn.Linear(H, S))  # p(ẑ^a|h^a,ẑ^g)
        # model.state_norm (extension): per-feature standardization of s_t (no buffers when off)
        self.state_norm = ObsNorm(spec.state_dim, cfg.obs_norm_window) if cfg.state_norm and self.bilevel else None
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
        # extension (WorldModelConfig.state_decoder): s_t from the global features (z^g, h^g); built
        # last, so every other module starts from the same initial weights with the flag on or off
        self.state_decoder = mlp(self.feat_g, H, L, spec.state_dim) if self.bilevel and cfg.state_decoder else None
        # extension (WorldModelConfig.reward_input="agent+global"): the reward head's first layer also reads
        # (z^g, h^g); its agent columns keep the initial weights drawn above, the global columns are drawn
        # last, so every other module starts from the same weights either way
        self.reward_global = self.bilevel and cfg.reward_input == "agent+global"
        if self.reward_global:
            first = self.reward_head[0]
            wide = nn.Linear(self.feat_a + self.feat_g, first.out_features)
            with torch.no_grad():
                wide.weight[:, : self.feat_a].copy_(first.weight)
                wide.bias.copy_(first.bias)
            self.reward_head[0] = wide
        # extension (WorldModelConfig.agent_prior_input="zhat_g+h_g"): the agent prior's first layer also reads
        # h^g; its new columns are drawn last, so every other module starts from the same weights either way
        self.prior_h_g = self.bilevel and cfg.agent_prior_input == "zhat_g+h_g"
        if self.prior_h_g:
            first = self.agent_prior[0]
            first.parts.append(nn.Linear(D, H, bias=False))
            first.in_dims.append(D)
        # extension (WorldModelConfig.ensemble): one-step predictors of q(z^a_{t+1}) whose disagreement
        # ppo.disagreement subtracts from imagined rewards; built last (every other module's initial
        # weights are the same with it or without it)
        self.ensemble = Ensemble(cfg.ensemble, both + a, H, S) if cfg.ensemble > 0 else None

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
    def norm_obs(self, obs: torch.Tensor) -> torch.Tensor:
        """o^i as the encoder reads it and the decoder predicts it (``model.obs_norm``; else unchanged)."""
        return obs if self.obs_norm is None else self.obs_norm(obs)

    def norm_state(self, state: torch.Tensor) -> torch.Tensor:
        """s_t as the global posterior reads it and the state decoder predicts it (``model.state_norm``)."""
        return state if self.state_norm is None else self.state_norm(state)

    def decode_obs(self, fa: torch.Tensor) -> torch.Tensor:
        """The observation decoded from agent features (z^a, h^a), in the environment's units, fp32."""
        out = self.obs_decoder(fa).float()
        return out if self.obs_norm is None else self.obs_norm.invert(out)

    def observe(self, obs, state, prev_action, is_first, carry: LatentState | None = None, sample: bool = True):
        """Posterior states of a data sequence (Eq. 2 of App. A, applied step by step).

        Everything that does not depend on the recurrence (encoders, the data actions'
        projections, the priors) is computed batched over all time steps.

        Returns ``(post, priors, last)``: ``post`` a :class:`LatentState` ``[T, B, ...]`` plus
        posterior logits in ``priors['post_a' / 'post_g']``, prior logits in
        ``priors['prior_a' / 'prior_g']`` (and in ``priors['zhat_g']`` the sample ẑ^g of the global prior
        that ``prior_a`` is conditioned on), and the final carry.
        """
        obs, state = self.norm_obs(obs), self.norm_state(state)
        if self.speed.fused_recurrence:
            return self._observe_fused(obs, state, prev_action, is_first, carry, sample)
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
            logit_a = self._mix(self.agent_post[2](post_in))
            z_a = self._sample(logit_a, sample)
            hs_a.append(h_a), zs_a.append(z_a), ls_a.append(logit_a)
            if self.bilevel:
                h_g, z_g = h_g * k, z_g * k
                h_g = self.global_gru(F.relu(self.global_in.part(0, z_g) + jact_x[t]), h_g)
                g_in = self.global_post[0].part(0, h_g) + post_g_x[t] + self.global_post[0].part(2, self._z_a_for_global(z_a))
                logit_g = self._mix(self.global_post[2](F.relu(g_in)))
                z_g = self._sample(logit_g, sample)
                hs_g.append(h_g), zs_g.append(z_g), ls_g.append(logit_g)

        post = LatentState(torch.stack(hs_a), torch.stack(zs_a),
                           torch.stack(hs_g) if self.bilevel else None, torch.stack(zs_g) if self.bilevel else None)
        logits = {"post_a": torch.stack(ls_a)}
        # priors, batched over time
        if self.bilevel:
            logits["post_g"] = torch.stack(ls_g)
            logits["prior_g"] = self._mix(self.global_prior(post.h_g))
            logits["zhat_g"] = self._sample(logits["prior_g"], sample)  # the ẑ^g the agent prior is conditioned on
            logits["prior_a"] = self._agent_prior(post.h_a, self._expand_g(logits["zhat_g"]), self._expand_g(post.h_g))
        else:
            logits["prior_a"] = self._agent_prior(post.h_a)
        return post, logits, LatentState(h_a, z_a, h_g, z_g)

    def _recon(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Reconstruction loss of ``model.obs_loss`` (observations, and the optional state), summed over
        features, averaged over the rest."""
        if self.cfg.obs_loss == "mse":
            return gaussian_nll(pred, target).mean()
        return F.smooth_l1_loss(pred.float(), target.expand(pred.shape), reduction="none").sum(-1).mean()

    def _reward_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Reward head loss of ``model.reward_loss``: "mse" = -log N(r; r̂, 1) up to a constant,
        "smooth_l1" = Huber with delta 1 (the authors' code), both averaged over time, batch, agents."""
        if self.cfg.reward_loss == "mse":
            return (0.5 * (pred.float() - target).pow(2)).mean()
        return F.smooth_l1_loss(pred.float(), target)

    def _cont_target(self, batch) -> torch.Tensor:
        """The termination head's target per agent ``[T, B, N]``: every agent predicts the team's continuation."""
        return batch["cont"].unsqueeze(-1).expand(*batch["cont"].shape, self.spec.n_agents)

    def _prior_head_terms(self, batch, post: LatentState, logits, dtype) -> dict[str, torch.Tensor]:
        """``cfg.prior_heads`` (extension): the reward and termination losses once more, on one-step prior
        samples instead of the posterior latents: ẑ^a_t ~ p(ẑ^a | h^a_t, ẑ^g_t), ẑ^g_t ~ p(ẑ^g | h^g_t), the
        h from the posterior rollout, the same targets. Imagination feeds the heads prior samples only; on
        the posterior alone they can rely on latent codes the priors never produce (on SMAX 3m, at real
        terminal steps: continuation 0.00 from the posterior, 0.2-0.8 from one-step prior samples; BENCHMARKS.md
        section ``diagnosis:smax:3m:imagined_by_step``).
        Gradients reach the priors through the straight-through samples."""
        za = self._sample(logits["prior_a"], True, dtype)
        fa, fg = self.features(LatentState(post.h_a.to(dtype), za, None if post.h_g is None else post.h_g.to(dtype),
                                           logits.get("zhat_g")))
        reward = mlp_forward(self.reward_head, self._reward_in(fa, fg), dtype).squeeze(-1)
        cont = mlp_forward(self.cont_head, self._both(fa, fg), dtype).squeeze(-1)
        cont_target = self._cont_target(batch)
        w = self.cfg.prior_heads
        return {"reward_prior": w * self._reward_loss(reward, batch["reward"]),
                "cont_prior": w * F.binary_cross_entropy_with_logits(cont.float(), cont_target).mean()}

    def _ensemble_in(self, fa: torch.Tensor, fg: torch.Tensor | None, action: torch.Tensor) -> torch.Tensor:
        """The ensemble's detached input (fa, fg, a), built once in the speed dtype its matmuls use."""
        dt = self.speed.dtype
        parts = [fa] if fg is None else [fa, fg]
        return torch.cat([x.detach().to(dt) for x in parts + [action]], -1)

    def _ensemble_terms(self, batch, fa: torch.Tensor, fg: torch.Tensor | None, logits) -> dict[str, torch.Tensor]:
        """``cfg.ensemble`` (extension): every member's squared error predicting agent i's next posterior
        q(z^a_{t+1} | ...) (its class probabilities, not a sample of it: less noise to fit) from the detached
        (z^a_t, h^a_t, z^g_t, h^g_t) and a^i_t (the next step's ``prev_action``), within an episode, summed over
        each categorical's classes and averaged over the categoricals, members, steps and agents. Only the
        ensemble learns from it. Its matmuls run in the speed dtype (bf16 with ``run.bf16``). ``fa``, ``fg``:
        the posterior features the loss already built."""
        x = self._ensemble_in(fa[:-1], None if fg is None else fg[:-1], batch["prev_action"][1:])
        post_a = logits["post_a"][1:].detach().float()
        target = post_a.unflatten(-1, (self.n_cat, -1)).softmax(-1).flatten(-2)
        err = (self.ensemble(x, self.speed.dtype) - target).pow(2).sum(-1) / self.n_cat  # [K, T-1, B, N]
        valid = (1.0 - batch["is_first"][1:].float()).unsqueeze(-1).expand(err.shape[1:])
        return {"ensemble": (err * valid).sum() / (valid.sum() * err.shape[0]).clamp(min=1.0)}

    @torch.no_grad()
    def disagreement(self, fa: torch.Tensor, fg: torch.Tensor | None, action: torch.Tensor) -> torch.Tensor:
        """``[..., N]``: the variance across the ensemble's members of their predictions of q(z^a_{t+1}) from
        features ``fa``, ``fg`` and model-format actions ``action [..., N, A]``, summed over each categorical's
        classes and averaged over the categoricals (the scale of the training error of :meth:`_ensemble_terms`)."""
        if self.ensemble is None:
            raise ValueError("disagreement needs model.ensemble >= 2")
        pred = self.ensemble(self._ensemble_in(fa, fg, action), self.speed.dtype)
        return pred.var(0, unbiased=False).sum(-1) / self.n_cat

    def _mix(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits of a latent distribution as used everywhere: with ``cfg.unimix`` those of the uniform
        mixture (:func:`unimix_logits`), else ``logits`` itself."""
        return unimix_logits(logits, self.cfg.n_classes, self.cfg.unimix)

    def _agent_prior(self, h_a: torch.Tensor, zhat_g: torch.Tensor | None = None, h_g: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of p(ẑ^a | h^a, ẑ^g) (top-down; without the global level p(ẑ^a | h^a); with
        ``agent_prior_input="zhat_g+h_g"`` p(ẑ^a | h^a, ẑ^g, h^g), where ``h_g`` is the agent's global state)."""
        if zhat_g is None:
            return self._mix(self.agent_prior(h_a))
        if self.prior_h_g:
            if h_g is None:
                raise ValueError("agent_prior_input='zhat_g+h_g': the agent prior needs h^g")
            return self._mix(self.agent_prior[2](F.relu(self.agent_prior[0](h_a, zhat_g, h_g))))
        return self._mix(self.agent_prior[2](F.relu(self.agent_prior[0](h_a, zhat_g))))

    @property
    def imagine_sample(self) -> bool:
        """Whether imagination samples the prior latents (``cfg.imagine_latent="sample"``) or takes their mode."""
        return self.cfg.imagine_latent == "sample"

    def imagine_draw(self, logits: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A prior latent for imagination from ``logits`` (unimix already applied): a sample of
        softmax(logits / ``cfg.imagine_temperature``), or with ``cfg.imagine_latent="mode"`` each
        categorical's most likely class."""
        if not self.imagine_sample:
            return self._sample(logits, False, dtype)
        t = self.cfg.imagine_temperature
        return self._sample(logits if t == 1.0 else logits / t, True, dtype)

    def _sample(self, logits: torch.Tensor, sample: bool, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.speed.fast_sampling:
            out = dtype or logits.dtype
            return sample_st(logits, self.cfg.n_classes, out) if sample else mode_flat(logits, self.cfg.n_classes, out)
        shaped = logits.unflatten(-1, (self.n_cat, -1))
        if sample:
            z = sample_onehot(shaped)
        else:
            z = F.one_hot(shaped.argmax(-1), shaped.shape[-1]).to(torch.float32)
        return z.flatten(-2).to(logits.dtype) if logits.dtype != torch.float32 else z.flatten(-2)

    # -- prior step (imagination) -----------------------------------------------------------
    def imagine_step(self, st: LatentState, action: torch.Tensor) -> LatentState:
        """One transition of the priors (§3.1 'Transition Model') under agents' actions ``[..., N, A]``
        (latents drawn by :meth:`imagine_draw`: sampled, at ``cfg.imagine_temperature``, or each categorical's mode)."""
        h_a = self.agent_gru(F.relu(self.agent_in(st.z_a, action)), st.h_a)
        if not self.bilevel:
            z_a = self.imagine_draw(self._agent_prior(h_a))
            return LatentState(h_a, z_a)
        h_g = self.global_gru(F.relu(self.global_in(st.z_g, self.joint_action(action))), st.h_g)
        z_g = self.imagine_draw(self._mix(self.global_prior(h_g)))
        z_a = self.imagine_draw(self._agent_prior(h_a, self._expand_g(z_g), self._expand_g(h_g)))
        return LatentState(h_a, z_a, h_g, z_g)

    # -- heads ------------------------------------------------------------------------------
    def _both(self, fa, fg):
        return fa if fg is None else torch.cat([fa, fg], -1)

    def _reward_in(self, fa, fg):
        """The reward head's input: (z^a, h^a), and (z^g, h^g) with ``reward_input="agent+global"``."""
        return self._both(fa, fg) if self.reward_global else fa

    def heads(self, st: LatentState) -> dict[str, torch.Tensor]:
        fa, fg = self.features(st)
        both = self._both(fa, fg)
        out = {"reward": self.reward_head(self._reward_in(fa, fg)).squeeze(-1), "cont": self.cont_head(both).squeeze(-1)}
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
        if self.speed.fused_heads or self.speed.fused_kl:
            return self._loss_fused(batch, post, logits)
        fa, fg = self.features(post)
        both = self._both(fa, fg)
        terms: dict[str, torch.Tensor] = {}
        terms["obs"] = self._recon(self.obs_decoder(fa), self.norm_obs(batch["obs"]))
        if self.state_decoder is not None:
            terms["state"] = cfg.state_scale * self._recon(self.state_decoder(fg), self.norm_state(batch["state"]).unsqueeze(-2))
        terms["kl_a"] = cfg.kl_scale * kl_balanced(logits["post_a"], logits["prior_a"], self.n_cat, cfg.kl_balance).mean()
        if self.bilevel:
            terms["kl_g"] = cfg.kl_scale * kl_balanced(logits["post_g"], logits["prior_g"], self.n_cat, cfg.kl_balance).mean()
        terms["reward"] = self._reward_loss(self.reward_head(self._reward_in(fa, fg)).squeeze(-1), batch["reward"])
        cont_target = self._cont_target(batch)
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
        if cfg.prior_heads > 0:
            terms.update(self._prior_head_terms(batch, post, logits, torch.float32))
        if self.ensemble is not None:
            terms.update(self._ensemble_terms(batch, fa, fg, logits))
        total = sum(terms.values())
        metrics = {k: v.detach() for k, v in terms.items()}
        with torch.no_grad():
            metrics["kl_a_raw"] = categorical_kl(logits["post_a"], logits["prior_a"], self.n_cat).mean()
            if self.bilevel:
                metrics["kl_g_raw"] = categorical_kl(logits["post_g"], logits["prior_g"], self.n_cat).mean()
        return total, metrics, post.map(lambda x: x.detach())

    # ======================================================================================
    # Fused paths (mabl.fast.Speed). Same parameters, same math, fewer and larger operations.

    def _observe_fused(self, obs, state, prev_action, is_first, carry, sample):
        """:meth:`observe` with the recurrence restructured (``Speed.fused_recurrence``).

        * the GRU's matmul on ``[x, h]`` is split into ``x W_x`` and ``h W_h``; every matmul of a
          recurrent tensor is done once for all its consumers: ``h^a W`` gives the posterior's
          and the next GRU step's parts, ``z^a W`` the next input's and the global posterior's;
        * the carry reset (``is_first``) multiplies those projections by 0/1, exactly like
          multiplying the carry itself; all biases live in the time-batched projections;
        * matmul inputs stay in the compute dtype; the GRU state and its gates stay fp32.
        """
        sp, cfg = self.speed, self.cfg
        dt = sp.dtype
        T, B, N = obs.shape[:3]
        D, S, H, K = cfg.deter, self.stoch, cfg.hidden, cfg.n_classes
        R = B * N
        if carry is None:
            carry = self.initial((B,), obs.device)
        with no_autocast(obs.device.type):
            c = lambda p: p.to(dt)  # noqa: E731
            keep = (~is_first.bool()).to(dt)  # [T,B]
            keep_a = keep[:, :, None].expand(T, B, N).reshape(T, R, 1)
            keep_a32 = keep_a.float()
            # time-batched projections (the biases folded in here)
            ain, ap0, ag = self.agent_in, self.agent_post[0], self.agent_gru.lin
            emb = mlp_forward(self.obs_encoder, obs, dt)
            post_a_x = F.linear(emb, c(ap0.parts[1].weight), c(ap0.parts[0].bias)).reshape(T, R, H)
            act_x = F.linear(prev_action.to(dt), c(ain.parts[1].weight), c(ain.parts[0].bias)).reshape(T, R, H)
            Wx_a, b_a = c(ag.weight[:, :H]), c(ag.bias)
            W_ha = c(torch.cat([ap0.parts[0].weight, ag.weight[:, H:]], 0))  # h^a -> [posterior | next GRU]
            W_pa2, b_pa2 = c(self.agent_post[2].weight), c(self.agent_post[2].bias)
            if self.bilevel:
                G = self.n_global
                RG = B * G
                keep_g = keep[:, :, None].expand(T, B, G).reshape(T, RG, 1)
                keep_g32 = keep_g.float()
                gin, gp0, gg = self.global_in, self.global_post[0], self.global_gru.lin
                s_emb = mlp_forward(self.state_encoder, state, dt)  # [T,B,E]
                post_g_x = F.linear(s_emb, c(gp0.parts[1].weight), c(gp0.parts[0].bias))
                jact_x = F.linear(prev_action.flatten(-2).to(dt), c(gin.parts[1].weight), c(gin.parts[0].bias))
                post_g_x = post_g_x[:, :, None].expand(T, B, G, H).reshape(T, RG, H)
                jact_x = jact_x[:, :, None].expand(T, B, G, H).reshape(T, RG, H)
                Wx_g, b_g = c(gg.weight[:, :H]), c(gg.bias)
                W_hg = c(torch.cat([gp0.parts[0].weight, gg.weight[:, H:]], 0))  # h^g -> [posterior | next GRU]
                W_za = c(torch.cat([ain.parts[0].weight, gp0.parts[2].weight], 0))  # z^a -> [next input | global posterior]
                W_zg = c(gin.parts[0].weight)
                W_pg2, b_pg2 = c(self.global_post[2].weight), c(self.global_post[2].bias)
            else:
                W_za = c(ain.parts[0].weight)

            if self.bilevel and not self.single_global:
                out = self._loop_stacked(carry, sample, dt, T, B, N, act_x, jact_x, post_a_x, post_g_x, keep_a, keep_a32,
                                         (Wx_a, b_a, W_ha, W_pa2, b_pa2, W_za), (Wx_g, b_g, W_hg, W_pg2, b_pg2, W_zg))
                return self._observe_fused_finish(out, sample, dt, T, B, N)
            # loop matmuls: per-step input gradients, one weight-gradient matmul per weight
            L_xa, L_ha, L_pa, L_za = LoopLinear(Wx_a), LoopLinear(W_ha), LoopLinear(W_pa2), LoopLinear(W_za)
            post_a_x, act_x, keep_a, keep_a32 = post_a_x.unbind(0), act_x.unbind(0), keep_a.unbind(0), keep_a32.unbind(0)
            h_a = carry.h_a.reshape(R, D).float()
            z_a = carry.z_a.reshape(R, S).to(dt)
            gru_a = L_ha(h_a.to(dt), slice(H, None))  # the carry's recurrent GRU part
            in_a = L_za(z_a, slice(0, H))  # the carry's input part
            if self.bilevel:
                L_xg, L_hg, L_pg, L_zg = LoopLinear(Wx_g), LoopLinear(W_hg), LoopLinear(W_pg2), LoopLinear(W_zg)
                post_g_x, jact_x, keep_g, keep_g32 = post_g_x.unbind(0), jact_x.unbind(0), keep_g.unbind(0), keep_g32.unbind(0)
                h_g = carry.h_g.reshape(RG, D).float()
                z_g = carry.z_g.reshape(RG, S).to(dt)
                gru_g = L_hg(h_g.to(dt), slice(H, None))
                in_g = L_zg(z_g)
            hs_a, zs_a, ls_a, hs_g, zs_g, ls_g = [], [], [], [], [], []
            # (split, not slices, of the fused projections: one backward node each)
            for t in range(T):
                last = t == T - 1
                k, k32 = keep_a[t], keep_a32[t]
                x = F.relu(in_a * k + act_x[t])
                h_a = gru_update(L_xa(x) + b_a + gru_a * k, h_a * k32, D)
                if last:
                    post_h = L_ha(h_a.to(dt), slice(0, H))
                else:
                    post_h, gru_a = L_ha(h_a.to(dt)).split([H, 3 * D], -1)
                logit_a = self._mix(L_pa(F.relu(post_h + post_a_x[t])) + b_pa2)
                z_a = self._sample(logit_a, sample, dt)
                hs_a.append(h_a), zs_a.append(z_a), ls_a.append(logit_a)
                if not self.bilevel:
                    if not last:
                        in_a = L_za(z_a)
                    continue
                if last:
                    gz = L_za(z_a, slice(H, None))
                else:
                    in_a, gz = L_za(z_a).split([H, H], -1)
                if self.single_global:  # the global posterior sees the mean agent latent
                    gz = gz.reshape(B, N, H).mean(1)
                kg, kg32 = keep_g[t], keep_g32[t]
                xg = F.relu(in_g * kg + jact_x[t])
                h_g = gru_update(L_xg(xg) + b_g + gru_g * kg, h_g * kg32, D)
                if last:
                    post_hg = L_hg(h_g.to(dt), slice(0, H))
                else:
                    post_hg, gru_g = L_hg(h_g.to(dt)).split([H, 3 * D], -1)
                logit_g = self._mix(L_pg(F.relu(post_hg + post_g_x[t] + gz)) + b_pg2)
                z_g = self._sample(logit_g, sample, dt)
                if not last:
                    in_g = L_zg(z_g)
                hs_g.append(h_g), zs_g.append(z_g), ls_g.append(logit_g)

        return self._observe_fused_finish((hs_a, zs_a, ls_a, hs_g, zs_g, ls_g, h_a, z_a, h_g if self.bilevel else None,
                                           z_g if self.bilevel else None), sample, dt, T, B, N)

    def _loop_stacked(self, carry, sample, dt, T, B, N, act_x, jact_x, post_a_x, post_g_x, keep, keep32, wa, wg):
        """The posterior recurrence with both levels' GRU steps and recurrent projections in one
        batched matmul each (both levels have B*N rows when every agent has its own global latent):
        the global GRU step t needs only step t-1 quantities, like the agent's."""
        D, S, H = self.cfg.deter, self.stoch, self.cfg.hidden
        R = B * N
        Wx_a, b_a, W_ha, W_pa2, b_pa2, W_za = wa
        Wx_g, b_g, W_hg, W_pg2, b_pg2, W_zg = wg
        Lx2, Lh2 = LoopLinear(torch.stack([Wx_a, Wx_g])), LoopLinear(torch.stack([W_ha, W_hg]))
        bx2 = torch.stack([b_a, b_g]).unsqueeze(1)  # [2,1,3D]
        L_pa, L_pg, L_za, L_zg = LoopLinear(W_pa2), LoopLinear(W_pg2), LoopLinear(W_za), LoopLinear(W_zg)
        xin = torch.stack([act_x, jact_x], 1).unbind(0)  # T x [2,R,H]
        pin = torch.stack([post_a_x, post_g_x], 1).unbind(0)
        keep, keep32 = keep.unbind(0), keep32.unbind(0)
        hh = torch.stack([carry.h_a.reshape(R, D), carry.h_g.reshape(R, D)]).float()  # [2,R,D]
        z_a, z_g = carry.z_a.reshape(R, S).to(dt), carry.z_g.reshape(R, S).to(dt)
        gru2 = Lh2(hh.to(dt), slice(H, None))
        in2 = torch.stack([L_za(z_a, slice(0, H)), L_zg(z_g)])
        hs_a, zs_a, ls_a, hs_g, zs_g, ls_g = [], [], [], [], [], []
        for t in range(T):
            last = t == T - 1
            k, k32 = keep[t], keep32[t]
            x = F.relu(in2 * k + xin[t])
            hh = gru_update(Lx2(x) + bx2 + gru2 * k, hh * k32, D)
            if last:
                post2 = Lh2(hh.to(dt), slice(0, H))
            else:
                post2, gru2 = Lh2(hh.to(dt)).split([H, 3 * D], -1)
            pre_a, pre_g = (post2 + pin[t]).unbind(0)
            logit_a = self._mix(L_pa(F.relu(pre_a)) + b_pa2)
            z_a = self._sample(logit_a, sample, dt)
            if last:
                gz = L_za(z_a, slice(H, None))
            else:
                in_a, gz = L_za(z_a).split([H, H], -1)
            logit_g = self._mix(L_pg(F.relu(pre_g + gz)) + b_pg2)
            z_g = self._sample(logit_g, sample, dt)
            if not last:
                in2 = torch.stack([in_a, L_zg(z_g)])
            h_a, h_g = hh.unbind(0)
            hs_a.append(h_a), zs_a.append(z_a), ls_a.append(logit_a)
            hs_g.append(h_g), zs_g.append(z_g), ls_g.append(logit_g)
        return hs_a, zs_a, ls_a, hs_g, zs_g, ls_g, h_a, z_a, h_g, z_g

    def _observe_fused_finish(self, out, sample, dt, T, B, N):
        """Stack the recurrence outputs; the priors batched over time."""
        hs_a, zs_a, ls_a, hs_g, zs_g, ls_g, h_a, z_a, h_g, z_g = out
        D, S = self.cfg.deter, self.stoch
        c = lambda p: p.to(dt)  # noqa: E731
        G = self.n_global
        with no_autocast(h_a.device.type):
            shape_a = (T, B, N)
            post = LatentState(torch.stack(hs_a).view(*shape_a, D), torch.stack(zs_a).view(*shape_a, S))
            logits = {"post_a": torch.stack(ls_a).view(*shape_a, S)}
            if self.bilevel:
                shape_g = (T, B, G)
                post.h_g = torch.stack(hs_g).view(*shape_g, D)
                post.z_g = torch.stack(zs_g).view(*shape_g, S)
                logits["post_g"] = torch.stack(ls_g).view(*shape_g, S)
                logits["prior_g"] = self._mix(mlp_forward(self.global_prior, post.h_g, dt))
                logits["zhat_g"] = self._sample(logits["prior_g"], sample, dt)
                zhat_g = self._expand_g(logits["zhat_g"])
                ap = self.agent_prior[0]
                if self.speed.gather:  # Speed.gather_onehot: the sampled ẑ^g enters as a gather
                    z_part = onehot_linear(zhat_g, onehot_indices(zhat_g, self.cfg.n_classes), onehot_weight(c(ap.parts[1].weight)))
                else:
                    z_part = F.linear(zhat_g, c(ap.parts[1].weight))
                pre = F.linear(post.h_a.to(dt), c(ap.parts[0].weight), c(ap.parts[0].bias)) + z_part
                if self.prior_h_g:
                    pre = pre + F.linear(self._expand_g(post.h_g).to(dt), c(ap.parts[2].weight))
                logits["prior_a"] = self._mix(mlp_tail(self.agent_prior, pre, dt))
            else:
                ap = self.agent_prior[0]
                logits["prior_a"] = self._mix(mlp_tail(self.agent_prior, F.linear(post.h_a.to(dt), c(ap.parts[0].weight), c(ap.parts[0].bias)), dt))
            last_carry = LatentState(h_a.view(B, N, D), z_a.view(B, N, S),
                                     h_g.view(B, G, D) if self.bilevel else None, z_g.view(B, G, S) if self.bilevel else None)
        return post, logits, last_carry

    def reward_first_layer(self):
        """(bias, {source: weight columns}) of the reward head's first layer for :class:`FusedLinears`."""
        w = self.reward_head[0].weight
        return self.reward_head[0].bias, ({"fa": w[:, : self.feat_a], "fg": w[:, self.feat_a:]} if self.reward_global else {"fa": w})

    def fused_heads(self, dtype: torch.dtype, action: bool = True) -> FusedLinears:
        """First layers of the heads as one :class:`FusedLinears` over the sources ``fa``/``fg``."""
        F_a = self.feat_a
        fl = FusedLinears(dtype)
        fl.add("obs", self.obs_decoder[0].bias, {"fa": self.obs_decoder[0].weight})
        fl.add("reward", *self.reward_first_layer())
        if self.state_decoder is not None:
            fl.add("state", self.state_decoder[0].bias, {"fg": self.state_decoder[0].weight})
        both = [("cont", self.cont_head), ("avail", self.avail_head)] + ([("action", self.action_decoder)] if action else [])
        for name, net in both:
            if net is None:
                continue
            w = net[0].weight
            fl.add(name, net[0].bias, {"fa": w[:, :F_a], "fg": w[:, F_a:]} if self.bilevel else {"fa": w})
        return fl.build()

    def _loss_fused(self, batch, post: LatentState, logits):
        """:meth:`loss` with ``Speed.fused_heads`` (one matmul per feature tensor for the first
        layers of all heads) and/or ``Speed.fused_kl`` (the balanced KL computed once)."""
        cfg, sp = self.cfg, self.speed
        dt = sp.dtype
        terms: dict[str, torch.Tensor] = {}
        with no_autocast(batch["obs"].device.type):
            if sp.fused_heads:
                fa = torch.cat([post.z_a.to(dt), post.h_a.to(dt)], -1)
                fg = self._expand_g(torch.cat([post.z_g.to(dt), post.h_g.to(dt)], -1)) if self.bilevel else None
                fl = self.fused_heads(dt)
                # Speed.gather_onehot: the latents' columns of the first layers as gathers (forward)
                ia = onehot_indices(post.z_a, cfg.n_classes) if sp.gather else None
                ig = self._expand_g(onehot_indices(post.z_g, cfg.n_classes)) if sp.gather and self.bilevel else None
                pa = fl.project_onehot("fa", fa, ia, self.stoch)
                pg = fl.project_onehot("fg", fg, ig, self.stoch) if self.bilevel else None
                head = lambda name, net, p=None: mlp_tail(net, fl.out(name, pa, pg) if p is None else p, dt)  # noqa: E731
                obs_pred = head("obs", self.obs_decoder)
                state_pred = head("state", self.state_decoder) if self.state_decoder is not None else None
                reward_pred = head("reward", self.reward_head).squeeze(-1)
                cont_pred = head("cont", self.cont_head).squeeze(-1)
                avail_pred = head("avail", self.avail_head) if self.avail_head is not None else None
                act_pred = head("action", self.action_decoder, fl.out("action", pa, pg)[:-1])
            else:
                with torch.autocast(batch["obs"].device.type, dtype=torch.bfloat16, enabled=sp.bf16):
                    fa, fg = self.features(post)
                    both = self._both(fa, fg)
                    obs_pred = self.obs_decoder(fa)
                    state_pred = self.state_decoder(fg) if self.state_decoder is not None else None
                    reward_pred = self.reward_head(self._reward_in(fa, fg)).squeeze(-1)
                    cont_pred = self.cont_head(both).squeeze(-1)
                    avail_pred = self.avail_head(both) if self.avail_head is not None else None
                    act_pred = self.action_decoder(both[:-1])
            terms["obs"] = self._recon(obs_pred, self.norm_obs(batch["obs"]))
            if state_pred is not None:
                terms["state"] = cfg.state_scale * self._recon(state_pred, self.norm_state(batch["state"]).unsqueeze(-2))
            kls = {}
            for lvl in ("a", "g") if self.bilevel else ("a",):
                post_l, prior_l = logits[f"post_{lvl}"], logits[f"prior_{lvl}"]
                if sp.fused_kl:
                    kl = kl_balanced_fused(post_l, prior_l, self.n_cat, cfg.kl_balance)
                    kls[lvl] = kl.detach().mean()
                else:
                    kl = kl_balanced(post_l, prior_l, self.n_cat, cfg.kl_balance)
                    with torch.no_grad():
                        kls[lvl] = categorical_kl(post_l, prior_l, self.n_cat).mean()
                terms[f"kl_{lvl}"] = cfg.kl_scale * kl.mean()
            terms["reward"] = self._reward_loss(reward_pred, batch["reward"])
            cont_target = self._cont_target(batch)
            terms["cont"] = F.binary_cross_entropy_with_logits(cont_pred.float(), cont_target).mean()
            if avail_pred is not None:
                terms["avail"] = bernoulli_nll(avail_pred, batch["avail"]).mean() / self.spec.action_dim
            nxt = batch["prev_action"][1:]
            valid = (1.0 - batch["is_first"][1:].float()).unsqueeze(-1)
            if self.spec.discrete:
                ce = -(act_pred.float().log_softmax(-1) * nxt).sum(-1)
            else:
                ce = gaussian_nll(act_pred, nxt)
            terms["action"] = (ce * valid).sum() / (valid.sum() * self.spec.n_agents).clamp(min=1.0)
            if cfg.prior_heads > 0:
                terms.update(self._prior_head_terms(batch, post, logits, dt))
            if self.ensemble is not None:
                terms.update(self._ensemble_terms(batch, fa, fg, logits))
            # same order of terms as the plain path
            order = ["obs", "state", "kl_a", "kl_g", "reward", "cont", "avail", "action", "reward_prior", "cont_prior", "ensemble"]
            terms = {k: terms[k] for k in order if k in terms}
            total = sum(terms.values())
        metrics = {k: v.detach() for k, v in terms.items()}
        metrics["kl_a_raw"] = kls["a"]
        if self.bilevel:
            metrics["kl_g_raw"] = kls["g"]
        return total, metrics, post.map(lambda x: x.detach())
