"""The ``mabl`` command.

    mabl train --env smax:3m --preset fast --steps 50000 --seed 0 [--set ppo.epochs=3 ...]
    mabl train --resume --run-dir runs/smax_3m/fast/seed0
    mabl eval  runs/smax_3m/fast/seed0 --episodes 20
    mabl envs                       # suites and tasks
    mabl config --env smax:3m --preset paper   # the resolved config as JSON

Bad input ends with one line ``mabl: error: ...`` naming the bad value and what is
accepted, and exit status 2 (a diverged run: exit status 3).
"""
from __future__ import annotations

import argparse
import json
import sys

from mabl.envs.base import MissingDependencyError
from mabl.errors import ConfigError, DivergenceError, MablError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mabl", description="MABL: multi-agent bi-level world model (AAMAS 2024)")
    sub = p.add_subparsers(dest="command", required=True)

    def config_args(sp):
        sp.add_argument("--env", help="SUITE:TASK, e.g. smax:3m, flatland:5_agents, mamujoco:Humanoid-9|8")
        sp.add_argument("--preset", default=None, help="paper | fast | tiny (default: fast)")
        sp.add_argument("--config", help="JSON file {preset, model, ppo, run}")
        sp.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key, e.g. --set model.lr=1e-4 (repeatable)")
        sp.add_argument("--steps", type=int, help="real environment steps (run.steps)")
        sp.add_argument("--seed", type=int, help="run.seed")
        sp.add_argument("--device", help="auto | cpu | cuda | cuda:N")

    t = sub.add_parser("train", help="train a MABL agent")
    config_args(t)
    t.add_argument("--run-dir", help="output directory (default runs/<env>/<preset>/seed<seed>)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run directory")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="evaluate a checkpoint (or the newest one in a run directory)")
    e.add_argument("checkpoint")
    e.add_argument("--episodes", type=int, default=20)
    e.add_argument("--seed", type=int, default=12345)
    e.add_argument("--stochastic", action="store_true", help="sample actions instead of the greedy action")
    e.add_argument("--device", default="cpu")
    e.add_argument("--env-options", default=None, help="JSON dict of env options (default: the run's)")

    sub.add_parser("envs", help="list environment suites and tasks")
    c = sub.add_parser("config", help="print the resolved config as JSON")
    config_args(c)
    return p


def build_config(args):
    from mabl.config import load_config_file, make_config, parse_set

    data = load_config_file(args.config) if args.config else {}
    preset = args.preset or data.get("preset", "fast")
    over: dict = {sec: dict(v) for sec, v in data.items() if sec != "preset"}
    for sec, vals in parse_set(args.set).items():
        over.setdefault(sec, {}).update(vals)
    run = over.setdefault("run", {})
    for key in ("steps", "seed", "device"):
        val = getattr(args, key, None)
        if val is not None:
            run[key] = val
    if getattr(args, "no_progress", False):
        run["progress"] = False
    if getattr(args, "run_dir", None):
        run["run_dir"] = args.run_dir
    env = args.env or run.get("env")
    return make_config(preset, env, over)


def cmd_train(args) -> int:
    from pathlib import Path

    from mabl.train import train

    if args.resume and args.run_dir and not args.env and not args.config and (Path(args.run_dir) / "config.json").is_file():
        # resuming a run: its saved config is the default
        from mabl.config import config_from_dict, replace

        cfg = config_from_dict(json.loads((Path(args.run_dir) / "config.json").read_text()))
        if args.steps is not None:
            cfg = replace(cfg, run={"steps": args.steps})
        if args.no_progress:
            cfg = replace(cfg, run={"progress": False})
    else:
        cfg = build_config(args)
    summary = train(cfg, resume=args.resume)
    print(json.dumps(summary))
    return 0


def cmd_eval(args) -> int:
    from mabl.envs import make_env
    from mabl.train import evaluate, load_for_eval

    if args.episodes <= 0:
        raise ConfigError(f"--episodes must be > 0, got {args.episodes}")
    cfg, learner, state = load_for_eval(args.checkpoint, args.device)
    options = dict(cfg.run.env_options)
    if args.env_options:
        try:
            options = json.loads(args.env_options)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--env-options is not a JSON object: {e}") from None
    env = make_env(cfg.run.env, seed=args.seed, **options)
    import torch

    torch.manual_seed(args.seed)
    res = evaluate(env, learner.policy, args.episodes, args.seed, learner.device, deterministic=not args.stochastic)
    res = {"checkpoint": state["_path"], "env": cfg.run.env, "env_steps": int(state["counters"]["env_steps"]),
           "episodes": args.episodes, **res}
    print(json.dumps(res))
    return 0


def cmd_envs(_args) -> int:
    from mabl.envs import SUITES, suite_module

    for suite in SUITES:
        try:
            tasks = ", ".join(suite_module(suite).TASKS)
        except ImportError as e:
            tasks = f"(unavailable: {e})"
        print(f"{suite}: {tasks}")
    return 0


def cmd_config(args) -> int:
    print(build_config(args).to_json())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {"train": cmd_train, "eval": cmd_eval, "envs": cmd_envs, "config": cmd_config}[args.command]
    try:
        return handler(args)
    except DivergenceError as e:
        print(f"mabl: error: {e}", file=sys.stderr)
        return 3
    except (MablError, MissingDependencyError) as e:
        print(f"mabl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mabl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
