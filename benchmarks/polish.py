"""More learner compute on the same real data: does it lift a finished run?

Loads a run's newest checkpoint (learner, replay buffer, RNG streams), then runs ``--updates``
further post-episode learner updates (Algorithm 1 lines 5-14: model steps, imagination, PPO) on
that buffer without collecting a single new env step, so the run's env-step budget is unchanged.
Every ``--eval-every`` updates the greedy policy plays one fixed block of the run's evaluation
seeds (the range its periodic evaluations use, never the held-out one); at the end the policy
before and after plays the same ``--final-episodes`` held-out seeds (``mabl.train.HELDOUT_SEED``),
the benchmarks' final comparison. The run directory is only read. Results go to a delimited
section of BENCHMARKS.md (``--name``); stdout ends with one JSON line.

    python benchmarks/polish.py runs/bench/RUN --updates 300 --eval-every 50 --name polish:smax:3m:X
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mabl.config import config_from_dict  # noqa: E402
from mabl.train import HELDOUT_SEED, Trainer, eval_seed_base, evaluate, registry_env_factory  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from learning_curve import commit, machine, write_section  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--updates", type=int, default=300, help="extra learner updates on the run's buffer")
    ap.add_argument("--eval-every", type=int, default=50, help="updates between evaluations on the run's eval seeds")
    ap.add_argument("--eval-episodes", type=int, default=40)
    ap.add_argument("--final-episodes", type=int, default=100, help="held-out episodes before and after")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: the run's run.threads)")
    ap.add_argument("--name", default="", help="BENCHMARKS.md section name ('' to skip writing)")
    args = ap.parse_args(argv)
    run = Path(args.run_dir)
    cfg = config_from_dict(json.loads((run / "config.json").read_text()))
    trainer = Trainer(cfg, registry_env_factory(cfg), None, run)  # sets the run's run.threads
    if args.threads:
        torch.set_num_threads(args.threads)
    if not trainer.resume():
        ap.error(f"no usable checkpoint in {str(run)!r}")
    learner, env = trainer.learner, trainer.make_env(cfg.run.seed + 1)
    block = eval_seed_base(cfg.run.seed)

    def play(first: int, n: int) -> dict:
        torch.manual_seed(first)
        return evaluate(env, learner.policy, n, first, trainer.device, deterministic=True, with_ci=True)

    before = play(HELDOUT_SEED, args.final_episodes)
    rows = [{"updates": 0, "win_rate": play(block, args.eval_episodes)["win_rate"], "wall_s": 0.0}]
    print(f"start @ {trainer.env_steps} env steps: held-out {before['win_rate']:.3f}, block {rows[0]['win_rate']:.3f}",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.run.seed + 777)
    for u in range(1, args.updates + 1):
        learner.update(trainer.buffer, rng)
        if u % args.eval_every == 0 or u == args.updates:
            r = play(block, args.eval_episodes)
            rows.append({"updates": u, "win_rate": r["win_rate"], "wall_s": round(time.perf_counter() - t0, 1)})
            print(f"  +{u} updates: block {r['win_rate']:.3f} ({rows[-1]['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    after = play(HELDOUT_SEED, args.final_episodes)
    out = {"run": str(run), "env_steps": trainer.env_steps, "learner_updates_before": learner.updates - args.updates,
           "extra_updates": args.updates, "held_out_before": before, "held_out_after": after, "curve": rows}
    if args.name:
        def ci(r):
            lo, hi = r["win_rate_ci95"]
            return f"{r['win_rate']:.2f} [{lo:.2f}, {hi:.2f}]"
        cmd = "python benchmarks/polish.py " + " ".join(sys.argv[1:] if argv is None else argv)
        lines = [f"### More learner updates on the same data (`{args.name}`)", "",
                 f"- command: `{cmd}`",
                 f"- commit `{commit()}`, {_dt.date.today().isoformat()}, machine: {machine()}, "
                 f"torch threads: {torch.get_num_threads()}",
                 f"- run `{run}` at {trainer.env_steps:,} env steps ({out['learner_updates_before']} learner updates during "
                 f"training); {args.updates} more updates of its preset on its buffer, no new env step "
                 f"({rows[-1]['wall_s'] / 60:.0f} min)",
                 f"- held-out greedy win rate, {args.final_episodes} episodes (seeds {HELDOUT_SEED}...; 95% Wilson): "
                 f"before **{ci(before)}**, after **{ci(after)}**",
                 f"- greedy win rate on the run's first evaluation block ({args.eval_episodes} episodes, seeds {block}...) "
                 "as the updates go on:", "",
                 "| extra updates | win rate | wall (s) |", "|---:|---:|---:|"]
        lines += [f"| {r['updates']} | {r['win_rate']:.3f} | {r['wall_s']:.0f} |" for r in rows]
        write_section(args.name, "\n".join(lines) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "curve"} | {"curve": rows}, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
