"""Typed, separate configs for the world model, the MARL algorithm and the run.

Presets carry the paper's Tables 2-4 by name (``paper`` picks the column for the
env's suite and the learning rates for the map). Every config rejects unknown
keys and wrong types with one line naming the key and what is accepted.
"""
from __future__ import annotations

import json
import math
import re
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mabl.errors import ConfigError, one_of


@dataclass
class WorldModelConfig:
    """Bi-level world model (paper §3.1-3.2, Table 2, Table 4 'Model')."""

    hidden: int = 256  # MLP hidden size of every component (Table 2 'Hidden layer size')
    layers: int = 2  # hidden layers per MLP (Table 2)
    deter: int = 256  # size of h^g and h^a (GRU state)
    embed: int = 256  # observation / state embedding size
    n_categoricals: int = 32  # Table 2, local & global
    n_classes: int = 32
    kl_balance: float = 0.8  # weight on the prior side (Table 2 'cross entropy weight'); 1-x on the posterior
    kl_scale: float = 1.0 / 32  # the authors' code averages the KL over the 32 categoricals
    lr: float = 3e-4
    grad_clip: float = 100.0
    batch_size: int = 40  # Table 2 'Number of sampled rollouts'
    seq_len: int = 20  # Table 2 'Sequence length'
    train_steps: int = 60  # Table 2 'Number of epochs': model updates after every episode
    capacity: int = 250_000  # Table 2 'Buffer Size' (env steps)
    # Extension, not in the paper (uniform sampling, 0): the fraction of every sampled batch (world-model
    # sequences and imagination starts) drawn from the newest ``recent_window`` env steps instead of
    # uniformly from the whole buffer
    recent_fraction: float = 0.0
    recent_window: int = 5_000
    bilevel: bool = True  # False: the Dreamer-v2 ablation (no global level, agent prior only)
    single_global: bool = False  # True: MABL-SG ablation (one shared global latent for all agents)
    obs_loss: str = "mse"  # "mse" (Gaussian log-likelihood) or "smooth_l1"
    reward_loss: str = "mse"  # "mse" (Gaussian log-likelihood) or "smooth_l1" (Huber, delta 1: the authors' code)
    # Input of the reward head: "agent" = (z^a, h^a), the paper's; "agent+global" (extension) = also the agent's
    # global features (z^g, h^g), like the termination/availability/action heads. With a team reward every
    # agent predicts the same r_t, but an agent whose own observation no longer shows the battle (e.g. a dead
    # SMAX unit, observation all zeros) cannot predict it from the agent level alone; the global level sees s_t.
    reward_input: str = "agent"
    # Input of the agent prior: "zhat_g" = p(ẑ^a | h^a, ẑ^g), the paper's; "zhat_g+h_g" (extension) = also the
    # agent's global recurrent state h^g, which has seen the joint action. In the paper's form the teammates'
    # actions reach agent i's imagined observation only through the sampled ẑ^g; on SMAX 3m agent i then
    # imagines almost none of its teammates' shots on a shared target (benchmarks/smax_shared_target.py).
    # Only the prior changes: the posterior, the actor's input and decentralized execution stay as they are.
    agent_prior_input: str = "zhat_g"
    # Extension, not in the paper (DreamerV3's "unimix"): every latent categorical, posteriors and priors
    # of both levels, is the mixture (1 - unimix) softmax(logits) + unimix / n_classes; its samples, KL
    # terms and straight-through gradients all use the mixed distribution. 0 = the paper (no mixing).
    unimix: float = 0.0
    # Extension, not in the paper: weight of the reward and termination losses repeated on one-step prior
    # samples (ẑ^a, ẑ^g from the priors, h from the posterior rollout, the same targets), since imagination
    # feeds the heads prior samples only. 0 = the paper (heads trained on posterior latents only).
    prior_heads: float = 0.0
    # Extension, not in the paper (the authors' code has it commented out): a decoder of the global
    # state s_t from each agent's global features (z^g, h^g), trained with the obs loss, so that the
    # global level has to carry the state the top-down prior passes to p(ẑ^a | h^a, ẑ^g).
    state_decoder: bool = False
    state_scale: float = 1.0  # weight of the state decoder's loss term
    # Extension, not in the paper (False = the paper): standardize every observation feature, as the
    # encoder's input and as the decoder's target, by running statistics of the replayed batches (mean and
    # variance over the last ~obs_norm_window observations, std floored at 0.05). SMAX's relative positions
    # vary 3-25x less than health, so an unweighted reconstruction loss all but ignores them. Measured on
    # SMAX 3m (BENCHMARKS.md, "diagnosis:smax:3m:latent_ceiling:*"): position R² 0.38-0.67 -> 0.87-0.96;
    # held-out win rate at 50k env steps, seeds 0/1/2: 0.78/0.77/0.70 (without: 0.76/0.57/0.60; seeds 3/4
    # with it: 0.63/0.68, so 0.71 over five seeds, 0.68 pooled over 360 episodes each). The
    # statistics are model buffers (checkpointed, used unchanged by decentralized execution).
    obs_norm: bool = False
    obs_norm_window: int = 100_000
    # Extension, not in the paper (False = the paper): the same running standardization (window
    # obs_norm_window) for the global state s_t, where it enters the global posterior q(z^g | s_t, z^a, h^g)
    # and as the target of the optional state decoder. SMAX's state is unnormalised (positions 0..32,
    # cooldowns in seconds, type ids); the adapter's fixed scaling (env option normalize_state) is the
    # other way. Training-time only: decentralized execution never reads s_t. Measured on SMAX 3m (best
    # configuration, seeds 0/1, "...:obs_norm:state_norm" sections): held-out 0.66/0.66, pooled 360-episode
    # win rate 0.681/0.711 against 0.683/0.708 without; the global-level KL stays ~2 nats. No lift.
    state_norm: bool = False
    # Extension, not in the paper ("sample" = the paper): how imagination (§3.3) draws the latents ẑ^g, ẑ^a
    # from the priors. "mode" takes each categorical's most likely class, so imagined futures do not
    # diffuse under 32 independent draws per step. On a near-deterministic task the sampled rollouts
    # under-rate every behaviour and most what the data holds little of: SMAX 3m, open-loop replay of
    # real episodes' actions, return 13.8 sampled / 16.5 mode against 17.9 real (BENCHMARKS.md,
    # "diagnosis:smax:3m:imagine_latent"). World-model training and the posteriors are unchanged. But PPO then
    # exploits the deterministic model (actor imagined 18.4, real 17.1): held-out 50k win rate seeds 0/1
    # 0.73/0.64 against 0.78/0.77 with "sample", so the best configuration keeps sampling.
    imagine_latent: str = "sample"
    # Extension, not in the paper (1.0 = the paper): with imagine_latent="sample", the prior logits (after
    # unimix) are divided by this temperature before each draw; < 1 sharpens the imagined futures toward the
    # mode without making them deterministic (between "sample" and "mode": open-loop replay on SMAX 3m,
    # BENCHMARKS.md "diagnosis:smax:3m:imagine_latent"). Ignored with imagine_latent="mode". On SMAX 3m, T=0.5
    # trained worse (held-out 50k seeds 0/1: 0.64/0.72 against 0.78/0.77 at T=1): the colder the imagination,
    # the more the actor over-rates itself in it ("diagnosis:smax:3m:imagine_latent:t05_s0_50k").
    imagine_temperature: float = 1.0
    # Extension, not in the paper (0 = the paper): an ensemble of this many one-step predictors (one hidden
    # layer of width `hidden` each), trained alongside the model to predict agent i's next posterior
    # q(z^a_{t+1}) (its class probabilities) from its detached features (z^a_t, h^a_t, z^g_t, h^g_t) and action
    # a^i_t (MSE; the ensembles of Plan2Explore and MOPO). Where the members disagree the data says little: with
    # ppo.disagreement > 0, imagination's reward is lowered by that much times the members' variance. On SMAX
    # 3m, K=5 with ppo.disagreement=20 trained worse (held-out 50k seeds 0/1: 0.60/0.71 against 0.78/0.77): the
    # variance is nearly uniform, so the penalty acts as a per-step cost ("...:obs_norm:ens5_d20" sections).
    ensemble: int = 0


@dataclass
class PPOConfig:
    """MAPPO in imagination (paper §3.3, Table 3, Table 4 'Actor'/'Critic')."""

    actor_lr: float = 1e-4
    critic_lr: float = 1e-3
    hidden: int = 256
    layers: int = 2
    horizon: int = 15  # Table 2 'Rollout Horizon'
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    entropy: float = 0.001
    entropy_annealing: float = 0.99998
    # Extension, not in the paper: > 0 replaces the annealing by a controller that keeps the policy's
    # entropy on imagined states (mean per agent and step, weighted like the loss) near this many nats:
    # after every actor step log(coef) += entropy_target_lr * (entropy_target - entropy), coef kept in
    # [entropy, 1]: ``entropy`` is then the starting and the smallest coefficient (no annealing).
    # 0 = the paper (fixed coefficient, annealed).
    entropy_target: float = 0.0
    entropy_target_lr: float = 0.03
    # Extension, not in the paper (0 = the paper): exploration *in imagination* only (discrete actions).
    # Per imagined agent and step, with this probability the actor's sampled action is replaced by a
    # uniform draw from the predicted-available actions, and PPO scores it as if the actor had chosen it
    # (its log-probability under the actor is the "old" one: no importance correction, on purpose), with
    # its advantage clipped at 0 from below. A near-deterministic actor then still sees the imagined
    # advantage of the actions it never takes and raises them where the model says they pay; it is never
    # pushed *away* from them (without the clip, on SMAX 3m, the mostly-bad random draws drove the actor's
    # entropy to 5e-4 nats by 11k env steps). Real episodes are not affected (``run.explore`` is the
    # real-env counterpart). Measured on SMAX 3m (0.1, seeds 0-1): entropy kept at ~0.3-0.4 nats and the
    # greedy behaviour no longer frozen, but fewer wins (0.54 / 0.52 of 100 fresh episodes at 50k).
    imagine_explore: float = 0.0
    # Extension, not in the paper (0 = the paper): a per-agent counterfactual baseline from the world
    # model. For every imagined step and agent j, this many alternative actions of agent j are drawn from
    # the actor (the other agents' actions kept), each branch is stepped once through the frozen model,
    # and b_j = mean of r' + γ c' V_j(s') over the branches replaces V_j(s_t) in the first TD error of
    # agent j's GAE advantage: A_j = A_team + V_j(s_t) - b_j. b_j does not depend on agent j's own
    # action (a valid baseline, no bias) but does on the others', so the part of the team advantage
    # that their actions caused is taken out of agent j's (difference rewards / COMA, with the model's
    # one-step branches instead of a learned Q). Cost: n_agents x this many extra model steps and
    # critic values per imagined step. ``gae_lambda`` < 0.95 shrinks the later, still shared terms.
    counterfactual_samples: int = 0
    # Extension, not in the paper (0 = the paper): self-imitation on the *real* sequences that a round's
    # imagination starts come from (Oh et al. 2018, "Self-Imitation Learning"). Each step t of those
    # sequences gets the observed team return G_t (real rewards to the episode's end, bootstrapped with
    # the critic where the sequence is cut); after every PPO epoch the actor takes one step on
    # -this * log π(a_t | z^a_t, h^a_t) * max(G_t - V(s_t), 0) / σ, σ the std of the round's imagined
    # advantages before normalization (so the weights are on PPO's advantage scale), and the critic one
    # on self_imitation_value * ½ max(G_t - V(s_t), 0)². Only real actions that did better than the
    # critic expects are imitated: the real outcome (a won battle) reaches the actor without passing
    # through the model's dynamics. The actor still acts on its own (z^a, h^a) only.
    self_imitation: float = 0.0
    self_imitation_value: float = 0.01
    # Extension, not in the paper (0 = the paper): after every PPO epoch the critic also takes one step on
    # this * ½ (G_t - V(s_t))² over the same replayed real steps and observed returns G_t as
    # ``self_imitation`` (both directions, unlike self_imitation_value), so its values, which the imagined
    # advantages use at every step, are tied to real outcomes as well as to the imagined returns.
    # Works with or without self_imitation.
    real_value: float = 0.0
    # Extension, not in the paper (false = the paper): a time-aware critic for ``bootstrap=false``. There
    # the imagined return of state t is cut at the horizon, so its expected value depends on how many
    # imagined steps are left (H - t), which the critic cannot otherwise see: V(s) regresses onto the
    # average over t and the advantages inherit a t-dependent error. With this on, a learned embedding of
    # the steps left (0..H) is added to the critic's input layer (zero at start: the paper's critic until
    # it learns otherwise); the replayed real steps of ``self_imitation`` / ``real_value``, whose returns
    # run to the episode's end, get an own index H+1 ("not cut"), so those losses no longer compare a
    # full return with a cut one. Since nothing else trains that index, ``self_imitation_value``'s critic term
    # is then two-sided, ½ (G_t - V)² (one-sided, V would drift to an upper envelope of the real returns
    # and self-imitation would switch itself off: measured on SMAX 3m, 0.1% of replayed steps active at
    # 6k env steps against 25%). Needs bootstrap=false.
    critic_time: bool = False
    updates: int = 4  # Table 3 'Number of updates' (imagination rounds per episode)
    epochs: int = 5  # Table 3 'Epochs per update'
    minibatch: int = 2000  # Table 3 'Batch size' (imagined joint states per gradient step)
    grad_clip: float = 100.0
    critic_input: str = "global+agent"  # "global+agent" | "global" (Flatland, App. B.1) | "agent"
    attention_heads: int = 4
    normalize_advantage: bool = True
    # How advantages are scaled when normalize_advantage is on:
    # "batch_std" (MAPPO): (A - mean) / std over each imagined batch;
    # "return_range" (DreamerV3's return normalization): A / max(floor, S), S an exponential moving
    # average (decay return_range_decay) of the P95 - P5 range of the batch's imagined returns: advantages
    # that differ only by model noise stay small instead of being standardized to unit scale. Note that
    # this also changes the weight of the entropy bonus against the policy gradient (on SMAX 3m S ~16).
    # Measured on SMAX 3m: no better than batch_std (BENCHMARKS.md, sections "...:return_range").
    advantage_norm: str = "batch_std"
    return_range_decay: float = 0.99
    return_range_floor: float = 1.0
    # Bootstrap the imagined return with the critic's value of the last imagined state (the paper).
    # False ends every imagined return at the horizon: with an undertrained world model the critic's
    # "being alive is worth V" at s_H rewards imagined survival (e.g. fleeing in SMAX) over reward.
    bootstrap: bool = True
    team_reward: bool = True  # average the per-agent predicted rewards into one team reward
    # Extension, not in the paper (0 = the paper): pessimism where the world model is unsure. Each imagined
    # step's predicted reward of agent i becomes r - disagreement * u, u the variance across the members of
    # model.ensemble (needs >= 2) of their predictions of q(z^a_{t+1}), summed over each categorical's classes and
    # averaged over the categoricals (the scale of the ensemble's own training error, "model/ensemble").
    disagreement: float = 0.0
    imagine_batch: int = 40  # sequences drawn from the buffer for one imagination round
    imagine_seq_len: int = 20


@dataclass
class RunConfig:
    """Everything about the run that is not a network: budget, logging, speed switches."""

    env: str = "smax:3m"
    steps: int = 50_000  # real env steps
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    min_buffer: int = 500  # env steps collected before learning starts
    train_every: int = 1  # episodes between learner updates (Table 2 'Trajectories between updates')
    # > 0: schedule by env steps instead: one learner update per this many env steps collected (the
    # remainder carries over), whatever the episode lengths; train_every is then ignored
    train_every_steps: int = 0
    eval_every: int = 5_000  # env steps between evaluations
    eval_episodes: int = 10
    eval_greedy: bool = True  # periodic evaluation with the policy's mode; false: sampled actions
    # fresh: every evaluation plays episodes on seeds no earlier evaluation of the run used (an unbiased
    # reading of each checkpoint); fixed: every evaluation replays the same eval_episodes seeds (paired
    # comparisons between checkpoints, but a small fixed set can flatter or hurt a whole run)
    eval_seeds: str = "fresh"
    # Exploration noise of the training episodes only (evaluation never has it), 0 = the paper:
    # discrete actions: per agent and step, the probability of replacing the policy's action by a
    # uniform draw from the available actions; continuous: std of Gaussian noise added to the action
    # (clipped to [-1, 1]). The agent's recurrent state sees the action actually taken.
    explore: float = 0.0
    checkpoint_every: int = 10_000
    keep_checkpoints: int = 3
    # after every evaluation that beats the best so far (win rate where the env reports one, else the
    # return), write <run_dir>/best.pt: the learner at that point, for ``mabl eval RUN/best.pt``
    keep_best: bool = True
    # what keep_best ranks: the mean score of the newest this-many evaluations, the learner of the newest
    # one kept (until there are this many evaluations, best.pt follows the newest). 1 = each alone. The
    # maximum of many noisy readings flatters the checkpoint it picks (on SMAX 3m by 0.1-0.3 win rate at
    # 40 episodes); a mean over a few evaluations of neighbouring checkpoints is a steadier ranking, at
    # the cost of lagging a little.
    best_window: int = 1
    # Extension, not in the paper (0 = off): > 0 keeps an exponential moving average of the decentralized
    # policy's weights (observation encoder, agent recurrent model, agent posterior, actor) with this decay
    # per learner update (the first updates debiased: decay min(x, (1 + n) / (10 + n)) at update n). The
    # averaged policy is then the run's evaluation policy: periodic evaluation, eval.csv (the live weights'
    # figures as live_*), best.pt and `mabl eval` use it; training episodes act with the live weights.
    policy_ema: float = 0.0
    log_every: int = 1  # episodes between metric rows
    run_dir: str = ""  # default runs/<env>/<preset>/seed<seed>
    # Speed switches of the learner update (mabl.fast; none changes the math, all off = plain fp32 eager;
    # benchmarks/learner_speed.py measures them).
    # bf16 matmuls with fp32 master weights where the device has them in hardware (CPU AMX or
    # AVX512-BF16, CUDA bf16); elsewhere fp32 (emulated bf16 is ~100x slower), see mabl.fast.native_bf16
    bf16: bool = True
    compile: bool = False  # torch.compile the PPO minibatch losses (first compile costs minutes)
    fused_recurrence: bool = True  # posterior rollout: split GRU matmul, one matmul per recurrent tensor and step
    fused_heads: bool = True  # heads sharing an input: one first-layer matmul; imagination reuses the availability head
    fast_sampling: bool = True  # inverse-CDF categorical samples + analytic straight-through (same distribution)
    fused_kl: bool = True  # balanced KL computed once, both gradient weights in one analytic backward
    fast_critic: bool = True  # attention over agents as batched matmuls, no critic-input concat, bf16 PPO features
    fused_adam: bool = True  # fused Adam kernel + foreach gradient clipping
    gather_onehot: bool = True  # fp32 only: one-hot latent x weight as a gather-sum in the forward pass
    tune_malloc: bool = True  # glibc keeps freed memory (no page faults per large tensor); process-wide, one-way
    threads: int = 0  # torch intra-op threads (0: torch default)
    skip_nonfinite: bool = False  # skip a batch with non-finite loss/grad instead of stopping
    progress: bool = True
    env_options: dict = field(default_factory=dict)


@dataclass
class Config:
    model: WorldModelConfig = field(default_factory=WorldModelConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    run: RunConfig = field(default_factory=RunConfig)
    preset: str = "fast"

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


SECTIONS = {"model": WorldModelConfig, "ppo": PPOConfig, "run": RunConfig}

# ----------------------------------------------------------------------------------------------
# Presets: the paper's Tables 2-4 by name.

# Table 2 / Table 3 columns.
_SUITE_TABLES: dict[str, dict[str, dict[str, Any]]] = {
    "smax": {"model": dict(train_steps=60, batch_size=40, seq_len=20, capacity=250_000, hidden=256, deter=256, embed=256),
             "ppo": dict(hidden=256, critic_input="global+agent")},
    "mamujoco": {"model": dict(train_steps=60, batch_size=40, seq_len=20, capacity=250_000, hidden=256, deter=256, embed=256),
                 "ppo": dict(hidden=256, critic_input="global+agent")},
    "flatland": {"model": dict(train_steps=40, batch_size=32, seq_len=50, capacity=500_000, hidden=400, deter=400, embed=400),
                 "ppo": dict(hidden=400, critic_input="global", imagine_batch=32, imagine_seq_len=50)},
}

# Table 4: (actor, critic, model) learning rates per task; SMAC maps map onto our SMAX names.
_LEARNING_RATES: dict[str, tuple[float, float, float]] = {
    "flatland:5_agents": (5e-4, 5e-4, 2e-4),
    "flatland:10_agents": (5e-4, 5e-4, 2e-4),
    "mamujoco:Humanoid-9|8": (3e-4, 1e-5, 1e-5),
    "mamujoco:HumanoidStandup-9|8": (3e-4, 0.5e-5, 0.5e-5),
    "smax:3s_vs_4z": (1e-4, 1e-3, 3e-4),
    "smax:3s_vs_5z": (1e-4, 1e-3, 5e-4),
    "smax:6z_vs_24zg": (1e-4, 1e-3, 3e-4),
    "smax:3s5z_vs_3s6z": (1e-4, 1e-3, 3e-4),
}
_DEFAULT_LR = {"smax": (1e-4, 1e-3, 3e-4), "flatland": (5e-4, 5e-4, 2e-4), "mamujoco": (3e-4, 1e-5, 1e-5)}

# The cheaper default: same architecture and losses, lower replay ratio (documented in README).
_FAST = {"model": dict(train_steps=10, batch_size=16, seq_len=20),
         "ppo": dict(updates=1, epochs=4, imagine_batch=16, imagine_seq_len=20, bootstrap=False),
         "run": dict(train_every=4)}
# For tests: tiny networks, a few updates.
_TINY = {
    "model": dict(hidden=32, deter=32, embed=32, n_categoricals=4, n_classes=4, train_steps=2, batch_size=4, seq_len=8),
    "ppo": dict(hidden=32, updates=1, epochs=1, minibatch=64, imagine_batch=4, imagine_seq_len=8, horizon=5),
    "run": dict(min_buffer=20, eval_every=10**9, eval_episodes=2, checkpoint_every=10**9, progress=False,
                bf16=False),  # oneDNN bf16 has a high fixed cost per op: a loss at tiny sizes
}

PRESETS = ("paper", "fast", "tiny")


def _suite(env: str) -> str:
    return env.split(":", 1)[0] if ":" in env else env


def preset_overrides(preset: str, env: str) -> dict[str, dict[str, Any]]:
    """The section overrides a preset applies for ``env`` (before user overrides)."""
    if preset not in PRESETS:
        raise one_of("preset", preset, PRESETS)
    suite = _suite(env)
    out: dict[str, dict[str, Any]] = {"model": {}, "ppo": {}, "run": {}}
    table = _SUITE_TABLES.get(suite, _SUITE_TABLES["smax"])
    for sec in ("model", "ppo"):
        out[sec].update(table[sec])
    actor_lr, critic_lr, model_lr = _LEARNING_RATES.get(env, _DEFAULT_LR.get(suite, _DEFAULT_LR["smax"]))
    out["ppo"].update(actor_lr=actor_lr, critic_lr=critic_lr)
    out["model"]["lr"] = model_lr
    if preset == "fast":
        for sec, vals in _FAST.items():
            out[sec].update(vals)
    elif preset == "tiny":
        for sec, vals in _TINY.items():
            out[sec].update(vals)
    return out


# ----------------------------------------------------------------------------------------------
# Strict construction from dicts / CLI overrides.

_INT_MAX = 2**62  # no config int is larger; keeps absurd values out of numpy/torch


def _check_type(section: str, name: str, value: Any, typ: Any) -> Any:
    where = f"{section}.{name}"
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {where} must be a bool (true/false), got {value!r}")
    if typ is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > _INT_MAX:
                raise ConfigError(f"config key {where} is out of range: {value!r} (at most {_INT_MAX})")
            return value
        raise ConfigError(f"config key {where} must be an int, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                out = float(value)
            except OverflowError:
                out = math.inf
            if not math.isfinite(out):
                raise ConfigError(f"config key {where} must be a finite number, got {value!r}")
            return out
        raise ConfigError(f"config key {where} must be a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key {where} must be a string, got {value!r}")
    if typ is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"config key {where} must be a mapping, got {value!r}")
    return value


def _build_section(section: str, cls, values: dict[str, Any]):
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{section}' must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for k, v in values.items():
        if k not in hints:
            raise one_of(f"config key in '{section}':", k, names)
        kwargs[k] = _check_type(section, k, v, hints[k])
    return cls(**kwargs)


_CHOICES = {
    ("model", "obs_loss"): ("mse", "smooth_l1"),
    ("model", "reward_loss"): ("mse", "smooth_l1"),
    ("model", "reward_input"): ("agent", "agent+global"),
    ("model", "imagine_latent"): ("sample", "mode"),
    ("model", "agent_prior_input"): ("zhat_g", "zhat_g+h_g"),
    ("ppo", "critic_input"): ("global+agent", "global", "agent"),
    ("run", "eval_seeds"): ("fresh", "fixed"),
    ("ppo", "advantage_norm"): ("batch_std", "return_range"),
}
_POSITIVE = {
    "model": ("hidden", "layers", "deter", "embed", "n_categoricals", "n_classes", "batch_size", "seq_len", "capacity",
              "recent_window", "obs_norm_window"),
    "ppo": ("hidden", "layers", "horizon", "updates", "epochs", "minibatch", "imagine_batch", "imagine_seq_len", "attention_heads"),
    "run": ("steps", "eval_every", "eval_episodes", "checkpoint_every", "keep_checkpoints", "log_every", "train_every", "best_window"),
}
_POSITIVE_FLOAT = {
    "model": ("lr", "grad_clip", "imagine_temperature"),
    "ppo": ("actor_lr", "critic_lr", "clip", "grad_clip", "return_range_floor"),
}
_NON_NEGATIVE = {"model": ("kl_scale", "state_scale", "prior_heads", "ensemble"), "ppo": ("disagreement", "entropy", "entropy_target", "entropy_target_lr", "counterfactual_samples",
                                                                                    "self_imitation", "self_imitation_value", "real_value"), "run": ("min_buffer", "threads", "train_every_steps")}
# sizes that would only ever be typos; they keep a config from asking for terabytes
_AT_MOST = {
    ("model", "hidden"): 65_536, ("model", "deter"): 65_536, ("model", "embed"): 65_536, ("model", "layers"): 64,
    ("model", "n_categoricals"): 4096, ("model", "n_classes"): 4096, ("model", "capacity"): 100_000_000, ("model", "ensemble"): 64,
    ("ppo", "hidden"): 65_536, ("ppo", "layers"): 64, ("ppo", "attention_heads"): 1024,
    ("run", "threads"): 4096, ("run", "seed"): 2**32 - 1,
}
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def validate(cfg: Config) -> Config:
    for (sec, key), allowed in _CHOICES.items():
        val = getattr(getattr(cfg, sec), key)
        if val not in allowed:
            raise one_of(f"value for {sec}.{key}:", val, allowed)
    for sec, keys in _POSITIVE.items():
        for key in keys:
            val = getattr(getattr(cfg, sec), key)
            if val <= 0:
                raise ConfigError(f"config key {sec}.{key} must be > 0, got {val!r}")
    for sec, keys in _POSITIVE_FLOAT.items():
        for key in keys:
            val = getattr(getattr(cfg, sec), key)
            if not val > 0:
                raise ConfigError(f"config key {sec}.{key} must be > 0, got {val!r}")
    for sec, keys in _NON_NEGATIVE.items():
        for key in keys:
            val = getattr(getattr(cfg, sec), key)
            if val < 0:
                raise ConfigError(f"config key {sec}.{key} must be >= 0, got {val!r}")
    for (sec, key), hi in _AT_MOST.items():
        val = getattr(getattr(cfg, sec), key)
        if val > hi:
            raise ConfigError(f"config key {sec}.{key} must be at most {hi}, got {val!r}")
    if cfg.run.seed < 0:
        raise ConfigError(f"config key run.seed must be >= 0, got {cfg.run.seed!r}")
    if cfg.ppo.disagreement > 0 and cfg.model.ensemble < 2:
        raise ConfigError(f"config key ppo.disagreement={cfg.ppo.disagreement!r} needs model.ensemble >= 2 (the variance "
                          f"across its members), got model.ensemble={cfg.model.ensemble!r}")
    if cfg.ppo.entropy_target > 0 and cfg.ppo.entropy == 0:
        raise ConfigError("config key ppo.entropy must be > 0 when ppo.entropy_target is set (it is the controller's starting and smallest coefficient)")
    if cfg.ppo.critic_time and cfg.ppo.bootstrap:
        raise ConfigError("config key ppo.critic_time=true needs ppo.bootstrap=false (a bootstrapped imagined return "
                          "is not cut at the horizon, so there is no time left to see)")
    if not 0.0 < cfg.ppo.entropy_annealing <= 1.0:
        raise ConfigError(f"config key ppo.entropy_annealing must be in (0, 1], got {cfg.ppo.entropy_annealing!r}")
    if not _DEVICE.match(cfg.run.device):
        raise ConfigError(f"bad device {cfg.run.device!r} (run.device); accepted: auto, cpu, cuda, cuda:N")
    if not cfg.run.env or not isinstance(cfg.run.env, str):
        raise ConfigError(f"config key run.env must be SUITE:TASK (e.g. smax:3m), got {cfg.run.env!r}")
    try:
        json.dumps(cfg.run.env_options)
    except (TypeError, ValueError):
        raise ConfigError(f"config key run.env_options must be a JSON object, got {cfg.run.env_options!r}") from None
    if not 0.0 <= cfg.run.policy_ema < 1.0:
        raise ConfigError(f"config key run.policy_ema must be in [0, 1), got {cfg.run.policy_ema!r}")
    if not 0.0 <= cfg.model.unimix < 1.0:
        raise ConfigError(f"config key model.unimix must be in [0, 1), got {cfg.model.unimix!r}")
    for sec, key in (("model", "kl_balance"), ("model", "recent_fraction"), ("ppo", "gamma"), ("ppo", "gae_lambda"),
                     ("ppo", "return_range_decay"), ("ppo", "imagine_explore"), ("run", "explore")):
        val = getattr(getattr(cfg, sec), key)
        if not 0.0 <= val <= 1.0:
            raise ConfigError(f"config key {sec}.{key} must be in [0, 1], got {val!r}")
    if cfg.ppo.hidden % cfg.ppo.attention_heads:
        raise ConfigError(f"ppo.hidden ({cfg.ppo.hidden}) must be divisible by ppo.attention_heads ({cfg.ppo.attention_heads})")
    if cfg.model.state_decoder and not cfg.model.bilevel:
        raise ConfigError("model.state_decoder needs model.bilevel=true (it decodes s_t from the global level)")
    if cfg.model.state_norm and not cfg.model.bilevel:
        raise ConfigError("model.state_norm needs model.bilevel=true (only the global level reads s_t)")
    if cfg.model.reward_input == "agent+global" and not cfg.model.bilevel:
        raise ConfigError("model.reward_input='agent+global' needs model.bilevel=true (there is no global level without it)")
    if cfg.model.agent_prior_input == "zhat_g+h_g" and not cfg.model.bilevel:
        raise ConfigError("model.agent_prior_input='zhat_g+h_g' needs model.bilevel=true (there is no global level without it)")
    if cfg.model.single_global and not cfg.model.bilevel:
        raise ConfigError("model.single_global needs model.bilevel=true (it ablates the global level)")
    return cfg


def parse_value(text: str) -> Any:
    """CLI ``--set model.lr=1e-4``: JSON-ish literals, bare strings otherwise."""
    low = text.strip()
    if low.lower() in ("true", "false"):
        return low.lower() == "true"
    try:
        return json.loads(low)
    except (json.JSONDecodeError, ValueError):
        return text


def make_config(preset: str = "fast", env: str | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Preset defaults for ``env``, then ``overrides`` ({section: {key: value}}), validated."""
    overrides = dict(overrides or {})
    for sec in overrides:
        if sec not in SECTIONS:
            raise one_of("config section", sec, list(SECTIONS))
    run_over = dict(overrides.get("run", {}))
    env_name = env or run_over.get("env") or RunConfig.env
    if not isinstance(env_name, str):
        raise ConfigError(f"config key run.env must be a string, got {env_name!r}")
    base = preset_overrides(preset, env_name)
    sections = {}
    for sec, cls in SECTIONS.items():
        merged = dict(base.get(sec, {}))
        merged.update(overrides.get(sec, {}))
        if sec == "run":
            merged["env"] = env_name
        sections[sec] = _build_section(sec, cls, merged)
    return validate(Config(preset=preset, **sections))


def parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["model.lr=1e-4", "ppo.epochs=3"]`` -> ``{"model": {"lr": 1e-4}, "ppo": {"epochs": 3}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"bad --set {item!r}: expected SECTION.KEY=VALUE with SECTION one of {', '.join(SECTIONS)}")
        key, val = item.split("=", 1)
        sec, name = key.split(".", 1)
        if sec not in SECTIONS:
            raise one_of("config section", sec, list(SECTIONS))
        out.setdefault(sec, {})[name] = parse_value(val)
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON file ``{"preset": ..., "model": {...}, "ppo": {...}, "run": {...}}``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist" if not p.exists() else
                          f"config file {str(p)!r} is not a file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise ConfigError(f"config file {str(p)!r} is not valid JSON: {msg}") from None
    except OSError as e:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a JSON object, got {type(data).__name__}")
    allowed = ["preset", *SECTIONS]
    for k in data:
        if k not in allowed:
            raise one_of("top-level config key", k, allowed)
    if "preset" in data and not isinstance(data["preset"], str):
        raise one_of("preset", data["preset"], PRESETS)
    for sec in SECTIONS:
        if sec in data and not isinstance(data[sec], dict):
            raise ConfigError(f"config section '{sec}' in {str(p)!r} must be a JSON object, got {type(data[sec]).__name__}")
    return data


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a config saved by :meth:`Config.to_dict` (used by checkpoints)."""
    preset = data.get("preset", "fast")
    over = {sec: data.get(sec, {}) for sec in SECTIONS if sec in data}
    env = over.get("run", {}).get("env")
    return make_config(preset, env, over)


def replace(cfg: Config, **sections: dict[str, Any]) -> Config:
    """Copy of ``cfg`` with some keys changed, validated (for tests and benchmarks)."""
    over = {sec: {**asdict(getattr(cfg, sec)), **vals} for sec, vals in sections.items()}
    full = {sec: asdict(getattr(cfg, sec)) for sec in SECTIONS}
    full.update(over)
    return validate(Config(preset=cfg.preset, **{s: _build_section(s, SECTIONS[s], v) for s, v in full.items()}))


def check_env_name(name: str) -> None:
    """``SUITE:TASK`` names a known suite and task; fails before anything is built or written."""
    from mabl.envs import parse_env_name, suite_module

    suite, task = parse_env_name(name)
    try:
        mod = suite_module(suite)
    except ImportError:
        return  # building the env reports the missing dependency
    if task not in mod.TASKS:
        unbuildable = getattr(mod, "UNBUILDABLE", {})
        if task in unbuildable:
            raise ConfigError(f"{suite} map {task!r} cannot be built: {unbuildable[task]}; "
                              f"available: {', '.join(mod.TASKS)}")
        raise one_of(f"{suite} task", task, mod.TASKS)


# What a resumed run must keep: every network/optimiser/schedule key (model.*, ppo.*) and the
# run keys that define the data stream. The other run.* keys (budget, logging, checkpoints,
# device, threads, speed switches such as bf16/compile/fused_*) may change on resume.
RESUME_STRICT_RUN = frozenset({"run.env", "run.seed", "run.env_options", "run.min_buffer", "run.train_every",
                               "run.train_every_steps", "run.policy_ema"})


def resume_safe(key: str) -> bool:
    return key.startswith("run.") and key not in RESUME_STRICT_RUN


def _flat(d: dict) -> dict[str, Any]:
    return {f"{sec}.{k}": v for sec in SECTIONS for k, v in (d.get(sec) or {}).items()}


def config_differences(saved: dict[str, Any], cfg: Config) -> list[str]:
    """``["model.hidden: 32 in the checkpoint, 64 now", ...]`` for keys a resume may not change."""
    if not isinstance(saved, dict):
        return [f"config: {type(saved).__name__} in the checkpoint, a mapping now"]
    try:
        old = _flat(config_from_dict(saved).to_dict())
    except ConfigError as e:
        return [f"config not valid in this version ({e})"]
    new = _flat(cfg.to_dict())
    return [f"{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now"
            for k in sorted(set(old) | set(new)) if not resume_safe(k) and old.get(k) != new.get(k)]


__all__ = [
    "Config", "WorldModelConfig", "PPOConfig", "RunConfig", "PRESETS", "make_config", "parse_set",
    "load_config_file", "config_from_dict", "replace", "preset_overrides", "config_differences", "RESUME_STRICT_RUN", "resume_safe",
    "check_env_name",
]
