"""How noisy are the imagined advantages PPO learns from, and where does the noise sit?

    python benchmarks/advantage_noise.py runs/bench/RUN/checkpoints/ckpt_000000030002.pt [more] --episodes 20 [--write NAME]

For each checkpoint the policy plays ``--episodes`` fresh episodes (seeds 2000003..., sampled actions as in
training); every non-terminal step is an imagination start (the posterior state there, as the learner's
starts). One imagination round from all of them, exactly as in training (``ppo.horizon`` steps, the
predicted availability, reward and continuation, the critic's values, the run's ``ppo.bootstrap``), gives
the raw (not normalized) GAE advantages and lambda-returns, and the script reports:

* per imagined step t: the mean lambda-return, the mean critic value and the critic's explained variance
  of the return (1 - Var(ret - V) / Var(ret), over the starts): whether the critic, which does not see t,
  still tracks the shrinking return of a truncated rollout (``ppo.bootstrap=false``), and how much of the
  return it predicts;
* the share of the advantage variance that is between steps t (a baseline that ignored t would put it
  there) and within them;
* the share that is common to all agents of a joint state (the team reward and the agents' shared future:
  the same for every agent, so it carries no information about which agent's action made the difference)
  and the agent-specific rest;
* the advantage's standard deviation for other GAE lambdas on the same rollouts (lambda = 0 is the
  one-step TD error): how much a lower ``ppo.gae_lambda`` would cut the noise, given this critic;
* the same advantages with the per-agent counterfactual baseline of ``ppo.counterfactual_samples``
  (one-step model branches, K draws of the agent's alternative action; ``mabl.mappo.counterfactual_baseline``)
  for K in ``--counterfactual`` (default 1 and 4): their standard deviation and common share, at the run's
  lambda and at lambda = 0 (where the baseline replaces the whole state baseline of a one-step advantage).

Prints a table and one JSON line; ``--write NAME`` also puts the table into BENCHMARKS.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from learning_curve import FINAL_SEED, diagnosis_main, episode_posterior, write_section  # noqa: E402
from mabl.envs import make_env  # noqa: E402
from mabl.mappo import gae, imagine  # noqa: E402
from mabl.train import load_for_eval, run_episode  # noqa: E402
from mabl.world_model import LatentState  # noqa: E402

LAMBDAS = (0.95, 0.8, 0.5, 0.0)
COUNTERFACTUAL = (1, 4)  # draws per agent of the counterfactual baseline


def explained_variance(target: torch.Tensor, pred: torch.Tensor) -> float:
    var = float(target.var())
    return float("nan") if var <= 0 else 1.0 - float((target - pred).var()) / var


def measure(checkpoint: str, episodes: int) -> dict:
    cfg, learner, state = load_for_eval(checkpoint, "cpu")
    env = make_env(cfg.run.env, seed=FINAL_SEED, **cfg.run.env_options)
    model, algo, pc = learner.model, learner.algo, cfg.ppo
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(FINAL_SEED)
    parts, wins = [], 0
    for e in range(episodes):
        ep, st = run_episode(env, learner.policy, FINAL_SEED + e, False, torch.device("cpu"))
        wins += bool(st.won)
        post, _ = episode_posterior(learner, ep)
        keep = torch.as_tensor(ep["cont"]) > 0
        parts.append(post.map(lambda x: x[:, 0][keep].float()))
    cat = lambda name: None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    starts = LatentState(cat("h_a"), cat("z_a"), cat("h_g"), cat("z_g"))
    with torch.no_grad(), learner.autocast():
        traj = imagine(model, algo.actor, starts, pc.horizon)
        values = algo.critic(algo.critic_features(traj.feat_a, traj.feat_g), algo.trajectory_time_index(traj.feat_a.shape[:-2], traj.feat_a.device)).float()
    reward = traj.reward.mean(-1, keepdim=True).expand_as(traj.reward) if pc.team_reward else traj.reward
    if not pc.bootstrap:  # as MAPPO._advantages: the return ends at the horizon
        values = torch.cat([values[:-1], torch.zeros_like(values[-1:])], 0)
    adv, ret = gae(reward, values, traj.cont, pc.gamma, pc.gae_lambda)  # [H, M, N], raw
    H = adv.shape[0]
    by_t = [{"t": t, "ret": float(ret[t].mean()), "value": float(values[t].mean()),
             "ev": explained_variance(ret[t].flatten(), values[t].flatten()), "adv_std": float(adv[t].std())}
            for t in range(H)]
    total = float(adv.var())
    between_t = float(adv.mean((1, 2)).var(unbiased=False))
    common = adv.mean(-1, keepdim=True)
    by_lambda = {}
    for lam in LAMBDAS:
        a, _ = gae(reward, values, traj.cont, pc.gamma, lam)
        by_lambda[str(lam)] = float(a.std())
    share = lambda a: float(a.mean(-1, keepdim=True).expand_as(a).var()) / max(float(a.var()), 1e-12)  # noqa: E731
    value_fn = lambda fa, fg, t: algo.critic(algo.critic_features(fa, fg), algo.time_index(fa.shape[:-2], t, fa.device))  # noqa: E731
    adv0, _ = gae(reward, values, traj.cont, pc.gamma, 0.0)
    cf = {}
    for k in COUNTERFACTUAL:
        b = algo._counterfactual(model, traj, learner.autocast, value_fn, samples=k)
        a, a0 = adv + values[:-1] - b, adv0 + values[:-1] - b
        cf[str(k)] = {"adv_std": float(a.std()), "common_share": share(a), "adv_std_lambda0": float(a0.std()),
                      "common_share_lambda0": share(a0), "gap": float((b - values[:-1]).abs().mean())}
    return {"checkpoint": checkpoint, "env_steps": int(state["counters"]["env_steps"]), "episodes": episodes, "won": wins,
            "starts": int(starts.h_a.shape[0]), "agents": int(adv.shape[-1]), "horizon": H, "gae_lambda": pc.gae_lambda,
            "bootstrap": pc.bootstrap, "adv_std": total ** 0.5, "between_t_share": between_t / total if total > 0 else float("nan"),
            "common_share": float(common.expand_as(adv).var()) / total if total > 0 else float("nan"),
            "ev_all": explained_variance(ret.flatten(), values[:H].flatten()),
            "by_t": by_t, "adv_std_by_lambda": by_lambda, "common_share_lambda0": share(adv0), "counterfactual": cf}


def table(rows: list[dict]) -> str:
    lam = " | ".join(f"adv std, λ={x:g}" for x in LAMBDAS)
    out = [f"| checkpoint | env steps | won | starts | critic EV | variance between steps t | variance common to the agents | {lam} |",
           "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(LAMBDAS)]
    for r in rows:
        out.append(f"| `{r['checkpoint']}` | {r['env_steps']:,} | {r['won']}/{r['episodes']} | {r['starts']} | {r['ev_all']:.2f} | "
                   f"{r['between_t_share']:.3f} | {r['common_share']:.2f} | "
                   + " | ".join(f"{r['adv_std_by_lambda'][str(x)]:.2f}" for x in LAMBDAS) + " |")
    if all("counterfactual" in r for r in rows):
        out += ["", "With the per-agent counterfactual baseline (K draws per agent; advantage std and the share of its variance "
                "common to the agents, at the run's λ and at λ=0; the λ=0 columns of the plain advantage for comparison):", "",
                "| checkpoint | plain λ=0: std / common | " + " | ".join(f"K={k}: std / common | K={k}, λ=0: std / common | K={k}: mean abs(b - V)"
                                                                  for k in COUNTERFACTUAL) + " |",
                "|---|---:|" + "---:|---:|---:|" * len(COUNTERFACTUAL)]
        for r in rows:
            cells = []
            for k in COUNTERFACTUAL:
                c = r["counterfactual"][str(k)]
                cells += [f"{c['adv_std']:.2f} / {c['common_share']:.2f}", f"{c['adv_std_lambda0']:.2f} / {c['common_share_lambda0']:.2f}",
                          f"{c['gap']:.2f}"]
            out.append(f"| `{r['checkpoint']}` | {r['adv_std_by_lambda']['0.0']:.2f} / {r['common_share_lambda0']:.2f} | " + " | ".join(cells) + " |")
    out += ["", "Per imagined step t (every other step): mean lambda-return / mean critic value / critic explained variance", ""]
    for r in rows:
        steps = " ".join(f"t{b['t']}: {b['ret']:.1f}/{b['value']:.1f}/{b['ev']:.2f}" for b in r["by_t"][::2])
        out.append(f"- `{r['checkpoint']}` (λ={r['gae_lambda']:g}, bootstrap={r['bootstrap']}): {steps}")
    return "\n".join(out)


def main(argv=None) -> int:
    return diagnosis_main(argv, __doc__, "advantage_noise.py", measure, table, 20,
                          "Noise in the imagined advantages", "sampled actions; every non-terminal step an imagination start",
                          write_section)


if __name__ == "__main__":
    sys.exit(main())
