"""How much one block of evaluation seeds can flatter a run: trained checkpoints and scripted rules
on several blocks of episode seeds.

    python benchmarks/eval_seed_blocks.py runs/bench/smax_3m_fast_s0_phg_sil1 --episodes 40 --blocks 6

Until 2026-12-03 every periodic evaluation of a run replayed the same ``run.eval_episodes`` seeds
(``run.eval_seeds=fixed`` now). This script plays each run's newest checkpoint (and ``best.pt`` with
``--best``), greedy, on block 0 = that fixed block, on the next ``--blocks - 1`` blocks of the same
range (the seeds ``run.eval_seeds=fresh`` moves on to), and on the learning curves' final-comparison
seeds; with ``--scripted`` (SMAX only) the rules of ``benchmarks/smax_scripted.py`` play the same
blocks, as a check of whether the fixed block is simply an easy map draw. The gap "block 0 − rest"
is the fixed block's reading minus the pooled win rate of all other blocks.

Writes a section into ``BENCHMARKS.md`` (``--no-write``: not); the last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from learning_curve import FINAL_SEED, commit, machine, write_section  # noqa: E402
from mabl.checkpoint import BEST_NAME  # noqa: E402
from mabl.envs import make_env  # noqa: E402
from mabl.train import eval_seed_base, evaluate, load_for_eval, wilson_ci  # noqa: E402


def seed_blocks(run_seed: int, episodes: int, blocks: int, final_blocks: int) -> list[tuple[str, int]]:
    """(label, first seed) of each block: the run's evaluation range, then the final-comparison range."""
    base = eval_seed_base(run_seed)
    out = [(f"eval {j}", base + j * episodes) for j in range(blocks)]
    return out + [(f"final {j}", FINAL_SEED + j * episodes) for j in range(final_blocks)]


def block_rates(env, policy, blocks, episodes: int) -> list[tuple[int, int]]:
    """(wins, episodes) per block, greedy."""
    out = []
    for _, first in blocks:
        torch.manual_seed(first)
        res = evaluate(env, policy, episodes, first, torch.device("cpu"), deterministic=True)
        out.append((round(res["win_rate"] * episodes), episodes))
    return out


def summary_row(name: str, counts: list[tuple[int, int]]) -> dict:
    wins0, n0 = counts[0]
    rest_w, rest_n = sum(w for w, _ in counts[1:]), sum(n for _, n in counts[1:])
    return {"policy": name, "rates": [w / n for w, n in counts], "block0": wins0 / n0,
            "rest": rest_w / rest_n if rest_n else float("nan"), "rest_ci95": list(wilson_ci(rest_w, rest_n)),
            "gap": wins0 / n0 - (rest_w / rest_n if rest_n else float("nan"))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories (their newest checkpoint is played)")
    p.add_argument("--episodes", type=int, default=40, help="episodes per block (the runs' run.eval_episodes)")
    p.add_argument("--blocks", type=int, default=6, help="blocks of the evaluation seed range, block 0 included")
    p.add_argument("--final-blocks", type=int, default=1, help="blocks of the final-comparison seeds")
    p.add_argument("--best", action="store_true", help="also play each run's best.pt")
    p.add_argument("--scripted", nargs="*", default=[], help="rules of benchmarks/smax_scripted.py to play too")
    p.add_argument("--note", default="", help="a paragraph added to the BENCHMARKS.md section")
    p.add_argument("--name", default=None, help="BENCHMARKS.md section name (default diagnosis:<env>:eval_seed_blocks)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.episodes < 1 or args.blocks < 2:
        raise SystemExit("error: --episodes must be >= 1 and --blocks >= 2 (block 0 and at least one more)")
    torch.set_num_threads(1)

    loaded = []
    for run in args.runs:
        cfg, learner, state = load_for_eval(run, "cpu")
        loaded.append((f"{run.name} @ {int(state['counters']['env_steps']):,}", cfg, learner.eval_policy))
        if args.best and (run / BEST_NAME).exists():
            _, best, bstate = load_for_eval(run / BEST_NAME, "cpu")
            loaded.append((f"{run.name} best.pt @ {int(bstate['counters']['env_steps']):,}", cfg, best.eval_policy))
    env_name, run_seed = loaded[0][1].run.env, loaded[0][1].run.seed
    if any(c.run.env != env_name or c.run.seed != run_seed for _, c, _ in loaded):
        raise SystemExit("error: the runs must share env and seed (one evaluation seed range)")
    env = make_env(env_name, seed=0, **loaded[0][1].run.env_options)
    if not env.spec.has_win:
        raise SystemExit(f"error: {env_name} reports no win flag; this script compares win rates")
    blocks = seed_blocks(run_seed, args.episodes, args.blocks, args.final_blocks)

    policies = [(name, pol) for name, _, pol in loaded]
    if args.scripted:
        suite, _, task = env_name.partition(":")
        if suite != "smax":
            raise SystemExit(f"error: scripted rules exist for SMAX only, got {env_name!r}")
        from smax_scripted import ObsLayout, ScriptedPolicy

        layout = ObsLayout(task)
        policies += [(f"scripted {n}", ScriptedPolicy(n, layout, seed=0, sync_margin=0.25)) for n in args.scripted]

    rows = []
    for name, pol in policies:
        t0 = time.perf_counter()
        row = summary_row(name, block_rates(env, pol, blocks, args.episodes))
        rows.append(row)
        print(f"{name:48s} " + " ".join(f"{r:.3f}" for r in row["rates"]) +
              f"  block0-rest {row['gap']:+.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)

    if not args.no_write:
        cmd = "python benchmarks/eval_seed_blocks.py " + " ".join(
            shlex.quote(str(a)) for a in (argv if argv is not None else sys.argv[1:]))
        head = "| policy | " + " | ".join(f"{lab} ({first})" for lab, first in blocks) + " | rest pooled [95%] | block 0 − rest |"
        table = [head, "|---|" + "---:|" * (len(blocks) + 2)]
        table += [f"| `{r['policy']}` | " + " | ".join(f"{x:.3f}" for x in r["rates"]) +
                  f" | {r['rest']:.3f} [{r['rest_ci95'][0]:.2f}, {r['rest_ci95'][1]:.2f}] | {r['gap']:+.3f} |" for r in rows]
        body = "\n".join([
            f"### Blocks of evaluation seeds: `{env_name}` (`{args.name or 'diagnosis:' + env_name + ':eval_seed_blocks'}`)", "",
            f"- command: `{cmd.strip()}`",
            f"- commit `{commit()}`, {time.strftime('%Y-%m-%d')}, machine: {machine()}",
            f"- greedy win rate on blocks of {args.episodes} episode seeds (first seed in brackets); block 0 is the one every "
            f"periodic evaluation of a seed-{run_seed} run replayed with `run.eval_seeds=fixed`; scripted rules with sync margin 0.25", "",
            *table,
            *(["", args.note] if args.note else []),
        ])
        write_section(args.name or f"diagnosis:{env_name}:eval_seed_blocks", body)
    print(json.dumps({"env": env_name, "blocks": blocks, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
