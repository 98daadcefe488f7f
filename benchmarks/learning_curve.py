"""Learning curve of one training run, against a random policy measured by the same script.

    python benchmarks/learning_curve.py --env smax:3m --preset fast --steps 50000 --seed 0
    python benchmarks/learning_curve.py --env smax:3m --run-dir runs/bench/smax_3m_fast_s0 --report-only

Trains (unless ``--report-only``: then it reads an existing run directory), evaluates a uniformly
random policy (respecting action masks) with the same evaluation code and episode seeds, copies the
curve to ``benchmarks/results/`` and writes a section into ``BENCHMARKS.md`` with the exact command,
commit, machine, budget and results. The last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mabl.fast import native_bf16  # noqa: E402
from mabl.config import config_from_dict, make_config, parse_set  # noqa: E402
from mabl.envs import make_env  # noqa: E402
from mabl.checkpoint import BEST_NAME  # noqa: E402
from mabl.errors import CheckpointError  # noqa: E402
from mabl.train import EVAL_SEED_OFFSET, HELDOUT_SEED, eval_seed_base, evaluate, load_for_eval, mean_ci, run_episode, summarize, train  # noqa: E402

# seeds of the final trained-vs-random comparison: fresh maps, shared by neither training nor periodic
# evaluation; `mabl eval RUN --episodes N` plays the same ones by default (its greedy line reproduces the report's)
FINAL_SEED = HELDOUT_SEED


class RandomPolicy:
    """Uniform over available actions (discrete) or U[-1, 1] (continuous); the baseline."""

    def __init__(self, spec, seed: int):
        self.spec = spec
        self.rng = np.random.default_rng(seed)

    def initial(self, n, device=None):
        return SimpleNamespace(prev_action=torch.zeros(n, self.spec.action_dim))

    def step(self, obs, avail, carry, deterministic=False):
        n = self.spec.n_agents
        if self.spec.discrete:
            av = np.ones((n, self.spec.action_dim), bool) if avail is None else avail.numpy()
            act = np.array([self.rng.choice(np.flatnonzero(row)) for row in av])
            a = torch.as_tensor(act)
        else:
            a = torch.as_tensor(self.rng.uniform(-1, 1, (n, self.spec.action_dim)).astype(np.float32))
        return a, a, carry, None


def final_comparison(run_dir: Path, episodes: int, seed: int, policy_seed: int) -> dict:
    """The run's newest checkpoint, greedy and sampled, against the random policy on the same
    ``episodes`` fresh episode seeds: per-policy mean return (95% t interval), win rate / arrival,
    and the paired per-episode return difference trained - random with its 95% t interval; with
    ``best.pt`` in the run directory (``run.keep_best``) also that checkpoint, greedy, on the same seeds.
    """
    cfg, learner, state = load_for_eval(run_dir, "cpu")
    env = make_env(cfg.run.env, seed=seed, **cfg.run.env_options)
    out: dict = {"episodes": episodes, "seed": seed, "checkpoint_env_steps": int(state["counters"]["env_steps"])}
    # run.policy_ema: the averaged weights are the run's policy; the live ones get their own row
    policies = {"greedy": (learner.eval_policy, True), "sampled": (learner.eval_policy, False),
                "random": (RandomPolicy(env.spec, policy_seed), False)}
    if learner.policy_ema is not None:
        policies["live greedy"] = (learner.policy, True)
    best_path = Path(run_dir) / BEST_NAME  # run.keep_best: the learner of the best periodic evaluation
    try:
        if best_path.exists():
            _, best_learner, best_state = load_for_eval(best_path, "cpu")
            policies["best greedy"] = (best_learner.eval_policy, True)
            out["best_env_steps"] = int(best_state["counters"]["env_steps"])
            out["best_window"] = cfg.run.best_window
    except CheckpointError as e:  # a damaged best.pt costs its row, not the report
        print(f"warning: {e}; the report has no best.pt row", file=sys.stderr)
    torch.manual_seed(seed)
    per: dict[str, list] = {}
    for name, (pol, det) in policies.items():
        per[name] = [run_episode(env, pol, seed + k, det, torch.device("cpu"), record=False)[1] for k in range(episodes)]
    rnd = np.array([s.ret for s in per["random"]])
    for name, stats in per.items():
        row = summarize(stats, env.spec.has_win, with_ci=True)
        if name != "random":
            diff = np.array([s.ret for s in stats]) - rnd
            row.update(diff_vs_random=float(diff.mean()), diff_vs_random_ci95=list(mean_ci(diff)))
        out[name] = row
    return out


def comparison_lines(cmp: dict) -> str:
    def fmt(name, row):
        lo, hi = row["return_ci95"]
        text = f"return {row['return']:.2f} [{lo:.2f}, {hi:.2f}]"
        if "win_rate" in row:
            wl, wh = row["win_rate_ci95"]
            text += f", win rate {row['win_rate']:.3f} [{wl:.2f}, {wh:.2f}]"
        for key in ("arrived_fraction", "deadlocked_fraction"):
            if key in row:
                text += f", {key.split('_')[0]} {row[key]:.3f}"
        if "diff_vs_random" in row:
            dl, dh = row["diff_vs_random_ci95"]
            text += f"; paired return difference vs random {row['diff_vs_random']:+.2f} [{dl:+.2f}, {dh:+.2f}]"
        return f"  - {name}: {text}"

    head = (f"- final checkpoint ({cmp['checkpoint_env_steps']:,} env steps) against the random policy on the same "
            f"{cmp['episodes']} fresh episode seeds ({cmp['seed']}...; 95% intervals):")
    lines = [head] + [fmt(n, cmp[n]) for n in ("greedy", "sampled", "random")]
    if "live greedy" in cmp:  # run.policy_ema: the rows above are the averaged weights
        lines[0] += " (`run.policy_ema`: the averaged weights; `live greedy`: the weights as trained)"
        lines.append(fmt("live greedy", cmp["live greedy"]))
    if "best greedy" in cmp:
        w = cmp.get("best_window", 1)
        what = "the best periodic evaluation" if w == 1 else f"the best mean of {w} consecutive periodic evaluations"
        lines.append(f"- the checkpoint of {what} (`best.pt`, {cmp['best_env_steps']:,} env steps; chosen on the "
                     f"evaluation seeds, tested here on the fresh ones):\n" + fmt("greedy", cmp["best greedy"]))
    return "\n".join(lines)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def steal_note(summary: dict) -> str:
    """The CPU steal of the run (``summary.json``'s ``cpu_steal``, this session's part of it) as a clause."""
    steal = summary.get("cpu_steal")
    if steal is None:
        return ""
    return f", CPU steal {100 * steal:.0f}% while training (the session that ended the run)" + (
        " (other guests took that share of this VM's CPU: wall times are inflated)" if steal >= 0.1 else "")


@functools.lru_cache(maxsize=None)
def commit() -> str:
    """The short HEAD commit, ``+dirty`` with uncommitted changes to tracked files. Taken once, when this
    module is imported (below), so the report's own output files (tracked CSVs, curves) do not mark it dirty."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


commit()


def episode_posterior(learner, ep: dict):
    """Posterior states of one recorded episode (a :func:`mabl.train.run_episode` buffer dict) as a batch of
    one: ``(post, logits)`` of ``model.observe`` (``post`` ``[T, 1, N, ...]``), under the learner's autocast."""
    first = torch.zeros(len(ep["obs"]), 1, dtype=torch.bool)
    first[0] = True
    with learner.autocast():
        post, logits, _ = learner.model.observe(*(torch.as_tensor(ep[k])[:, None] for k in ("obs", "state", "prev_action")), first)
    return post, logits


def diagnosis_main(argv, doc: str, script: str, measure, table, default_episodes: int, title: str, what: str, write) -> int:
    """The command line shared by the checkpoint diagnoses (``reward_by_agent.py``, ``imagined_by_step.py``):
    ``CHECKPOINT... [--episodes N] [--write NAME [--note TEXT]]``; prints ``table(rows)`` and one JSON line of the
    rows ``measure(checkpoint, episodes)``, and with ``--write`` puts the table under ``title`` into BENCHMARKS.md
    (section ``diagnosis:NAME``) through ``write(name, body)``; ``what`` describes the episodes in the section."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="checkpoint files or run directories (newest checkpoint)")
    p.add_argument("--episodes", type=int, default=default_episodes)
    p.add_argument("--write", metavar="NAME", help="also write the table into BENCHMARKS.md as section diagnosis:NAME")
    p.add_argument("--note", default="", help="text after the table (with --write)")
    args = p.parse_args(argv)
    if args.episodes <= 0:
        p.error(f"--episodes must be > 0, got {args.episodes}")
    rows = [measure(c, args.episodes) for c in args.checkpoints]
    tab = table(rows)
    print(tab)
    if args.write:
        cmd = f"python benchmarks/{script} " + " ".join(args.checkpoints) + f" --episodes {args.episodes}"
        body = (f"### {title} (`{args.write}`)\n\n- command: `{cmd}`\n- commit `{commit()}`, machine: {machine()}\n"
                f"- {args.episodes} fresh episodes per checkpoint (seeds {FINAL_SEED}...), {what}\n\n{tab}\n")
        if args.note:
            body += f"\n{args.note}\n"
        write(f"diagnosis:{args.write}", body)
    print(json.dumps(rows))
    return 0


def write_section(name: str, body: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEvery figure here was written by a script in `benchmarks/`, with its command, commit and machine.\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        pre, rest = text.split(start, 1)
        post = rest.split(end, 1)[1]
        text = pre + block + post
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", default="smax:3m")
    p.add_argument("--preset", default="fast")
    p.add_argument("--steps", type=int, default=50_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--run-dir")
    p.add_argument("--report-only", action="store_true", help="do not train; report an existing run directory")
    p.add_argument("--random-episodes", type=int, default=50)
    p.add_argument("--final-episodes", type=int, default=0,
                   help="also evaluate the final checkpoint (greedy and sampled) and the random policy on this many "
                        "fresh, shared episode seeds, with a paired difference (0: skip)")
    p.add_argument("--name", help="section name in BENCHMARKS.md (default curve:<env>:<preset>:s<seed>)")
    p.add_argument("--note", default="", help="a sentence added under the table")
    args = p.parse_args(argv)

    run_dir = Path(args.run_dir or f"runs/bench/{args.env.replace(':', '_').replace('|', '-')}_{args.preset}_s{args.seed}")
    t0 = time.time()
    if args.report_only:
        cfg = config_from_dict(json.loads((run_dir / "config.json").read_text()))
    else:
        over = parse_set(args.set)
        over.setdefault("run", {}).update(steps=args.steps, seed=args.seed, run_dir=str(run_dir))
        cfg = make_config(args.preset, args.env, over)
        done = train(cfg)  # continues the run directory's checkpoint if there is one
        if done.get("stopped"):  # SIGINT/SIGTERM: a checkpoint at that step; no report of an unfinished run
            print(f"stopped by {done['stopped']} at {done['env_steps']:,} env steps; the same command continues the run "
                  "(add --report-only to report it as it stands)", file=sys.stderr)
            return 130
    rows = list(csv.DictReader((run_dir / "eval.csv").open()))
    if not rows:
        raise SystemExit(f"no evaluation rows in {run_dir / 'eval.csv'}")
    key = "win_rate" if "win_rate" in rows[0] else "return"
    extra = [k for k in ("arrived_fraction",) if k in rows[0]]

    # random baseline: same env options, the seeds of the run's first evaluation (every one of them with run.eval_seeds=fixed)
    env = make_env(cfg.run.env, seed=cfg.run.seed + EVAL_SEED_OFFSET, **cfg.run.env_options)
    rnd = evaluate(env, RandomPolicy(env.spec, args.seed), args.random_episodes,
                   eval_seed_base(cfg.run.seed), torch.device("cpu"), deterministic=False)

    cmp = final_comparison(run_dir, args.final_episodes, FINAL_SEED, args.seed) if args.final_episodes > 0 else None

    name = args.name or f"curve:{cfg.run.env}:{cfg.preset}:s{cfg.run.seed}"
    slug = name.replace(":", "_").replace("|", "-")
    res_dir = ROOT / "benchmarks" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "curve.png").exists():
        shutil.copy(run_dir / "curve.png", res_dir / f"{slug}.png")
    shutil.copy(run_dir / "eval.csv", res_dir / f"{slug}.csv")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    wall = summary.get("wall_s", float(rows[-1]["wall_s"]))
    # the precision in effect: run.bf16 falls back to fp32 on a CPU without native bf16
    # (a stopped run has no summary: then as it would run on the machine writing this report)
    bf16 = ("bf16" in summary["speed"].split(",")) if "speed" in summary else (cfg.run.bf16 and native_bf16("cpu"))
    last = rows[-1]
    best = max(rows, key=lambda r: float(r[key]))
    step_idx = np.linspace(0, len(rows) - 1, min(len(rows), 12)).round().astype(int)
    table = ["| env steps | wall (min) | eval " + key.replace("_", " ") + " | " + " | ".join(extra) + (" |" if extra else ""),
             "|---|---|---|" + "---|" * len(extra)]
    for i in sorted(set(step_idx)):
        r = rows[i]
        table.append(f"| {int(r['env_steps']):,} | {float(r['wall_s']) / 60:.0f} | {float(r[key]):.3f} | "
                     + " | ".join(f"{float(r[e]):.3f}" for e in extra) + (" |" if extra else ""))
    cmd = "python benchmarks/learning_curve.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    steps_every = cfg.run.train_every_steps
    every = f"every {steps_every} env steps" if steps_every > 0 else f"every {cfg.run.train_every} episode(s)"
    body = f"""### Learning curve: `{cfg.run.env}`, preset `{cfg.preset}`, seed {cfg.run.seed}

- command: `{cmd}` (training run directory `{run_dir}`)
- commit `{commit()}`, {time.strftime('%Y-%m-%d')}, machine: {machine()}{steal_note(summary)}
- budget: {int(last['env_steps']):,} env steps, {float(wall) / 3600:.2f} h of training wall time (bf16={bf16}, {every}: {cfg.model.train_steps} model updates and {cfg.ppo.updates} imagination round(s), bootstrap={cfg.ppo.bootstrap}, entropy={cfg.ppo.entropy:g})
- final eval {key.replace('_', ' ')} ({'greedy' if cfg.run.eval_greedy else 'sampled actions'}, {cfg.run.eval_episodes} episodes): **{float(last[key]):.3f}**; best {float(best[key]):.3f} at {int(best['env_steps']):,} steps
- random policy, same script, the seeds of the first evaluation ({args.random_episodes} episodes): {key.replace('_', ' ')} **{rnd.get(key, float('nan')):.3f}**{''.join(f', {e} {rnd[e]:.3f}' for e in extra if e in rnd)}
{comparison_lines(cmp) + chr(10) if cmp else ""}- curve: `benchmarks/results/{slug}.png`, data `benchmarks/results/{slug}.csv`{f", final comparison `benchmarks/results/{slug}_final.json`" if cmp else ""}

{chr(10).join(table)}
"""
    if args.note:
        body += f"\n{args.note}\n"
    write_section(name, body)
    out = {"env": cfg.run.env, "preset": cfg.preset, "seed": cfg.run.seed, "env_steps": int(last["env_steps"]),
           key: float(last[key]), f"best_{key}": float(best[key]), f"random_{key}": rnd.get(key), "wall_s": wall,
           "script_s": round(time.time() - t0, 1)}
    if cmp:
        out["final_comparison"] = cmp
        (res_dir / f"{slug}_final.json").write_text(json.dumps(cmp, indent=1) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
