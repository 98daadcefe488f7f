"""Which agents' reward heads know the team reward? Per-agent predictions along real episodes.

    python benchmarks/reward_by_agent.py runs/smax:3m/fast/seed0 [more checkpoints] --episodes 60 [--write NAME]

With a team reward every agent's reward head is trained on the same r_t, and imagination averages
the agents' predictions into the team reward (``ppo.team_reward``). An agent whose own observation
no longer shows the battle cannot predict it from the agent level (z^a, h^a) alone: on SMAX a dead
unit observes all zeros, so at the winning step the dead agents' heads cannot know the win bonus.
This script plays ``--episodes`` fresh episodes (seeds 2000003...) with each checkpoint's policy
(greedy), runs the model's posterior along each real episode (it sees every real observation) and
reports, split by whether the agent is alive at that step:

* the mean prediction at the final step of won episodes against the real final reward (win bonus
  + the last damage), and the team average imagination would use;
* the mean absolute error on the other steps.

SMAX only (alive = the unit's health in the global state is > 0). Prints a table and one JSON line;
``--write NAME`` also puts the table into BENCHMARKS.md under that section name.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from learning_curve import FINAL_SEED, diagnosis_main, episode_posterior, write_section  # noqa: E402
from mabl.envs import make_env  # noqa: E402
from mabl.errors import ConfigError  # noqa: E402
from mabl.train import load_for_eval, run_episode  # noqa: E402


def alive_mask(state: np.ndarray, n_agents: int, n_units: int) -> np.ndarray:
    """``[T, n_agents]`` alive flags from SMAX world states ``[T, state_dim]`` (per unit: health
    fraction first, ``(state_dim - 2 * n_units) / n_units`` features per unit; allies first)."""
    per = (state.shape[1] - 2 * n_units) // n_units
    hp = state[:, : n_units * per].reshape(len(state), n_units, per)[..., 0]
    return hp[:, :n_agents] > 0


@torch.no_grad()
def measure(checkpoint: str, episodes: int) -> dict:
    cfg, learner, state = load_for_eval(checkpoint, "cpu")
    if not cfg.run.env.startswith("smax:"):
        raise ConfigError(f"reward_by_agent.py needs a SMAX run (alive flags from the SMAX state), got {cfg.run.env!r}")
    env = make_env(cfg.run.env, seed=FINAL_SEED, **cfg.run.env_options)
    n = env.spec.n_agents
    n_units = n + env.n_enemies
    torch.manual_seed(FINAL_SEED)
    final_alive, final_dead, team_final, real_final = [], [], [], []
    err_alive, err_dead = [], []
    wins = 0
    for k in range(episodes):
        ep, st = run_episode(env, learner.policy, FINAL_SEED + k, True, torch.device("cpu"))
        T = len(ep["obs"])
        post, _ = episode_posterior(learner, ep)
        with learner.autocast():
            pred = learner.model.heads(post)["reward"].float()[:, 0].numpy()  # [T, N]
        real = ep["reward"].mean(-1)  # the team reward for arriving at t (same for every agent)
        alive = alive_mask(ep["state"], n, n_units)
        if st.won:
            wins += 1
            final_alive += list(pred[-1][alive[-1]])
            final_dead += list(pred[-1][~alive[-1]])
            team_final.append(pred[-1].mean())
            real_final.append(real[-1])
        for t in range(1, T - 1):
            e = np.abs(pred[t] - real[t])
            err_alive += list(e[alive[t]])
            err_dead += list(e[~alive[t]])
    mean = lambda x: float(np.mean(x)) if len(x) else float("nan")  # noqa: E731
    return {"checkpoint": checkpoint, "env_steps": int(state["counters"]["env_steps"]), "reward_input": cfg.model.reward_input,
            "reward_loss": cfg.model.reward_loss, "episodes": episodes, "won": wins,
            "final_real": mean(real_final), "final_pred_alive": mean(final_alive), "n_alive": len(final_alive),
            "final_pred_dead": mean(final_dead), "n_dead": len(final_dead), "final_pred_team": mean(team_final),
            "mae_alive": mean(err_alive), "mae_dead": mean(err_dead), "n_dead_steps": len(err_dead)}


def table(rows: list[dict]) -> str:
    out = ["| checkpoint | env steps | reward head input | reward loss | won | final real | final pred, alive agents | "
           "final pred, dead agents | final pred, team average | other steps: abs error alive | abs error dead |",
           "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| `{r['checkpoint']}` | {r['env_steps']:,} | {r['reward_input']} | {r['reward_loss']} | {r['won']}/{r['episodes']} | "
                   f"{r['final_real']:.2f} | {r['final_pred_alive']:.2f} (n={r['n_alive']}) | {r['final_pred_dead']:.2f} (n={r['n_dead']}) | "
                   f"{r['final_pred_team']:.2f} | {r['mae_alive']:.3f} | {r['mae_dead']:.3f} (n={r['n_dead_steps']}) |")
    return "\n".join(out)


def main(argv=None) -> int:
    return diagnosis_main(argv, __doc__, "reward_by_agent.py", measure, table, 60,
                          "Reward head by agent: who knows the team reward",
                          "greedy policy; predictions along the posterior of the real episodes", write_section)


if __name__ == "__main__":
    sys.exit(main())
