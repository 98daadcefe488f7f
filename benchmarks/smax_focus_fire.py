"""Does a trained SMAX policy focus its fire, and does imagination tell it to?

    python benchmarks/smax_focus_fire.py runs/bench/smax_3m_fast_s0 [more] --episodes 100 [--write NAME]

Focusing fire on the enemy with the least health is what separates the scripted SMAX 3m rules
(``benchmarks/smax_scripted.py``: ``first`` 0.47, ``weakest`` 0.60). For each checkpoint:

In the real environment (greedy policy, fresh seeds 2000003..., as the learning curves' final comparison):

* ``win``: the policy as it is;
* ``win, target = weakest``: the same policy, except that whenever an agent has an enemy in range its
  action is replaced by an attack on the enemy in range with the least health (the ``weakest`` rule's
  choice; the agent's recurrent state sees the action taken). The gap to ``win`` is what the policy's
  own choice of target costs;
* ``attacks on the weakest``: of the policy's attacks with two or more enemies of different health in
  range, the fraction on the one with the least health;
* ``decoder finds the weakest``: at the same steps, how often the observation decoder's reconstruction
  from the agent's posterior latent (z^a, h^a), the actor's input, ranks the same enemy lowest: whether
  the information is in the actor's input at all.

In imagination (starts: every non-terminal posterior state of ``--episodes`` episodes with sampled
actions; one imagination of ``ppo.horizon`` steps each, with the learner's critic and advantages):

* ``actor p(weakest)``: at imagined steps (reach weight >= 0.5) where the predicted availability offers
  two or more targets whose decoded health differs by >= 0.1, the actor's probability of the decoded
  weakest target, relative to all attacks;
* ``advantage, weakest / other``: the mean (normalized, as PPO uses it) advantage of the sampled attacks
  on the decoded weakest target and on the others. PPO moves the policy toward whichever is larger;
* the same difference (weakest minus other) for the one-step advantage (λ = 0), and with the per-agent
  counterfactual baseline of ``ppo.counterfactual_samples`` (``CF_SAMPLES`` draws) at the run's λ and at
  λ = 0: whether crediting each agent with what its own choice changed tells it to focus.

Prints a table and one JSON line; ``--write NAME`` also puts the table into BENCHMARKS.md.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from learning_curve import FINAL_SEED, diagnosis_main, episode_posterior, write_section  # noqa: E402
from smax_scripted import N_MOVE, ObsLayout  # noqa: E402
from mabl.envs import make_env  # noqa: E402
from mabl.errors import ConfigError  # noqa: E402
from mabl.mappo import imagine  # noqa: E402
from mabl.train import evaluate, load_for_eval, run_episode  # noqa: E402

MIN_GAP = 0.1  # decoded health fractions closer than this are not ranked in imagination
CF_SAMPLES = 4  # draws per agent of the counterfactual baseline
VARIANTS = ("lambda0", "cf", "cf_lambda0")  # advantage variants besides the run's own (see the docstring)


def weakest_target(layout: ObsLayout, obs: np.ndarray, targets: np.ndarray) -> int:
    """The enemy in ``targets`` with the least health in observation ``obs``."""
    return int(targets[np.argmin(layout.parse(obs)[3][targets])])


class WeakestTarget:
    """A decentralized policy whose attacks go to the enemy in range with the least health."""

    def __init__(self, policy, layout: ObsLayout):
        self.policy, self.layout = policy, layout

    def initial(self, n_agents: int, device=None):
        return self.policy.initial(n_agents, device)

    def step(self, obs, avail, carry, deterministic: bool = False):
        raw, act, carry, params = self.policy.step(obs, avail, carry, deterministic=deterministic)
        act = act.clone()
        for i, (o, av) in enumerate(zip(obs.numpy(), avail.numpy())):
            targets = np.flatnonzero(av[N_MOVE:])
            if targets.size:
                act[i] = N_MOVE + weakest_target(self.layout, o, targets)
        carry.prev_action = F.one_hot(act, carry.prev_action.shape[-1]).to(carry.prev_action.dtype)
        return act, act, carry, params


@torch.no_grad()
def measure(checkpoint: str, episodes: int) -> dict:
    cfg, learner, state = load_for_eval(checkpoint, "cpu")
    suite, _, task = cfg.run.env.partition(":")
    if suite != "smax":
        raise ConfigError(f"smax_focus_fire needs a SMAX checkpoint, got env {cfg.run.env!r}")
    env = make_env(cfg.run.env, seed=FINAL_SEED, **cfg.run.env_options)
    layout = ObsLayout(task)
    model, algo, policy, cpu = learner.model, learner.algo, learner.policy, torch.device("cpu")
    torch.manual_seed(FINAL_SEED)
    own = evaluate(env, policy, episodes, FINAL_SEED, cpu)
    forced = evaluate(env, WeakestTarget(policy, layout), episodes, FINAL_SEED, cpu)
    # real steps: the policy's choice of target and the decoder's ranking, greedy as in evaluation
    on_weakest, decoder_right = [], []
    for e in range(episodes):
        ts, carry = env.reset(seed=FINAL_SEED + e), policy.initial(env.spec.n_agents, cpu)
        while not ts.done:
            _, act, carry, _ = policy.step(torch.as_tensor(ts.obs), torch.as_tensor(ts.avail), carry, deterministic=True)
            decoded = model.decode_obs(torch.cat([carry.z_a, carry.h_a], -1)).numpy()
            act = act.numpy()
            for i in range(env.spec.n_agents):
                targets = np.flatnonzero(ts.avail[i, N_MOVE:])
                health = layout.parse(ts.obs[i])[3][targets]
                if targets.size < 2 or np.ptp(health) <= 1e-6:
                    continue
                best = int(targets[np.argmin(health)])
                decoder_right.append(weakest_target(layout, decoded[i], targets) == best)
                if act[i] >= N_MOVE:
                    on_weakest.append(act[i] - N_MOVE == best)
            ts = env.step(act)
    # imagination from the posterior states of sampled-action episodes, with the learner's advantages
    p_weakest, adv_weakest, adv_other = [], [], []
    gaps = {v: ([], []) for v in VARIANTS}  # variant -> (advantages on the weakest, on the others)
    lam0 = dataclasses.replace(algo.cfg, gae_lambda=0.0)
    value_fn = lambda fa, fg, t: algo.critic(algo.critic_features(fa, fg), algo.time_index(fa.shape[:-2], t, fa.device))  # noqa: E731
    for e in range(episodes):
        ep, _ = run_episode(env, policy, FINAL_SEED + e, False, cpu)
        post, _ = episode_posterior(learner, ep)
        with learner.autocast():
            keep = torch.as_tensor(ep["cont"]) > 0
            traj = imagine(model, algo.actor, post.map(lambda x: x[:, 0][keep]), cfg.ppo.horizon)
            values = algo.critic(algo.critic_features(traj.feat_a, traj.feat_g), algo.trajectory_time_index(traj.feat_a.shape[:-2], traj.feat_a.device)).float()
        adv, _, reach = algo._advantages(traj, values)
        b = algo._counterfactual(model, traj, learner.autocast, value_fn, samples=CF_SAMPLES)
        run_cfg, variants = algo.cfg, {}
        variants["cf"] = algo._advantages(traj, values, b)[0].numpy()
        algo.cfg = lam0
        try:
            variants["lambda0"] = algo._advantages(traj, values)[0].numpy()
            variants["cf_lambda0"] = algo._advantages(traj, values, b)[0].numpy()
        finally:
            algo.cfg = run_cfg
        fa = traj.feat_a[:-1].float()
        decoded = model.decode_obs(fa).numpy()
        probs = algo.actor.params(fa, traj.avail)[0].float().softmax(-1).numpy()
        raw, avail, adv, reach = traj.raw.numpy(), traj.avail.numpy(), adv.numpy(), reach.numpy()
        for k, m, i in zip(*np.nonzero(reach >= 0.5)):
            targets = np.flatnonzero(avail[k, m, i, N_MOVE:])
            health = layout.parse(decoded[k, m, i])[3][targets] if targets.size else None
            if targets.size < 2 or np.ptp(health) < MIN_GAP:
                continue
            best = int(targets[np.argmin(health)])
            p_weakest.append(probs[k, m, i, N_MOVE + best] / max(probs[k, m, i, N_MOVE + targets].sum(), 1e-8))
            if raw[k, m, i] >= N_MOVE:
                on_best = raw[k, m, i] - N_MOVE == best
                (adv_weakest if on_best else adv_other).append(float(adv[k, m, i]))
                for v, a in variants.items():
                    gaps[v][0 if on_best else 1].append(float(a[k, m, i]))
    mean = lambda x: float(np.mean(x)) if len(x) else float("nan")  # noqa: E731
    return {"checkpoint": checkpoint, "env_steps": int(state["counters"]["env_steps"]), "episodes": episodes,
            "win": own["win_rate"], "win_target_weakest": forced["win_rate"],
            "real_attack_steps": len(on_weakest), "attacks_on_weakest": mean(on_weakest),
            "decoder_finds_weakest": mean(decoder_right), "imagined_steps": len(p_weakest),
            "imagined_p_weakest": mean(p_weakest), "advantage_weakest": mean(adv_weakest),
            "advantage_other": mean(adv_other), "imagined_attacks": [len(adv_weakest), len(adv_other)],
            "advantage_gap": {v: mean(w) - mean(o) for v, (w, o) in gaps.items()}}


def table(rows: list[dict]) -> str:
    out = ["| checkpoint | env steps | win | win, target = weakest | attacks on the weakest | decoder finds the weakest | "
           "imagined: actor p(weakest) | advantage, weakest / other (attacks) | weakest - other: λ=0 | "
           f"counterfactual baseline (K={CF_SAMPLES}) | counterfactual, λ=0 |", "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        nw, no = r["imagined_attacks"]
        g = r.get("advantage_gap", {})
        out.append(f"| `{r['checkpoint']}` | {r['env_steps']:,} | {r['win']:.2f} | {r['win_target_weakest']:.2f} | "
                   f"{r['attacks_on_weakest']:.2f} (of {r['real_attack_steps']}) | {r['decoder_finds_weakest']:.2f} | "
                   f"{r['imagined_p_weakest']:.2f} | {r['advantage_weakest']:+.3f} / {r['advantage_other']:+.3f} ({nw} / {no}) | "
                   + " | ".join(f"{g.get(v, float('nan')):+.3f}" for v in VARIANTS) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    return diagnosis_main(argv, __doc__, "smax_focus_fire.py", measure, table, 100,
                          "Focus fire in the real battles and in imagination",
                          "greedy policy in the real battles, sampled actions for the imagination starts", write_section)


if __name__ == "__main__":
    sys.exit(main())
