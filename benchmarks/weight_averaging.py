"""Does averaging a run's policy weights over its last checkpoints beat the last checkpoint?

    python benchmarks/weight_averaging.py runs/bench/smax_3m_s0 --windows 5 10 --write smax:3m:weight_averaging:s0

The greedy evaluation of a SMAX policy swings by +-0.15 win rate between evaluations 2.5k env
steps apart. Stochastic weight averaging (Izmailov et al., 2018: the uniform mean of the weights along
one training run) often lands nearer the middle of such an oscillation than any single iterate.
For a run that kept a checkpoint every C env steps (``--set run.checkpoint_every=C --set
run.keep_checkpoints=100``), this script takes past every multiple of ``--every`` env steps the first
checkpoint t and evaluates that checkpoint ("last") and, for every window W of ``--windows``, the
average of the W newest checkpoints up to t (as ``mabl eval --average``; ``--part policy``: every
decentralized-policy module, ``actor``: the actor alone). All greedy, on the run's own periodic-evaluation seeds (so
"best" is chosen as ``best.pt`` would be) and then, for the final step and each column's best step, on
``--fresh-episodes`` fresh seeds (those of ``learning_curve.py``'s final comparison). Nothing here
changes training: the same run, read afterwards. Writes a ``diagnosis:NAME`` section into BENCHMARKS.md
with ``--write NAME``; the last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from learning_curve import FINAL_SEED, commit, machine, write_section  # noqa: E402
from mabl.checkpoint import checkpoint_candidates  # noqa: E402
from mabl.envs import make_env  # noqa: E402
from mabl.train import EVAL_SEED_OFFSET, eval_seed_base, evaluate, load_for_eval, set_policy_average  # noqa: E402


def ckpt_paths(run_dir: Path) -> dict[int, Path]:
    return {int(p.stem.split("_")[1]): p for p in checkpoint_candidates(run_dir)}


class Averager:
    """``mabl.train.load_averaged`` for many windows of one run: every checkpoint is read once and only its
    acting networks' weights are kept; one learner acts with the average of a window (``set_policy_average``)."""

    def __init__(self, paths: dict[int, Path], part: str):
        self.paths, self.part, self.cache = paths, part, {}
        self.cfg, self.host, _ = load_for_eval(paths[max(paths)])

    def weights(self, step: int) -> list[torch.Tensor]:
        if step not in self.cache:
            _, learner, _ = load_for_eval(self.paths[step])
            self.cache[step] = [p.detach().clone() for p in learner.policy.parameters()]
        return self.cache[step]

    def window(self, w: int, upto: int) -> list[int]:
        return sorted(s for s in self.paths if s <= upto)[-w:]

    def learner(self, steps: list[int]):
        """The host learner acting with the average of ``steps``' weights (as ``load_averaged``)."""
        return set_policy_average(self.host, [self.weights(s) for s in sorted(steps, reverse=True)], self.part)


def score(env, learner, episodes: int, seed: int) -> dict:
    torch.manual_seed(seed)
    return evaluate(env, learner.policy, episodes, seed, torch.device("cpu"), deterministic=True, with_ci=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--windows", type=int, nargs="+", default=[5, 10], help="checkpoints per average")
    p.add_argument("--every", type=int, default=2500, help="env steps between evaluation points")
    p.add_argument("--start", type=int, default=10_000, help="first evaluation point (env steps)")
    p.add_argument("--episodes", type=int, default=40, help="episodes per point on the run's evaluation seeds")
    p.add_argument("--fresh-episodes", type=int, default=100)
    p.add_argument("--part", default="policy", choices=("policy", "actor"))
    p.add_argument("--write", metavar="NAME", help="write the table into BENCHMARKS.md as section diagnosis:NAME")
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    paths = ckpt_paths(args.run_dir)
    if not paths:
        raise SystemExit(f"error: no checkpoints in {str(args.run_dir)!r}")
    steps = sorted(paths)
    cols = [("last", 1)] + [(f"avg{w}", w) for w in args.windows]
    avg = Averager(paths, args.part)
    cfg = avg.cfg
    env = make_env(cfg.run.env, seed=EVAL_SEED_OFFSET, **cfg.run.env_options)
    eval_seed = eval_seed_base(cfg.run.seed)
    # every point: the first checkpoint at or after each multiple of --every (checkpoints land at episode ends)
    points = sorted({next(s for s in steps if s >= t) for t in range(args.start, steps[-1] + 1, args.every)} | {steps[-1]})
    rows = []
    for t in points:
        row = {"upto": t}
        for name, w in cols:
            used = avg.window(w, t)
            res = score(env, avg.learner(used), args.episodes, eval_seed)
            row[name] = res.get("win_rate", res["return"])
            row[f"{name}_steps"] = [min(used), max(used)]
        rows.append(row)
        print(json.dumps(row), flush=True)
    fresh = {}
    for name, w in cols:
        best = max(rows, key=lambda r: r[name])  # first maximum: ties keep the earlier, as best.pt
        for which, r in (("final", rows[-1]), ("best", best)):
            used = avg.window(w, r["upto"])
            res = score(env, avg.learner(used), args.fresh_episodes, FINAL_SEED)
            fresh[f"{name}:{which}"] = {"upto": r["upto"], "steps": [min(used), max(used)], "win_rate": res.get("win_rate"),
                                        "win_rate_ci95": res.get("win_rate_ci95"), "return": res["return"],
                                        "return_ci95": res["return_ci95"]}
            print(json.dumps({f"{name}:{which}": fresh[f"{name}:{which}"]}), flush=True)
    if args.write:
        cmd = "python benchmarks/weight_averaging.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        head = "| env steps | " + " | ".join(n for n, _ in cols) + " |"
        table = [head, "|---:|" + "---:|" * len(cols)]
        table += [f"| {r['upto']:,} | " + " | ".join(f"{r[n]:.3f}" for n, _ in cols) + " |" for r in rows]
        fresh_lines = []
        for key, v in fresh.items():
            lo, hi = v["win_rate_ci95"] or (float("nan"), float("nan"))
            fresh_lines.append(f"| `{key}` | {v['upto']:,} | {v['steps'][0]:,}-{v['steps'][1]:,} | {v['win_rate']:.3f} [{lo:.2f}, {hi:.2f}] | "
                               f"{v['return']:.2f} |")
        body = "\n".join([
            f"### Policy weight averaging over checkpoints (`{args.write}`)", "",
            f"- command: `{cmd.strip()}`",
            f"- commit `{commit()}`, machine: {machine()}",
            f"- run `{args.run_dir}` ({cfg.run.env}, seed {cfg.run.seed}), checkpoints every "
            f"{cfg.run.checkpoint_every:,} env steps; averaged part: {args.part}; greedy", "",
            f"Win rate on the run's periodic-evaluation seeds ({args.episodes} episodes; `last` = the newest checkpoint at or "
            f"below the step, `avgW` = the uniform average of the W newest):", "",
            *table, "",
            f"On {args.fresh_episodes} fresh episodes (seeds {FINAL_SEED}...; 95% Wilson intervals), the final step and each column's best step:", "",
            "| column:point | chosen at | checkpoints averaged | win rate [95%] | return |", "|---|---:|---|---|---:|",
            *fresh_lines,
            *(["", args.note] if args.note else []),
        ])
        write_section(f"diagnosis:{args.write}", body)
    print(json.dumps({"rows": rows, "fresh": fresh}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
