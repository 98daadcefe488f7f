"""Scripted reference policies for SMAX maps: what simple decentralized rules win.

    python benchmarks/smax_scripted.py --env smax:3m --episodes 100

A learning curve means little without knowing what a few lines of rules achieve on the same map.
Each policy here is *decentralized*: agent i acts on its own SMAX observation and action mask only
(the same inputs as :class:`mabl.agent.DecentralizedPolicy`), so every number is a level a MABL
policy could reach.

* ``random``: uniform over the available actions.
* ``first``: attack the first enemy in range (lowest index); otherwise move toward the closest
  visible enemy; with none in sight, move toward the enemy half (+x: SMAX spawns the allies on the
  left and the enemies on the right).
* ``weakest``: as ``first`` but attack the enemy in range with the least health (focus fire).
* ``weakest_sync``: as ``weakest``, and while out of range an agent that is closer to the enemy
  than every visible ally by more than ``--sync-margin`` map units stops and waits: the team
  arrives together, so the heuristic enemies (each keeps shooting the closest ally in range)
  cannot shoot one early arrival down alone.
* ``weakest_sync_team``: as ``weakest_sync``, but ties between equally weak enemies in range (at the
  start every enemy has full health) go to the enemy closest to the centre of the agent and the allies
  it sees, instead of the lowest index, so agents that see the battle from different places still
  pick the same target.

Episodes use the seeds of ``benchmarks/learning_curve.py``'s final comparison (2000003, ...), so the
win rates compare directly with its trained-vs-random table. Writes a section into
``BENCHMARKS.md`` (``--output`` elsewhere, ``--no-write`` not at all); the last stdout line is one
JSON object.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from learning_curve import FINAL_SEED, commit, machine, write_section  # noqa: E402
from mabl.envs import make_env  # noqa: E402
from mabl.errors import one_of  # noqa: E402
from mabl.train import evaluate  # noqa: E402

POLICIES = ("random", "first", "weakest", "weakest_sync", "weakest_sync_team")
# SMAX movement actions 0-3 move by these unit vectors, 4 stops, 5 + j attacks enemy j
MOVES = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, -1.0], [-1.0, 0.0]])
STOP, N_MOVE = 4, 5
VISIBLE = 0.05  # a unit's health fraction in an observation is 0 when it is dead or out of sight


class ObsLayout:
    """Where SMAX's ``unit_list`` observation keeps what the rules read (from JaxMARL's env)."""

    def __init__(self, task: str):
        from mabl.envs.smax import _compiled

        jenv = _compiled(task)[0]
        self.n_allies, self.n_enemies = int(jenv.num_allies), int(jenv.num_enemies)
        self.unit_feats = len(jenv.unit_features)  # health, x, y, ... per other unit
        self.own_at = self.unit_feats * (self.n_allies - 1 + self.n_enemies)
        self.type_bits = int(jenv.unit_type_bits)
        self.sight = np.asarray(jenv.unit_type_sight_ranges, np.float64)

    def parse(self, o: np.ndarray):
        """-> own health, ally health/relative positions, enemy health/relative positions (map units)."""
        others = o[: self.own_at].reshape(-1, self.unit_feats)
        own = o[self.own_at:]
        sight = self.sight[int(np.argmax(own[-self.type_bits:]))]
        allies, enemies = others[: self.n_allies - 1], others[self.n_allies - 1:]
        return own[0], allies[:, 0], allies[:, 1:3] * sight, enemies[:, 0], enemies[:, 1:3] * sight


class ScriptedPolicy:
    """One of :data:`POLICIES` for every agent; ``act(obs, avail)`` -> actions ``[n_agents]``."""

    def __init__(self, name: str, layout: ObsLayout, seed: int = 0, sync_margin: float = 0.5):
        if name not in POLICIES:
            raise one_of("scripted policy", name, POLICIES)
        self.name, self.layout, self.margin = name, layout, sync_margin
        self.n_actions = N_MOVE + layout.n_enemies
        self.rng = np.random.default_rng(seed)

    # the policy protocol of mabl.train.run_episode (as DecentralizedPolicy): episodes, evaluation and
    # the recorded buffer episode come from the library's own loop
    def initial(self, n_agents: int, device=None) -> SimpleNamespace:
        return SimpleNamespace(prev_action=torch.zeros(n_agents, self.n_actions))

    def step(self, obs: torch.Tensor, avail: torch.Tensor, carry, deterministic: bool = False):
        a = torch.as_tensor(self.act(obs.numpy(), avail.numpy()))
        return a, a, SimpleNamespace(prev_action=F.one_hot(a, self.n_actions).float()), None

    def act(self, obs: np.ndarray, avail: np.ndarray) -> np.ndarray:
        return np.array([self.agent(o, a) for o, a in zip(obs, avail)])

    def agent(self, o: np.ndarray, avail: np.ndarray) -> int:
        if self.name == "random":
            return int(self.rng.choice(np.flatnonzero(avail)))
        my_health, ally_h, ally_p, enemy_h, enemy_p = self.layout.parse(o)
        if my_health <= 0:
            return STOP
        targets = np.flatnonzero(avail[N_MOVE:])
        if targets.size:
            if self.name == "first":
                return N_MOVE + int(targets[0])
            key = enemy_h[targets]
            if self.name == "weakest_sync_team":  # tie-break: closest to the centre of the visible team
                centre = np.mean([p for h, p in zip(ally_h, ally_p) if h > VISIBLE] + [np.zeros(2)], axis=0)
                key = np.round(key, 4) * 1e3 + np.linalg.norm(enemy_p[targets] - centre, axis=1)
            return N_MOVE + int(targets[np.argmin(key)])
        seen = enemy_h > VISIBLE
        if not seen.any():
            return 1  # +x: toward the enemy half
        dist = np.where(seen, np.linalg.norm(enemy_p, axis=1), np.inf)
        k = int(np.argmin(dist))
        if self.name in ("weakest_sync", "weakest_sync_team"):
            mates = [np.linalg.norm(enemy_p[seen] - p, axis=1).min() for h, p in zip(ally_h, ally_p) if h > VISIBLE]
            if mates and dist[k] < min(mates) - self.margin:
                return STOP  # ahead of the team: wait for it
        return int(np.argmax(MOVES @ enemy_p[k]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="smax:3m", help="a SMAX task, e.g. smax:3m")
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--seed", type=int, default=FINAL_SEED, help="first episode seed")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--sync-margin", type=float, nargs="+", default=[0.5],
                   help="weakest_sync: lead (map units) that makes an agent wait; several values: one row each")
    p.add_argument("--note", default="", help="a paragraph added to the BENCHMARKS.md section")
    p.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    suite, _, task = args.env.partition(":")
    if suite != "smax":
        raise SystemExit(f"error: scripted policies exist for SMAX only, got --env {args.env!r}")
    env = make_env(args.env, seed=0)
    layout = ObsLayout(task)
    rows = []
    variants = [(n, m) for n in args.policies for m in (args.sync_margin if n.startswith("weakest_sync") else [None])]
    for name, margin in variants:
        pol = ScriptedPolicy(name, layout, seed=args.seed, sync_margin=margin or 0.0)
        if margin is not None and len(args.sync_margin) > 1:
            name = f"{name} (margin {margin:g})"
        t0 = time.perf_counter()
        res = evaluate(env, pol, args.episodes, args.seed, torch.device("cpu"), with_ci=True)
        lo, hi = res["win_rate_ci95"]
        rows.append(dict(policy=name, episodes=args.episodes, win_rate=res["win_rate"], win_ci95=[lo, hi],
                         return_mean=res["return"], length_mean=res["length"], seconds=time.perf_counter() - t0))
        print(f"{name:26s} win {res['win_rate']:.3f} [{lo:.2f}, {hi:.2f}]  return {res['return']:6.2f}  "
              f"length {res['length']:.1f}", flush=True)
    if not args.no_write:
        cmd = "python benchmarks/smax_scripted.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        table = ["| policy | win rate [95%] | mean return | mean length |", "|---|---|---:|---:|"]
        table += [f"| `{r['policy']}` | {r['win_rate']:.3f} [{r['win_ci95'][0]:.2f}, {r['win_ci95'][1]:.2f}] | "
                  f"{r['return_mean']:.2f} | {r['length_mean']:.1f} |" for r in rows]
        body = "\n".join([
            f"### Scripted decentralized policies: `{args.env}`", "",
            f"- command: `{cmd.strip()}`",
            f"- commit `{commit()}`, {time.strftime('%Y-%m-%d')}, machine: {machine()}",
            f"- {args.episodes} episodes per policy on seeds {args.seed}... (the fresh seeds of the learning curves' "
            f"final comparison); sync margin {', '.join(f'{m:g}' for m in args.sync_margin)} map units; 95% Wilson intervals", "",
            *table, "",
            "Each agent acts on its own observation and action mask only (see the script's docstring for the rules).",
            *([ "", args.note] if args.note else []),
        ])
        if args.output.resolve() == (ROOT / "BENCHMARKS.md").resolve():
            write_section(f"scripted:{args.env}", body)
        else:
            args.output.write_text(body + "\n")
    print(json.dumps({"env": args.env, "results": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
