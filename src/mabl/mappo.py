"""MAPPO trained purely in imagination (paper §3.3, Algorithm 1 lines 9-14, Table 3).

The actor sees only the agent features (z^a, h^a); the centralized critic sees the global
and agent features of every agent and mixes them with self-attention across agents.
The algorithm sits behind :class:`Algorithm` so another MARL method can be plugged in.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mabl.config import PPOConfig
from mabl.errors import ConfigError
from mabl.envs.base import EnvSpec
from mabl.fast import (PLAIN, Caster, FusedLinears, agent_attention, clip_grad_norm, fused_adam, mlp_forward, mlp_tail, no_autocast,
                       onehot_indices, split_linear, sync)
from mabl.nets import gru_update, mlp
from mabl.policy import Actor
from mabl.world_model import BiLevelWorldModel, LatentState


# ------------------------------------------------------------------------------------------
# pure functions

def gae(rewards: torch.Tensor, values: torch.Tensor, cont: torch.Tensor, gamma: float, lam: float):
    """Generalized advantage estimation over an imagined trajectory.

    ``rewards[t]`` and ``cont[t]`` belong to the transition s_t -> s_{t+1} (reward received and
    probability that s_{t+1} is not terminal); ``values`` has one more step (V(s_0..s_H)).
    δ_t = r_t + γ c_t V_{t+1} - V_t,  A_t = δ_t + γ λ c_t A_{t+1}.  Returns ``(adv, returns)``.
    """
    H = rewards.shape[0]
    adv = torch.zeros_like(values[0])
    advs = []
    for t in reversed(range(H)):
        delta = rewards[t] + gamma * cont[t] * values[t + 1] - values[t]
        adv = delta + gamma * lam * cont[t] * adv
        advs.append(adv)
    adv = torch.stack(advs[::-1])
    return adv, adv + values[:-1]


def return_range_ema(returns: torch.Tensor, previous: float | None, decay: float) -> float:
    """DreamerV3's return scale: EMA of the 95th minus the 5th percentile of the batch's returns.

    The first batch sets the average (no bias towards 0); the advantage is then A / max(floor, S).
    """
    r = returns.detach().float().flatten()
    lo, hi = torch.quantile(r, torch.tensor([0.05, 0.95], device=r.device)).tolist()  # one sort for both
    spread = hi - lo
    return spread if previous is None else decay * previous + (1.0 - decay) * spread


ENTROPY_COEF_MAX = 1.0


def adapt_entropy_coef(coef: float, entropy: float, target: float, lr: float, annealing: float, floor: float) -> float:
    """The entropy coefficient after one actor step.

    ``target <= 0`` (the paper): ``coef * annealing``. Otherwise a controller on the policy's entropy:
    ``log(coef) += lr * (target - entropy)``, kept in ``[floor, ENTROPY_COEF_MAX]``, so the bonus grows
    while the policy is more deterministic than ``target`` nats and shrinks back toward ``floor``
    (``ppo.entropy``) while it is more random. The floor keeps the near-uniform policy of the first
    updates from winding the coefficient down to nothing before the entropy ever falls below target.
    """
    if target <= 0:
        return coef * annealing
    return min(ENTROPY_COEF_MAX, max(floor, coef * math.exp(lr * (target - entropy))))


def ppo_clip_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, clip: float) -> torch.Tensor:
    """Per-sample clipped surrogate -min(ρA, clip(ρ)A)."""
    ratio = (logp - logp_old).exp()
    return -torch.min(ratio * adv, ratio.clamp(1.0 - clip, 1.0 + clip) * adv)


def reach_weights(cont: torch.Tensor) -> torch.Tensor:
    """w_t = Π_{k<t} c_k: probability that imagined state t is reached before termination."""
    ones = torch.ones_like(cont[:1])
    return torch.cat([ones, cont[:-1]], 0).cumprod(0)


def imagined_state(model: BiLevelWorldModel, traj: "Imagined", t: int) -> LatentState:
    """The model carry (fp32) of imagined state ``t``, read back from the trajectory's features."""
    S = model.stoch
    fa = traj.feat_a[t].float()
    if traj.feat_g is None:
        return LatentState(h_a=fa[..., S:], z_a=fa[..., :S])
    fg = traj.feat_g[t].float()[..., :model.n_global, :]  # a single global latent is seen per agent: keep one copy
    return LatentState(h_a=fa[..., S:], z_a=fa[..., :S], h_g=fg[..., S:], z_g=fg[..., :S])


def counterfactual_baseline(branch, actor: Actor, traj: "Imagined", samples: int, gamma: float, bootstrap: bool,
                            team_reward: bool) -> torch.Tensor:
    """Per-agent counterfactual baselines ``b [H, M, N]`` of an imagined trajectory (``ppo.counterfactual_samples``).

    b_j(t) = E_{a'_j ~ π_j(.|s_t)} [ r(s_t, (a'_j, a_{-j})) + γ c V_j(s') ], estimated with ``samples``
    draws of agent j's action from the actor (masked by the predicted availability of step t) while the
    other agents keep theirs: the one-step return of the branch in which only agent j acted otherwise.
    It does not depend on agent j's own action, so subtracting it leaves the policy gradient unbiased.

    ``branch(t, action)`` steps the model once from imagined state t under model actions
    ``[K, N, M, N, A]`` (K draws x N deviating agents; leading axes broadcast over the state) and
    returns the transition's reward, continuation probability and the critic's value of the next
    state, each ``[K, N, M, N]``. ``bootstrap=False`` takes V = 0 after the last imagined step (as
    :meth:`MAPPO._advantages`); ``team_reward`` uses the agents' mean reward, else agent j's own.
    """
    H, M, N = traj.raw.shape[:3]
    eye = torch.eye(N, dtype=torch.bool, device=traj.raw.device).view(1, N, 1, N, 1)  # [k, j, m, n, a]: n == j
    diag = lambda x: x.diagonal(dim1=1, dim2=3)  # noqa: E731  [K, N(j), M, N] -> [K, M, N]: agent j's entry of branch j
    out = []
    for t in range(H):
        avail = None if traj.avail is None else traj.avail[t]
        params = actor.params(traj.feat_a[t].float(), avail)
        taken = actor.env_to_model_action(traj.raw[t]).float()  # [M, N, A]
        alt = torch.stack([actor.env_to_model_action(actor.sample_from_params(*params)[0]).float() for _ in range(samples)])
        act = torch.where(eye, alt.unsqueeze(1), taken)  # [K, N, M, N, A]: branch (k, j) changes agent j only
        reward, cont, value = branch(t, act)
        if not bootstrap and t == H - 1:
            value = torch.zeros_like(value)
        r = reward.mean(-1).transpose(1, 2) if team_reward else diag(reward)
        out.append((r + gamma * diag(cont) * diag(value)).mean(0))
    return torch.stack(out)


# ------------------------------------------------------------------------------------------
# networks

def real_returns(reward: torch.Tensor, cont: torch.Tensor, is_first: torch.Tensor, values: torch.Tensor,
                 gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Observed discounted returns along replayed sequences (``ppo.self_imitation``).

    Buffer layout (:mod:`mabl.buffer`): step t holds the reward for arriving at t, cont_t and
    is_first_t; the action taken at t is stored as step t+1's previous action. So for the action at t:
    G_t = r_{t+1} + γ c_{t+1} G_{t+1}; where the sequence is cut (its last step, or a step followed by
    a new episode without being terminal, a time-limit truncation) G_t = c_t V(s_t). ``reward`` and
    ``values`` ``[T, B, N]``, ``cont`` / ``is_first`` ``[T, B]``. Returns ``(G [T, B, N], acted [T, B])``,
    ``acted`` marking the steps whose action lies inside the sequence (t < T-1, not terminal, next step
    of the same episode)."""
    T = reward.shape[0]
    cont, first = cont.float(), is_first.bool()
    G = torch.empty_like(values)
    G[-1] = cont[-1, :, None] * values[-1]
    for t in range(T - 2, -1, -1):
        cut = cont[t, :, None] * values[t]
        nxt = reward[t + 1] + gamma * cont[t + 1, :, None] * G[t + 1]
        G[t] = torch.where(first[t + 1, :, None], cut, nxt)
    acted = torch.zeros_like(first)
    acted[:-1] = ~first[1:] & (cont[:-1] > 0)
    return G, acted


def self_imitation_losses(logp: torch.Tensor, values: torch.Tensor, returns: torch.Tensor, scale: float,
                          two_sided: bool = False):
    """Self-imitation (Oh et al. 2018) on replayed actions, per sample (``ppo.self_imitation``).

    Actor: -log π(a_t) * max(G_t - V_t, 0) / scale, the weight held fixed; critic: ½ max(G_t - V_t, 0)²
    (pulls V up toward returns it under-predicts, never down), or with ``two_sided`` (``ppo.critic_time``,
    whose real-step values nothing else trains) :func:`real_value_loss`. Returns ``(actor, critic)``."""
    gap = (returns - values).clamp_min(0.0)
    critic = real_value_loss(values, returns) if two_sided else 0.5 * gap ** 2
    return -logp * (gap.detach() / scale), critic


def real_value_loss(values: torch.Tensor, returns: torch.Tensor) -> torch.Tensor:
    """``ppo.real_value``: ½ (G_t - V_t)² per sample, both directions (the critic regressed on the
    observed real returns; cf. :func:`self_imitation_losses`, whose critic term only pulls up)."""
    return 0.5 * (returns - values) ** 2


class AttentionCritic(nn.Module):
    """V(ẑ^i, h^{a,i}, h^{g,i}) with one self-attention block across agents (as in MAMBA/MABL)."""

    def __init__(self, in_dim: int, hidden: int, layers: int, heads: int, time_steps: int = 0):
        super().__init__()
        self.embed = nn.Linear(in_dim, hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm = nn.LayerNorm(hidden)
        self.out = mlp(hidden, hidden, max(layers - 1, 1), 1)
        # ppo.critic_time: one learned row per "imagined steps left" index, added to the input layer's
        # pre-activation; zero at start, so the critic starts as the paper's
        self.time_embed = None
        if time_steps > 0:
            self.time_embed = nn.Embedding(time_steps, hidden)
            nn.init.zeros_(self.time_embed.weight)

    def _time(self, steps: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """The time rows for ``steps [...]`` (long), shaped ``[..., 1, hidden]`` to broadcast over agents."""
        if self.time_embed is None:
            if steps is not None:
                raise ValueError("this critic was built without ppo.critic_time; pass steps=None")
            return None
        if steps is None:
            raise ValueError("a time-aware critic (ppo.critic_time) needs the steps left of every state")
        w = self.time_embed.weight if dtype is None else self.time_embed.weight.to(dtype)
        return w[steps].unsqueeze(-2)

    def forward(self, x: torch.Tensor, steps: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., N, in_dim]`` -> values ``[..., N]``; ``steps [...]`` the imagined steps left of each
        joint state (``ppo.critic_time`` only)."""
        lead = x.shape[:-2]
        pre = self.embed(x)
        t = self._time(steps)
        if t is not None:
            pre = pre + t.to(pre.dtype)
        e = F.relu(pre).reshape(-1, *x.shape[-2:-1], self.embed.out_features)
        a, _ = self.attn(e, e, e, need_weights=False)
        h = self.norm(e + a)
        return self.out(h).squeeze(-1).reshape(*lead, x.shape[-2]).float()

    def forward_split(self, xs: list[torch.Tensor], dtype: torch.dtype, onehot: tuple[int, list[torch.Tensor]] | None = None,
                      steps: torch.Tensor | None = None) -> torch.Tensor:
        """``forward(torch.cat(xs, -1))`` without the concatenation (``Speed.fast_critic``).

        The embedding is one matmul per input part; the attention across agents is
        :func:`mabl.fast.agent_attention` (all heads in one batched matmul, a small-dim softmax);
        everything in ``dtype`` (fp32 statistics inside LayerNorm). Same math as :meth:`forward`.
        ``onehot = (S, idxs)``: every part starts with an S-wide one-hot latent whose ones are at
        ``idxs[j]``; its product with the weight is a gather (``Speed.gather_onehot``).
        """
        lead, n = xs[0].shape[:-2], xs[0].shape[-2]
        w, off, pre = self.embed.weight, 0, None
        for j, x in enumerate(xs):
            d = x.shape[-1]
            wj, bj = w[:, off:off + d].to(dtype), self.embed.bias.to(dtype) if off == 0 else None
            if onehot is None:
                y = F.linear(x.to(dtype), wj, bj)
            else:
                S, idxs = onehot
                y = split_linear(x.to(dtype), wj, bj, idxs[j], S)
            pre = y if pre is None else pre + y
            off += d
        t = self._time(steps, dtype)
        if t is not None:
            pre = pre + t
        e = F.relu(pre).reshape(-1, n, self.embed.out_features)
        E = e.shape[-1]
        wi, bi = self.attn.in_proj_weight.to(dtype), self.attn.in_proj_bias.to(dtype)
        q, k, v = (F.linear(e, wi[i * E:(i + 1) * E], bi[i * E:(i + 1) * E]) for i in range(3))
        a = agent_attention(q, k, v, self.attn.num_heads)
        a = F.linear(a, self.attn.out_proj.weight.to(dtype), self.attn.out_proj.bias.to(dtype))
        h = F.layer_norm(e + a, (E,), self.norm.weight.to(dtype), self.norm.bias.to(dtype), self.norm.eps)  # as under autocast
        return mlp_forward(self.out, h, dtype).squeeze(-1).reshape(*lead, n).float()


@dataclass
class Imagined:
    """An imagined trajectory of H steps from M start states (agents on the last axis)."""

    feat_a: torch.Tensor  # [H+1, M, N, Fa]
    feat_g: torch.Tensor | None  # [H+1, M, N, Fg]
    raw: torch.Tensor  # [H, M, N] action indices or [H, M, N, A] pre-squash actions
    logp: torch.Tensor  # [H, M, N]
    avail: torch.Tensor | None  # [H, M, N, A] bool (predicted availability used to mask)
    reward: torch.Tensor  # [H, M, N] predicted reward of transition t
    cont: torch.Tensor  # [H, M, N] predicted continuation of state t+1
    # Speed.gather_onehot: where the ones of the latents in feat_a / feat_g sit ([H+1, M, N, C],
    # mabl.fast.onehot_indices); None when imagination did not compute them
    idx_a: torch.Tensor | None = None
    idx_g: torch.Tensor | None = None
    # ppo.imagine_explore: [H, M, N] bool, where the action is an exploration draw, not the actor's
    explored: torch.Tensor | None = None


@dataclass
class RealSteps:
    """Replayed steps for ``ppo.self_imitation``: K (sequence, step) pairs where an action was taken,
    all agents of each (the critic attends across them)."""

    feat_a: torch.Tensor  # [K, N, Fa] posterior agent features (z^a_t, h^a_t)
    feat_g: torch.Tensor | None  # [K, N, Fg]
    raw: torch.Tensor  # [K, N] action indices or [K, N, A] pre-squash actions
    avail: torch.Tensor | None  # [K, N, A] the env's action masks at t
    returns: torch.Tensor  # [K, N] observed return G_t (real_returns)


@torch.no_grad()
def imagine(model: BiLevelWorldModel, actor: Actor, start: LatentState, horizon: int, explore: float = 0.0,
            actions: torch.Tensor | None = None) -> Imagined:
    """Roll the priors ``horizon`` steps with the actor (§3.3): mask actions with the predicted
    availability, predict reward and termination after every step. No gradients flow.
    ``explore > 0`` (``ppo.imagine_explore``, not in the paper): :meth:`Actor.explore_from_params`
    on every step's actions. ``actions [horizon, M, N, A]`` (model actions: one-hot or squashed):
    the agents play these instead (no availability or actor evaluated; ``raw`` holds them and
    ``logp`` is 0), e.g. the one-step branches of :func:`counterfactual_baseline`."""
    if getattr(model, "speed", PLAIN).fused_heads:
        return _imagine_fused(model, actor, start, horizon, explore, actions)
    st = start
    feats_a, feats_g, raws, logps, avails, rews, conts = [], [], [], [], [], [], []
    explored = []
    for t in range(horizon):
        fa, fg = model.features(st)
        if actions is not None:
            raws.append(actions[t]), logps.append(torch.zeros(actions.shape[1:-1], device=fa.device))
            st = model.imagine_step(st, actions[t].to(fa.dtype))
            heads = model.heads(st)
            feats_a.append(fa), feats_g.append(fg)
            rews.append(heads["reward"].float()), conts.append(torch.sigmoid(heads["cont"].float()))
            continue
        avail = None
        if model.avail_head is not None:
            both = fa if fg is None else torch.cat([fa, fg], -1)
            p = torch.sigmoid(model.avail_head(both).float())
            avail = torch.bernoulli(p).bool()
            avails.append(avail)
        params = actor.params(fa, avail)
        raw, _, logp = actor.sample_from_params(*params)
        if explore > 0:
            raw, logp, ex = actor.explore_from_params(params[0], raw, explore)
            explored.append(ex)
        st = model.imagine_step(st, actor.env_to_model_action(raw).to(fa.dtype))
        heads = model.heads(st)
        feats_a.append(fa), feats_g.append(fg), raws.append(raw), logps.append(logp)
        rews.append(heads["reward"].float()), conts.append(torch.sigmoid(heads["cont"].float()))
    fa, fg = model.features(st)
    feats_a.append(fa), feats_g.append(fg)
    return Imagined(
        feat_a=torch.stack(feats_a), feat_g=None if fg is None else torch.stack(feats_g),
        raw=torch.stack(raws), logp=torch.stack(logps), avail=torch.stack(avails) if avails else None,
        reward=torch.stack(rews), cont=torch.stack(conts), explored=torch.stack(explored) if explored else None,
    )


@torch.no_grad()
def _imagine_fused(model: BiLevelWorldModel, actor: Actor, start: LatentState, horizon: int, explore: float = 0.0,
                   actions: torch.Tensor | None = None) -> Imagined:
    """:func:`imagine` with every matmul of a state tensor done once for all its consumers.

    The features ``fa = [z^a, h^a]`` and ``fg = [z^g, h^g]`` of each imagined state are written
    once into the trajectory buffers and feed the first layers of the reward/termination/
    availability heads and of the actor in one matmul each; inside the transition ``h^a``,
    ``h^g``, ``z^g`` and ``z^a`` are each multiplied once for the priors and the next step's GRU
    parts and inputs. The availability head is evaluated once per state (the plain path
    evaluates it twice). Features are stored in the compute dtype (what the bf16 actor/critic
    consume anyway). Same distributions and sampling order as :func:`imagine`.
    """
    sp = model.speed
    dt = sp.dtype
    cfg = model.cfg
    D, S, H = cfg.deter, model.stoch, cfg.hidden
    M, N = start.h_a.shape[:2]
    bil = model.bilevel
    with no_autocast(start.h_a.device.type):
        c = Caster(dt)
        ain, ag, ap = model.agent_in, model.agent_gru.lin, model.agent_prior[0]
        fl = FusedLinears(dt)
        # heads and actor: first layers on fa (+ fg)
        fl.add("reward", *model.reward_first_layer())
        both = [("cont", model.cont_head)] + ([("avail", model.avail_head)] if model.avail_head is not None else [])
        for name, net in both:
            w = net[0].weight
            fl.add(name, net[0].bias, {"fa": w[:, :S + D], "fg": w[:, S + D:]} if bil else {"fa": w})
        fl.add("actor", actor.net[0].bias, {"fa": actor.net[0].weight})
        # the transition: next inputs, GRU recurrent parts, priors
        fl.add("in_a", ain.parts[0].bias, {"z_a": ain.parts[0].weight})
        prior_a = {"h_a": ap.parts[0].weight}
        if bil:
            prior_a["z_g"] = ap.parts[1].weight
        if model.prior_h_g:  # WorldModelConfig.agent_prior_input="zhat_g+h_g"
            prior_a["h_g"] = ap.parts[2].weight
        fl.add("prior_a", ap.parts[0].bias, prior_a)
        fl.add("gru_a", None, {"h_a": ag.weight[:, H:]})
        if bil:
            gin, gg, gp = model.global_in, model.global_gru.lin, model.global_prior
            fl.add("in_g", gin.parts[0].bias, {"z_g": gin.parts[0].weight})
            fl.add("prior_g", gp[0].bias, {"h_g": gp[0].weight})
            fl.add("gru_g", None, {"h_g": gg.weight[:, H:]})
            Wx_g, b_g, W_ja = c(gg.weight[:, :H]), c(gg.bias), c(gin.parts[1].weight)
        fl.build()
        Wx_a, b_a, W_aa = c(ag.weight[:, :H]), c(ag.bias), c(ain.parts[1].weight)

        h_a, z_a = start.h_a.float(), start.z_a.to(dt)
        dev = h_a.device
        K = cfg.n_classes
        # Speed.gather_onehot: one-hot latents enter matmuls as gathers of their ones' columns
        ids = (lambda z: onehot_indices(z, K)) if sp.gather else (lambda z: None)  # noqa: E731
        proj = lambda src, x, idx: fl.project_onehot(src, x, idx, S)  # noqa: E731
        ia, ig = ids(z_a), None
        fa_buf = torch.empty(horizon + 1, M, N, S + D, dtype=dt, device=dev)
        fg_buf = torch.empty(horizon + 1, M, N, S + D, dtype=dt, device=dev) if bil else None
        if bil:
            h_g, z_g = start.h_g.float(), start.z_g.to(dt)
            ig = ids(z_g)
            p_zg, p_hg = proj("z_g", z_g, ig), fl.project("h_g", h_g.to(dt))
        else:
            p_zg = p_hg = None
        p_za, p_ha = proj("z_a", z_a, ia), fl.project("h_a", h_a.to(dt))
        raws, logps, avails, rews, conts, ias, igs = [], [], [], [], [], [], []
        explored = []
        for t in range(horizon + 1):
            fa_buf[t, ..., :S] = z_a
            fa_buf[t, ..., S:] = h_a
            if bil:
                fg_buf[t, ..., :S] = model._expand_g(z_g)
                fg_buf[t, ..., S:] = model._expand_g(h_g)
            ig_n = None if ig is None else model._expand_g(ig)
            if t > 0 or actions is None:  # the heads' and actor's first layers (forced actions: no actor at t=0)
                p_fa = proj("fa", fa_buf[t], ia)
                p_fg = proj("fg", fg_buf[t], ig_n) if bil else None
            if ia is not None:  # kept for the PPO epochs
                ias.append(ia), igs.append(ig_n)
            if t > 0:  # reward and termination of the transition into state t
                rews.append(mlp_tail(model.reward_head, fl.out("reward", p_fa, p_fg), c).squeeze(-1).float())
                cont = mlp_tail(model.cont_head, fl.out("cont", p_fa, p_fg), c).squeeze(-1).float()
                conts.append(torch.sigmoid(cont))
            if t == horizon:
                break
            if actions is not None:  # forced actions: no availability, no actor
                raws.append(actions[t]), logps.append(torch.zeros(actions.shape[1:-1], device=dev))
                act = actions[t].to(dt)
            else:
                avail = None
                if model.avail_head is not None:
                    a_logits = mlp_tail(model.avail_head, fl.out("avail", p_fa, p_fg), c)
                    avail = torch.bernoulli(torch.sigmoid(a_logits.float())).bool()
                    avails.append(avail)
                out = mlp_tail(actor.net, fl.out("actor", p_fa), c)
                params = actor.params_from_out(out, avail)
                raw, _, logp = actor.sample_from_params(*params)
                if explore > 0:
                    raw, logp, ex = actor.explore_from_params(params[0], raw, explore)
                    explored.append(ex)
                raws.append(raw), logps.append(logp)
                act = actor.env_to_model_action(raw).to(dt)
            # transition (prior step), as BiLevelWorldModel.imagine_step
            x = F.relu(fl.out("in_a", p_za) + F.linear(act, W_aa))
            h_a = gru_update(F.linear(x, Wx_a, b_a) + fl.out("gru_a", p_ha), h_a, D)
            p_ha = fl.project("h_a", h_a.to(dt))
            if bil:
                jact = F.linear(act.flatten(-2), W_ja).unsqueeze(-2)  # [M,1,H]: the joint action, for every global latent
                xg = F.relu(fl.out("in_g", p_zg) + jact)
                h_g = gru_update(F.linear(xg, Wx_g, b_g) + fl.out("gru_g", p_hg), h_g, D)
                p_hg = fl.project("h_g", h_g.to(dt))
                z_g = model.imagine_draw(model._mix(mlp_tail(model.global_prior, fl.out("prior_g", p_hg), c)), dt)
                ig = ids(z_g)
                p_zg = proj("z_g", z_g, ig)
            z_a = model.imagine_draw(model._mix(mlp_tail(model.agent_prior, fl.out("prior_a", p_ha, p_zg, p_hg), c)), dt)
            ia = ids(z_a)
            if t < horizon - 1:
                p_za = proj("z_a", z_a, ia)
    return Imagined(
        feat_a=fa_buf, feat_g=fg_buf, raw=torch.stack(raws), logp=torch.stack(logps),
        avail=torch.stack(avails) if avails else None, reward=torch.stack(rews), cont=torch.stack(conts),
        idx_a=torch.stack(ias) if ias else None, idx_g=torch.stack(igs) if ias and bil else None,
        explored=torch.stack(explored) if explored else None,
    )


# ------------------------------------------------------------------------------------------
# the pluggable algorithm

class Algorithm(Protocol):
    """A MARL algorithm trained on the frozen world model's imagination."""

    actor: Actor

    def train(self, model: BiLevelWorldModel, starts: LatentState, autocast) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class MAPPO(nn.Module):
    """Shared actor + centralized attention critic, PPO-clip on imagined trajectories."""

    def __init__(self, spec: EnvSpec, model: BiLevelWorldModel, cfg: PPOConfig):
        super().__init__()
        self.spec, self.cfg = spec, cfg
        if cfg.imagine_explore > 0 and not spec.discrete:
            raise ConfigError(f"config key ppo.imagine_explore needs discrete actions; {spec.name} has continuous ones (use 0)")
        self.actor = Actor(model.feat_a, spec.action_dim, cfg.hidden, cfg.layers, spec.discrete, spec.action_dim_mask())
        self.critic_input = cfg.critic_input if model.bilevel else "agent"
        self.last_disagreement: float | None = None  # ppo.disagreement: the last round's mean ensemble variance
        cin = {"global+agent": model.feat_a + model.feat_g, "global": model.feat_g, "agent": model.feat_a}[self.critic_input]
        # ppo.critic_time (config.validate refuses it with bootstrap=true): indices 0..H are imagined steps left, H+1 a real step (return not cut)
        self.critic = AttentionCritic(cin, cfg.hidden, cfg.layers, cfg.attention_heads, cfg.horizon + 2 if cfg.critic_time else 0)
        fused = getattr(model, "speed", PLAIN).fused_adam
        self._foreach_clip = fused
        self.actor_opt = fused_adam(self.actor.parameters(), cfg.actor_lr, fused)
        self.critic_opt = fused_adam(self.critic.parameters(), cfg.critic_lr, fused)
        self.entropy_coef = cfg.entropy
        self.adv_scale = 1.0  # what the last round's advantages were divided by (_advantages)
        self.return_range: float | None = None  # EMA of the imagined returns' P95 - P5 (advantage_norm="return_range")
        self._stoch = model.stoch  # width of a one-hot latent (the first columns of fa and fg)
        self.timings: dict[str, float] = {}
        self._compiled = None

    def time_index(self, lead: tuple[int, ...], t: int | None = None, device=None) -> torch.Tensor | None:
        """``ppo.critic_time``: the critic's time index for joint states of leading shape ``lead`` that
        all sit at imagined step ``t`` (index H - t, the steps left), or are replayed real steps
        (``t=None``: index H+1, a return not cut at any horizon). None when the option is off."""
        if not self.cfg.critic_time:
            return None
        H = self.cfg.horizon
        return torch.full(lead, H + 1 if t is None else max(H - t, 0), dtype=torch.long, device=device)

    def trajectory_time_index(self, lead: tuple[int, ...], device=None) -> torch.Tensor | None:
        """``ppo.critic_time``: the time index of an imagined trajectory's states ``[H+1, M, ...]`` (states
        t = 0..H along the first axis of ``lead``: index H - t). None when the option is off."""
        if not self.cfg.critic_time:
            return None
        H = self.cfg.horizon
        left = (H - torch.arange(lead[0], device=device)).clamp_min(0)
        return left.view(-1, *([1] * (len(lead) - 1))).expand(lead).contiguous()

    def critic_features(self, fa: torch.Tensor, fg: torch.Tensor | None) -> torch.Tensor:
        if self.critic_input == "agent":
            return fa
        if self.critic_input == "global":
            return fg
        return torch.cat([fa, fg], -1)

    def state_dict(self, *args, **kwargs):  # networks + optimizers + schedule
        state = {"nets": super().state_dict(), "actor_opt": self.actor_opt.state_dict(),
                 "critic_opt": self.critic_opt.state_dict(), "entropy_coef": torch.tensor(self.entropy_coef)}
        if self.return_range is not None:  # absent until the first return-range batch
            state["return_range"] = torch.tensor(self.return_range)
        return state

    def load_state_dict(self, state, strict: bool = True):
        super().load_state_dict(state["nets"], strict=strict)
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.entropy_coef = float(state["entropy_coef"])
        rr = state.get("return_range")  # absent before the first return-range batch and in older checkpoints
        self.return_range = None if rr is None else float(rr)

    def train_round(self, model: BiLevelWorldModel, starts: LatentState, autocast, guard=None,
                    real: tuple[LatentState, dict] | None = None) -> dict[str, float]:
        """One imagination round + ``epochs`` PPO epochs (Table 3: one of the 4 'updates').

        ``real = (post, batch)``: the posterior states ``[T, B, ...]`` and the replayed sequences the
        starts come from, for ``ppo.self_imitation`` (ignored when that is 0).
        ``self.timings['imagine_s']`` holds the time spent imagining (the rest is policy learning).
        """
        if getattr(model, "speed", PLAIN).fast_critic:
            return self._train_round_fast(model, starts, autocast, guard, real)
        cfg = self.cfg
        t0 = time.perf_counter()
        with autocast():
            traj = self._pessimism(model, imagine(model, self.actor, starts, cfg.horizon, cfg.imagine_explore))
        sync(traj.feat_a.device)
        self.timings = {"imagine_s": time.perf_counter() - t0}
        with autocast():
            with torch.no_grad():
                cin = self.critic_features(traj.feat_a, traj.feat_g)
                steps = self.trajectory_time_index(cin.shape[:-2], cin.device)
                values = self.critic(cin, steps)
        baseline = self._counterfactual(model, traj, autocast, lambda fa, fg, t: self.critic(
            self.critic_features(fa, fg), self.time_index(fa.shape[:-2], t, fa.device)))
        adv, ret, weight = self._advantages(traj, values, baseline)
        sil = self._real_steps(model, real, autocast)
        H, M = traj.raw.shape[:2]
        K = H * M
        flat = lambda x: None if x is None else x.reshape(K, *x.shape[2:])  # noqa: E731
        fa, c_in, raw, logp_old, avail = flat(traj.feat_a[:-1]), flat(cin[:-1]), flat(traj.raw), flat(traj.logp), flat(traj.avail)
        steps = None if steps is None else flat(steps[:-1])
        adv, ret, weight = flat(adv), flat(ret), flat(weight)
        stats = {"actor_loss": 0.0, "critic_loss": 0.0, "entropy": 0.0, "n": 0}
        for _ in range(cfg.epochs):
            perm = torch.randperm(K, device=fa.device)
            for i in range(0, K, cfg.minibatch):
                idx = perm[i:i + cfg.minibatch]
                w = weight[idx]
                with autocast():
                    logp, ent = self.actor.log_prob_entropy(fa[idx], raw[idx], None if avail is None else avail[idx])
                    pg = ppo_clip_loss(logp, logp_old[idx], adv[idx], cfg.clip)
                    actor_loss = (w * (pg - self.entropy_coef * ent)).mean()
                self._step(self.actor_opt, self.actor, actor_loss, guard, "actor_loss")
                self._next_entropy_coef(ent, w)
                with autocast():
                    v = self.critic(c_in[idx], None if steps is None else steps[idx])
                    critic_loss = (w * 0.5 * (v - ret[idx]) ** 2).mean()
                self._step(self.critic_opt, self.critic, critic_loss, guard, "critic_loss")
                stats["actor_loss"] += float(actor_loss.detach())
                stats["critic_loss"] += float(critic_loss.detach())
                stats["entropy"] += float(ent.detach().mean())
                stats["n"] += 1
            if sil is not None:
                self._self_imitation_step(sil, autocast, guard, stats)
        return self._round_stats(stats, traj, values, ret, baseline)

    def _pessimism(self, model: BiLevelWorldModel, traj: Imagined) -> Imagined:
        """``ppo.disagreement`` (extension): each imagined reward r_t of agent i lowered by
        ``disagreement`` times the variance u_t of the model's ensemble (``model.ensemble``) predicting
        z^a_{t+1} from the imagined state t and the action taken there (:meth:`BiLevelWorldModel.disagreement`).
        Unchanged when it is 0. (The one-step branches of ``ppo.counterfactual_samples`` are not penalized.)"""
        self.last_disagreement = None
        if self.cfg.disagreement <= 0:
            return traj
        fg = None if traj.feat_g is None else traj.feat_g[:-1]
        u = model.disagreement(traj.feat_a[:-1], fg, self.actor.env_to_model_action(traj.raw))  # [H, M, N]
        self.last_disagreement = float(u.mean())
        return replace(traj, reward=traj.reward - self.cfg.disagreement * u)

    def _round_stats(self, stats: dict, traj: Imagined, values: torch.Tensor, ret: torch.Tensor,
                     baseline: torch.Tensor | None) -> dict[str, float]:
        """A round's metrics: the minibatch means in ``stats`` (summed, with their count ``n``) and the
        imagined batch's reward, continuation, value, return and schedules."""
        n = max(stats.pop("n"), 1)
        n_sil = max(stats.pop("sil_steps", 0), 1)
        real_step = ("sil_", "real_value_")  # summed once per real-step update, not per PPO minibatch
        out = {k: v / (n_sil if k.startswith(real_step) else n) for k, v in stats.items()}
        out.update(imag_reward=float(traj.reward.mean()), imag_cont=float(traj.cont.mean()),
                   value=float(values.mean()), return_=float(ret.mean()), entropy_coef=self.entropy_coef)
        if self.return_range is not None:
            out["return_range"] = self.return_range
        if self.last_disagreement is not None:  # ppo.disagreement: the round's mean ensemble variance
            out["disagreement"] = self.last_disagreement
        if baseline is not None:  # how far the counterfactual baselines sit from the state values
            out["cf_gap"] = float((baseline - values[:-1]).abs().mean())
        return out

    def _advantages(self, traj: Imagined, values: torch.Tensor, baseline: torch.Tensor | None = None):
        """GAE advantages (normalized if configured), returns and reach weights of a trajectory.

        ``baseline [H, M, N]`` (:func:`counterfactual_baseline`) replaces V_j(s_t) in the first TD
        error of each agent's advantage; the critic's targets (returns) do not change."""
        cfg = self.cfg
        reward = traj.reward.mean(-1, keepdim=True).expand_as(traj.reward) if cfg.team_reward else traj.reward
        if not cfg.bootstrap:  # the return ends at the horizon: V(s_H) = 0
            values = torch.cat([values[:-1], torch.zeros_like(values[-1:])], 0)
        adv, ret = gae(reward, values, traj.cont, cfg.gamma, cfg.gae_lambda)
        if baseline is not None:
            adv = adv + values[:-1] - baseline
        self.adv_scale = 1.0  # what the advantages are divided by (ppo.self_imitation's weights use it too)
        if cfg.normalize_advantage and cfg.advantage_norm == "return_range":
            self.return_range = return_range_ema(ret, self.return_range, cfg.return_range_decay)
            self.adv_scale = max(cfg.return_range_floor, self.return_range)
            adv = adv / self.adv_scale
        elif cfg.normalize_advantage:
            self.adv_scale = float(adv.std()) + 1e-6
            adv = (adv - adv.mean()) / self.adv_scale
        if traj.explored is not None:  # ppo.imagine_explore: a drawn action can be raised, never lowered
            adv = torch.where(traj.explored, adv.clamp_min(0.0), adv)
        return adv, ret, reach_weights(traj.cont)

    def _counterfactual(self, model: BiLevelWorldModel, traj: Imagined, autocast, value_fn, samples: int | None = None) -> torch.Tensor | None:
        """:func:`counterfactual_baseline` with one-step branches of the frozen model, ``samples``
        (default ``ppo.counterfactual_samples``) draws per agent; None for 0. ``value_fn(fa, fg, t)`` is
        the critic on features of states at imagined step t. The time counts as imagination."""
        cfg = self.cfg
        samples = cfg.counterfactual_samples if samples is None else samples
        if samples <= 0:
            return None
        t0 = time.perf_counter()

        def branch(t, act):  # act [K, N, M, N, A]: K*N*M joint states stepped once, as one imagination batch
            lead = act.shape[:3]
            st = imagined_state(model, traj, t).map(lambda x: x.expand(*lead[:2], *x.shape).reshape(-1, *x.shape[1:]))
            with autocast():
                one = imagine(model, self.actor, st, 1, actions=act.reshape(1, -1, *act.shape[3:]))
                value = value_fn(one.feat_a[1], None if one.feat_g is None else one.feat_g[1], t + 1)
            return tuple(x.float().reshape(*lead, x.shape[-1]) for x in (one.reward[0], one.cont[0], value))

        with torch.no_grad():
            b = counterfactual_baseline(branch, self.actor, traj, samples, cfg.gamma, cfg.bootstrap, cfg.team_reward)
        sync(traj.feat_a.device)
        self.timings["imagine_s"] = self.timings.get("imagine_s", 0.0) + time.perf_counter() - t0
        return b

    def _train_round_fast(self, model: BiLevelWorldModel, starts: LatentState, autocast, guard=None,
                          real: tuple[LatentState, dict] | None = None) -> dict[str, float]:
        """:meth:`train_round` with ``Speed.fast_critic``: features kept in the compute dtype (no
        2560-wide critic input is ever built), critic values of all imagined states in chunked
        no-grad passes, the critic via :meth:`AttentionCritic.forward_split`. Same losses, same
        minibatch order, same optimizer steps."""
        cfg, sp = self.cfg, model.speed
        dt = sp.dtype
        t0 = time.perf_counter()
        with autocast():
            traj = self._pessimism(model, imagine(model, self.actor, starts, cfg.horizon, cfg.imagine_explore))
        sync(traj.feat_a.device)
        self.timings = {"imagine_s": time.perf_counter() - t0}
        fa = traj.feat_a.to(dt)
        fg = None if traj.feat_g is None else traj.feat_g.to(dt)
        parts = {"global+agent": lambda a, g: [a, g], "global": lambda a, g: [g], "agent": lambda a, g: [a]}[self.critic_input]
        dev = fa.device.type
        S = model.stoch
        # Speed.gather_onehot: the one-hot latents' columns (from imagination, else found once per round)
        ia, ig = traj.idx_a, traj.idx_g
        if sp.gather and ia is None:
            ia = onehot_indices(fa[..., :S], model.cfg.n_classes)
            ig = None if fg is None else onehot_indices(fg[..., :S], model.cfg.n_classes)
        onehot = (lambda a, g: None) if ia is None else (lambda a, g: (S, parts(a, g)))
        with torch.no_grad(), no_autocast(dev):
            Hp1, M = fa.shape[:2]
            flat_a, flat_g = fa.flatten(0, 1), None if fg is None else fg.flatten(0, 1)
            fia, fig = (None, None) if ia is None else (ia.flatten(0, 1), None if ig is None else ig.flatten(0, 1))
            chunk = max(1, 8192 // max(1, fa.shape[2]) * 4)
            sl = lambda x, i: None if x is None else x[i:i + chunk]  # noqa: E731
            steps = self.trajectory_time_index((Hp1, M), fa.device)  # ppo.critic_time, else None
            flat_t = None if steps is None else steps.flatten(0, 1)
            values = torch.cat([self.critic.forward_split(parts(sl(flat_a, i), sl(flat_g, i)), dt, onehot(sl(fia, i), sl(fig, i)), sl(flat_t, i))
                                for i in range(0, flat_a.shape[0], chunk)]).view(Hp1, M, -1)
        baseline = self._counterfactual(model, traj, autocast, lambda a, g, t: self.critic.forward_split(
            parts(a.to(dt), None if g is None else g.to(dt)), dt, None, self.time_index(a.shape[:-2], t, a.device)))
        adv, ret, weight = self._advantages(traj, values, baseline)
        sil = self._real_steps(model, real, autocast)
        H, M = traj.raw.shape[:2]
        K = H * M
        flat = lambda x: None if x is None else x.reshape(K, *x.shape[2:])  # noqa: E731
        fa_k, fg_k = flat(fa[:-1]), flat(None if fg is None else fg[:-1])
        ia_k, ig_k = (None, None) if ia is None else (flat(ia[:-1]), flat(None if ig is None else ig[:-1]))
        sel = lambda x, i: None if x is None else x.index_select(0, i)  # noqa: E731
        raw, logp_old, avail = flat(traj.raw), flat(traj.logp), flat(traj.avail)
        adv, ret, weight = flat(adv), flat(ret), flat(weight)
        steps_k = None if steps is None else flat(steps[:-1])
        actor_fn, critic_fn = self._loss_fns(sp)
        stats = {"actor_loss": 0.0, "critic_loss": 0.0, "entropy": 0.0, "n": 0}
        for _ in range(cfg.epochs):
            perm = torch.randperm(K, device=fa.device)
            for i in range(0, K, cfg.minibatch):
                idx = perm[i:i + cfg.minibatch]
                w = weight[idx]
                a_mb = fa_k.index_select(0, idx)
                g_mb = None if fg_k is None else fg_k.index_select(0, idx)
                ia_mb, ig_mb = sel(ia_k, idx), sel(ig_k, idx)
                with no_autocast(dev):
                    actor_loss, ent = actor_fn(a_mb, raw[idx], None if avail is None else avail[idx], logp_old[idx], adv[idx], w,
                                               self.entropy_coef, ia_mb)
                self._step(self.actor_opt, self.actor, actor_loss, guard, "actor_loss")
                self._next_entropy_coef(ent, w)
                with no_autocast(dev):
                    critic_loss = critic_fn(parts(a_mb, g_mb), ret[idx], w, None if ia_mb is None else onehot(ia_mb, ig_mb),
                                            sel(steps_k, idx))
                self._step(self.critic_opt, self.critic, critic_loss, guard, "critic_loss")
                stats["actor_loss"] += float(actor_loss.detach())
                stats["critic_loss"] += float(critic_loss.detach())
                stats["entropy"] += float(ent.mean())
                stats["n"] += 1
            if sil is not None:
                self._self_imitation_step(sil, autocast, guard, stats)
        return self._round_stats(stats, traj, values, ret, baseline)

    @torch.no_grad()
    def _real_steps(self, model: BiLevelWorldModel, real: tuple[LatentState, dict] | None, autocast) -> RealSteps | None:
        """The replayed steps and observed returns of a round for ``ppo.self_imitation`` and
        ``ppo.real_value`` (None when both are off)."""
        cfg = self.cfg
        if real is None or (cfg.self_imitation <= 0 and cfg.real_value <= 0):
            return None
        post, batch = real
        fa, fg = model.features(post)
        fa, fg = fa.float(), None if fg is None else fg.float()
        with autocast():
            values = self.critic(self.critic_features(fa, fg), self.time_index(fa.shape[:-2], None, fa.device)).float()
        reward = batch["reward"].float()
        if cfg.team_reward:
            reward = reward.mean(-1, keepdim=True).expand_as(reward)
        G, acted = real_returns(reward, batch["cont"], batch["is_first"], values, cfg.gamma)
        action = batch["prev_action"][1:]  # the action taken at t is stored at t+1
        if self.spec.discrete:
            raw = action.argmax(-1)
        else:
            raw = torch.atanh(action.float().clamp(-1 + 1e-6, 1 - 1e-6))
        sel = acted[:-1]
        avail = batch.get("avail")
        return RealSteps(feat_a=fa[:-1][sel], feat_g=None if fg is None else fg[:-1][sel], raw=raw[sel],
                         avail=None if avail is None or not self.spec.discrete else avail[:-1][sel],
                         returns=G[:-1][sel])

    def _self_imitation_step(self, sil: RealSteps, autocast, guard, stats: dict) -> None:
        """One actor and one critic step of self-imitation (``ppo.self_imitation``) and of the real-return
        regression (``ppo.real_value``) on the round's replayed steps."""
        cfg = self.cfg
        if sil.returns.shape[0] == 0:
            return
        with autocast():
            v = self.critic(self.critic_features(sil.feat_a, sil.feat_g), self.time_index(sil.feat_a.shape[:-2], None, sil.feat_a.device))
            logp = self.actor.log_prob_entropy(sil.feat_a, sil.raw, sil.avail)[0] if cfg.self_imitation > 0 else None
        v, critic_loss = v.float(), None
        if logp is not None:
            actor, critic = self_imitation_losses(logp.float(), v, sil.returns, self.adv_scale, cfg.critic_time)
            self._step(self.actor_opt, self.actor, cfg.self_imitation * actor.mean(), guard, "self_imitation_actor_loss")
            if cfg.self_imitation_value > 0:
                critic_loss = cfg.self_imitation_value * critic.mean()
        if cfg.real_value > 0:
            reg = cfg.real_value * real_value_loss(v, sil.returns).mean()
            critic_loss = reg if critic_loss is None else critic_loss + reg
            stats["real_value_err"] = stats.get("real_value_err", 0.0) + float((sil.returns - v.detach()).mean())
        if critic_loss is not None:
            self._step(self.critic_opt, self.critic, critic_loss, guard, "self_imitation_critic_loss")
        gap = (sil.returns - v.detach()).clamp_min(0.0)
        stats["sil_gap"] = stats.get("sil_gap", 0.0) + float(gap.mean())
        stats["sil_active"] = stats.get("sil_active", 0.0) + float((gap > 0).float().mean())
        stats["sil_steps"] = stats.get("sil_steps", 0) + 1

    def _loss_fns(self, sp):
        """The minibatch losses of the fast path (optionally ``torch.compile``d)."""
        dt, cfg = sp.dtype, self.cfg

        def actor_loss(fa, raw, avail, logp_old, adv, w, ent_coef, idx=None):
            if idx is None:
                out = mlp_forward(self.actor.net, fa, dt)
            else:  # Speed.gather_onehot: the latent's columns of the first layer as a gather
                first = self.actor.net[0]
                out = mlp_tail(self.actor.net, split_linear(fa, first.weight.to(dt), first.bias.to(dt), idx, self._stoch), dt)
            logp, ent = self.actor.log_prob_entropy_from_params(*self.actor.params_from_out(out, avail), raw)
            pg = ppo_clip_loss(logp, logp_old, adv, cfg.clip)
            return (w * (pg - ent_coef * ent)).mean(), ent.detach()

        def critic_loss(xs, ret, w, onehot=None, steps=None):
            v = self.critic.forward_split(xs, dt, onehot, steps)
            return (w * 0.5 * (v - ret) ** 2).mean()

        if not sp.compile:
            return actor_loss, critic_loss
        if self._compiled is None:
            self._compiled = (torch.compile(actor_loss, dynamic=False), torch.compile(critic_loss, dynamic=False))
        return self._compiled

    def _next_entropy_coef(self, ent: torch.Tensor, w: torch.Tensor) -> None:
        """After an actor step: anneal the coefficient, or (``ppo.entropy_target``) steer it by the
        minibatch's entropy, weighted like the loss (states reached before imagined termination)."""
        cfg = self.cfg
        mean_ent = 0.0
        if cfg.entropy_target > 0:
            ent, w = ent.detach().float(), w.float()
            mean_ent = float((w * ent).sum() / w.sum().clamp_min(1e-8))
        self.entropy_coef = adapt_entropy_coef(self.entropy_coef, mean_ent, cfg.entropy_target, cfg.entropy_target_lr,
                                               cfg.entropy_annealing, cfg.entropy)

    def _step(self, opt, net, loss, guard, name):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self._foreach_clip:
            norm = clip_grad_norm(net.parameters(), self.cfg.grad_clip, foreach=True)
        else:
            norm = torch.nn.utils.clip_grad_norm_(net.parameters(), self.cfg.grad_clip)
        if guard is not None and not guard(name, loss, norm):
            opt.zero_grad(set_to_none=True)
            return
        opt.step()
