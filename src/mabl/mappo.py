"""MAPPO trained purely in imagination (paper §3.3, Algorithm 1 lines 9-14, Table 3).

The actor sees only the agent features (z^a, h^a); the centralized critic sees the global
and agent features of every agent and mixes them with self-attention across agents.
The algorithm sits behind :class:`Algorithm` so another MARL method can be plugged in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mabl.config import PPOConfig
from mabl.envs.base import EnvSpec
from mabl.nets import mlp
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


def ppo_clip_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, clip: float) -> torch.Tensor:
    """Per-sample clipped surrogate -min(ρA, clip(ρ)A)."""
    ratio = (logp - logp_old).exp()
    return -torch.min(ratio * adv, ratio.clamp(1.0 - clip, 1.0 + clip) * adv)


def reach_weights(cont: torch.Tensor) -> torch.Tensor:
    """w_t = Π_{k<t} c_k: probability that imagined state t is reached before termination."""
    ones = torch.ones_like(cont[:1])
    return torch.cat([ones, cont[:-1]], 0).cumprod(0)


# ------------------------------------------------------------------------------------------
# networks

class AttentionCritic(nn.Module):
    """V(ẑ^i, h^{a,i}, h^{g,i}) with one self-attention block across agents (as in MAMBA/MABL)."""

    def __init__(self, in_dim: int, hidden: int, layers: int, heads: int):
        super().__init__()
        self.embed = nn.Linear(in_dim, hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm = nn.LayerNorm(hidden)
        self.out = mlp(hidden, hidden, max(layers - 1, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., N, in_dim]`` -> values ``[..., N]``."""
        lead = x.shape[:-2]
        e = F.relu(self.embed(x)).reshape(-1, *x.shape[-2:-1], self.embed.out_features)
        a, _ = self.attn(e, e, e, need_weights=False)
        h = self.norm(e + a)
        return self.out(h).squeeze(-1).reshape(*lead, x.shape[-2]).float()


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


@torch.no_grad()
def imagine(model: BiLevelWorldModel, actor: Actor, start: LatentState, horizon: int) -> Imagined:
    """Roll the priors ``horizon`` steps with the actor (§3.3): mask actions with the predicted
    availability, predict reward and termination after every step. No gradients flow."""
    st = start
    feats_a, feats_g, raws, logps, avails, rews, conts = [], [], [], [], [], [], []
    for _ in range(horizon):
        fa, fg = model.features(st)
        avail = None
        if model.avail_head is not None:
            both = fa if fg is None else torch.cat([fa, fg], -1)
            p = torch.sigmoid(model.avail_head(both).float())
            avail = torch.bernoulli(p).bool()
            avails.append(avail)
        raw, _, logp = actor.sample(fa, avail)
        st = model.imagine_step(st, actor.env_to_model_action(raw).to(fa.dtype))
        heads = model.heads(st)
        feats_a.append(fa), feats_g.append(fg), raws.append(raw), logps.append(logp)
        rews.append(heads["reward"].float()), conts.append(torch.sigmoid(heads["cont"].float()))
    fa, fg = model.features(st)
    feats_a.append(fa), feats_g.append(fg)
    return Imagined(
        feat_a=torch.stack(feats_a), feat_g=None if fg is None else torch.stack(feats_g),
        raw=torch.stack(raws), logp=torch.stack(logps), avail=torch.stack(avails) if avails else None,
        reward=torch.stack(rews), cont=torch.stack(conts),
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
        self.actor = Actor(model.feat_a, spec.action_dim, cfg.hidden, cfg.layers, spec.discrete)
        self.critic_input = cfg.critic_input if model.bilevel else "agent"
        cin = {"global+agent": model.feat_a + model.feat_g, "global": model.feat_g, "agent": model.feat_a}[self.critic_input]
        self.critic = AttentionCritic(cin, cfg.hidden, cfg.layers, cfg.attention_heads)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=cfg.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr)
        self.entropy_coef = cfg.entropy

    def critic_features(self, fa: torch.Tensor, fg: torch.Tensor | None) -> torch.Tensor:
        if self.critic_input == "agent":
            return fa
        if self.critic_input == "global":
            return fg
        return torch.cat([fa, fg], -1)

    def state_dict(self, *args, **kwargs):  # networks + optimizers + schedule
        return {"nets": super().state_dict(), "actor_opt": self.actor_opt.state_dict(),
                "critic_opt": self.critic_opt.state_dict(), "entropy_coef": torch.tensor(self.entropy_coef)}

    def load_state_dict(self, state, strict: bool = True):
        super().load_state_dict(state["nets"], strict=strict)
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.entropy_coef = float(state["entropy_coef"])

    def train_round(self, model: BiLevelWorldModel, starts: LatentState, autocast, guard=None) -> dict[str, float]:
        """One imagination round + ``epochs`` PPO epochs (Table 3: one of the 4 'updates')."""
        cfg = self.cfg
        with autocast():
            traj = imagine(model, self.actor, starts, cfg.horizon)
            with torch.no_grad():
                cin = self.critic_features(traj.feat_a, traj.feat_g)
                values = self.critic(cin)
        reward = traj.reward.mean(-1, keepdim=True).expand_as(traj.reward) if cfg.team_reward else traj.reward
        adv, ret = gae(reward, values, traj.cont, cfg.gamma, cfg.gae_lambda)
        weight = reach_weights(traj.cont)
        if cfg.normalize_advantage:
            adv = (adv - adv.mean()) / (adv.std() + 1e-6)
        H, M = traj.raw.shape[:2]
        K = H * M
        flat = lambda x: None if x is None else x.reshape(K, *x.shape[2:])  # noqa: E731
        fa, c_in, raw, logp_old, avail = flat(traj.feat_a[:-1]), flat(cin[:-1]), flat(traj.raw), flat(traj.logp), flat(traj.avail)
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
                self.entropy_coef *= cfg.entropy_annealing
                with autocast():
                    v = self.critic(c_in[idx])
                    critic_loss = (w * 0.5 * (v - ret[idx]) ** 2).mean()
                self._step(self.critic_opt, self.critic, critic_loss, guard, "critic_loss")
                stats["actor_loss"] += float(actor_loss.detach())
                stats["critic_loss"] += float(critic_loss.detach())
                stats["entropy"] += float(ent.detach().mean())
                stats["n"] += 1
        n = max(stats.pop("n"), 1)
        out = {k: v / n for k, v in stats.items()}
        out.update(imag_reward=float(traj.reward.mean()), imag_cont=float(traj.cont.mean()),
                   value=float(values.mean()), return_=float(ret.mean()), entropy_coef=self.entropy_coef)
        return out

    def _step(self, opt, net, loss, guard, name):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), self.cfg.grad_clip)
        if guard is not None and not guard(name, loss, norm):
            opt.zero_grad(set_to_none=True)
            return
        opt.step()
