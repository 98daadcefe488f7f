"""Does agent i's imagination see its teammates' shots?

    python benchmarks/smax_shared_target.py runs/bench/smax_3m_fast_s0 [more] --episodes 40 [--write NAME]

Focus fire pays because several agents' shots on one enemy kill it sooner. In MABL agent i's recurrent
state h^a sees only its own action a^i; the joint action reaches agent i's imagined observation only
through the global level (h^g over the joint action -> p(ẑ^g | h^g) -> p(ẑ^a | h^a, ẑ^g)). If that path
carries nothing, agent i imagines an enemy losing health to its own shots only, and focus fire has no
imagined advantage. This measures it, per checkpoint:

* real: from episodes with the policy's sampled actions, the drop of an enemy's health fraction in an
  agent's observation from one step to the next, by the number of agents that attacked it (0, 1, 2, 3;
  steps where it stays visible);
* imagined: from the posterior state of every step where an enemy is in range of two or more living
  agents, one prior step (``model.imagine_step``) under forced joint actions, the enemy's health decoded
  from each agent's (ẑ^a, h^a) by the observation decoder, minus its decoded health before the step
  (from the posterior); averaged over ``SAMPLES`` draws of the priors:
  ``none`` (every agent stops), ``own`` (the observer attacks it, the others stop), ``teammate``
  (one other agent attacks it, the observer stops), ``all`` (every agent with it in range attacks it).

If the model has learnt the battle, ``teammate`` - ``none`` is about one real shot, as ``own`` - ``none``.
Prints a table and one JSON line; ``--write NAME`` also puts the table into BENCHMARKS.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from learning_curve import FINAL_SEED, diagnosis_main, episode_posterior, write_section  # noqa: E402
from smax_scripted import N_MOVE, STOP, VISIBLE, ObsLayout  # noqa: E402
from mabl.envs import make_env  # noqa: E402
from mabl.errors import ConfigError  # noqa: E402
from mabl.train import load_for_eval, run_episode  # noqa: E402

SAMPLES = 8  # prior draws per imagined start
CASES = ("none", "own", "teammate", "all")


@torch.no_grad()
def measure(checkpoint: str, episodes: int) -> dict:
    cfg, learner, state = load_for_eval(checkpoint, "cpu")
    suite, _, task = cfg.run.env.partition(":")
    if suite != "smax":
        raise ConfigError(f"smax_shared_target needs a SMAX checkpoint, got env {cfg.run.env!r}")
    env = make_env(cfg.run.env, seed=FINAL_SEED, **cfg.run.env_options)
    layout = ObsLayout(task)
    model, policy, cpu = learner.model, learner.policy, torch.device("cpu")
    n, n_act = env.spec.n_agents, env.spec.action_dim
    torch.manual_seed(FINAL_SEED)
    real: dict[int, list[float]] = {m: [] for m in range(n + 1)}
    imag: dict[str, list[float]] = {c: [] for c in CASES}
    for e in range(episodes):
        ep, _ = run_episode(env, policy, FINAL_SEED + e, False, cpu)
        obs, avail = ep["obs"], ep["avail"]
        actions = ep["prev_action"][1:].argmax(-1)  # [T, N]: the action taken at step t
        parsed = [[layout.parse(obs[t, i]) for i in range(n)] for t in range(len(obs))]
        for t in range(len(actions)):
            for i in range(n):
                if parsed[t][i][0] <= 0:
                    continue
                for k in range(layout.n_enemies):
                    h0, h1 = parsed[t][i][3][k], parsed[t + 1][i][3][k]
                    if h0 > VISIBLE and h1 > VISIBLE:
                        real[int((actions[t] == N_MOVE + k).sum())].append(h0 - h1)
        post, _ = episode_posterior(learner, ep)
        # starts: (t, k) with enemy k in range of >= 2 living agents; the observer i is any of them
        starts = [(t, k) for t in range(len(actions)) for k in range(layout.n_enemies)
                  if avail[t, :, N_MOVE + k].sum() >= 2 and ep["cont"][t] > 0]
        if not starts:
            continue
        ts_ = torch.as_tensor([t for t, _ in starts])
        st = post.map(lambda x: x[ts_, 0].repeat_interleave(SAMPLES, 0))  # [S*SAMPLES, N, ...]
        with learner.autocast():
            # the posterior start is the same in all SAMPLES rows: decoded once per start
            before = model.decode_obs(torch.cat([st.z_a[::SAMPLES], st.h_a[::SAMPLES]], -1)).numpy()
        for case in CASES:
            for i in range(n):
                act = torch.full((len(starts), n), STOP, dtype=torch.long)
                keep = []
                for s, (t, k) in enumerate(starts):
                    shooters = np.flatnonzero(avail[t, :, N_MOVE + k])
                    others = [j for j in shooters if j != i]
                    ok = avail[t, i, N_MOVE + k] > 0 and bool(others)
                    keep.append(ok)
                    if case == "own":
                        act[s, i] = N_MOVE + k
                    elif case == "teammate" and others:
                        act[s, others[0]] = N_MOVE + k
                    elif case == "all":
                        act[s, torch.as_tensor(shooters)] = N_MOVE + k
                onehot = F.one_hot(act, n_act).float().repeat_interleave(SAMPLES, 0)
                with learner.autocast():
                    nxt = model.imagine_step(st, onehot.to(st.h_a.dtype))
                    after = model.decode_obs(torch.cat([nxt.z_a, nxt.h_a], -1)).numpy()
                for s, (t, k) in enumerate(starts):
                    if not keep[s]:
                        continue
                    rows = slice(s * SAMPLES, (s + 1) * SAMPLES)
                    h0 = layout.parse(before[s, i])[3][k]
                    h1 = np.mean([layout.parse(a)[3][k] for a in after[rows, i]])
                    imag[case].append(h0 - h1)
    mean = lambda x: float(np.mean(x)) if len(x) else float("nan")  # noqa: E731
    return {"checkpoint": checkpoint, "env_steps": int(state["counters"]["env_steps"]), "episodes": episodes,
            "real_drop": {m: mean(v) for m, v in real.items()}, "real_count": {m: len(v) for m, v in real.items()},
            "imagined_drop": {c: mean(v) for c, v in imag.items()}, "imagined_count": len(imag["none"])}


def table(rows: list[dict]) -> str:
    n = max(len(r["real_drop"]) for r in rows) - 1
    attackers = " / ".join(str(m) for m in range(n + 1))
    out = [f"| checkpoint | env steps | real drop by attackers {attackers} | imagined drop: none / own / teammate / all "
           "(starts) | imagined own - none | imagined teammate - none |", "|---|---:|---|---|---:|---:|"]
    for r in rows:
        re_, im = r["real_drop"], r["imagined_drop"]
        real = " / ".join(f"{re_[m]:.3f}" for m in sorted(re_))
        imagd = " / ".join(f"{im[c]:.3f}" for c in CASES)
        out.append(f"| `{r['checkpoint']}` | {r['env_steps']:,} | {real} | {imagd} ({r['imagined_count']}) | "
                   f"{im['own'] - im['none']:+.3f} | {im['teammate'] - im['none']:+.3f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    return diagnosis_main(argv, __doc__, "smax_shared_target.py", measure, table, 40,
                          "Teammates' shots in agent i's imagination",
                          "sampled actions; one imagined prior step per start under forced joint actions", write_section)


if __name__ == "__main__":
    sys.exit(main())
