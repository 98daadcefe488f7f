"""The ``mabl`` command.

    mabl train --env smax:3m --preset fast --steps 50000 --seed 0 [--set ppo.epochs=3 ...]
    mabl train --resume runs/smax_3m/fast/seed0 [--steps 100000]   # continue a run
    mabl eval  runs/smax_3m/fast/seed0 --episodes 20              # win rate / return with 95% CIs
    mabl envs                       # suites and tasks
    mabl config --env smax:3m --preset paper   # the resolved config as JSON

``mabl train`` continues the run directory's newest checkpoint when there is one (a run
killed at any moment loses only the work after its last checkpoint); ``--no-resume``
refuses such a directory instead. Bad input ends with one line ``mabl: error: ...`` naming
the bad value and what is accepted, and exit status 2; a diverged run (non-finite loss or
gradient) ends with exit status 3; an I/O or out-of-memory failure with exit status 1.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

from mabl.envs.base import MissingDependencyError
from mabl.errors import ConfigError, DivergenceError, MablError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``mabl: error:`` line (exit status 2)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise ConfigError(f"{message} (see {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mabl", description="MABL: multi-agent bi-level world model (AAMAS 2024)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def config_args(sp):
        sp.add_argument("--env", help="SUITE:TASK, e.g. smax:3m, flatland:5_agents, mamujoco:Humanoid-9|8")
        sp.add_argument("--preset", default=None, help="paper | fast | tiny (default: fast)")
        sp.add_argument("--config", help="JSON file {preset, model, ppo, run}")
        sp.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key, e.g. --set model.lr=1e-4 (repeatable)")
        sp.add_argument("--steps", type=int, help="real environment steps (run.steps)")
        sp.add_argument("--seed", type=int, help="run.seed")
        sp.add_argument("--device", help="auto | cpu | cuda | cuda:N")

    t = sub.add_parser("train", help="train a MABL agent (continues the run directory's newest checkpoint)")
    config_args(t)
    t.add_argument("--run-dir", help="output directory (default runs/<env>/<preset>/seed<seed>)")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_DIR",
                   help="continue RUN_DIR (or --run-dir) from its newest usable checkpoint, with its saved config")
    g.add_argument("--no-resume", action="store_true",
                   help="start a new run; refuse a run directory that already holds checkpoints")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="evaluate a checkpoint (or the newest usable one in a run directory)")
    e.add_argument("checkpoint", help="a run directory, its checkpoints/ directory, or a ckpt_*.pt file")
    e.add_argument("--episodes", type=int, default=20)
    e.add_argument("--seed", type=int, default=None,
                   help="first episode seed (default: the held-out seeds of the benchmarks' final comparisons, "
                        "which no training or periodic evaluation episode of a run with seed <= 125 used)")
    e.add_argument("--stochastic", action="store_true", help="sample actions instead of the greedy action")
    e.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N")
    e.add_argument("--env-options", default=None, help="JSON dict of env options (default: the run's)")
    e.add_argument("--average", type=int, default=0, metavar="K",
                   help="evaluate the uniform average of the policy weights of the run's newest K checkpoints "
                        "(stochastic weight averaging; keep them with --set run.keep_checkpoints=K)")
    e.add_argument("--live", action="store_true",
                   help="a run with run.policy_ema: evaluate the live weights instead of the averaged ones")
    e.add_argument("--average-part", default="policy", choices=("policy", "actor"),
                   help="what --average averages: every decentralized-policy module (default) or the actor alone")

    sub.add_parser("envs", help="list environment suites and tasks")
    c = sub.add_parser("config", help="print the resolved config as JSON")
    config_args(c)
    return p


def _overrides(args, base: dict | None = None) -> dict:
    """Sections from ``base`` (a config file or a saved config), then --set, then the flags."""
    from mabl.config import parse_set

    over: dict = {sec: dict(v) for sec, v in (base or {}).items() if sec != "preset"}
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
    return over


def build_config(args):
    from mabl.config import check_env_name, load_config_file, make_config

    data = load_config_file(args.config) if args.config else {}
    preset = args.preset if args.preset is not None else data.get("preset", "fast")
    over = _overrides(args, data)
    if args.env is not None:
        check_env_name(args.env)
    env = args.env if args.env is not None else over.get("run", {}).get("env")
    cfg = make_config(preset, env, over)
    check_env_name(cfg.run.env)
    return cfg


def _saved_config(run_dir) -> dict | None:
    """The config a run directory was started with: config.json, else its newest checkpoint's."""
    from pathlib import Path

    from mabl.train import newest_readable_checkpoint

    p = Path(run_dir) / "config.json"
    if p.is_file():
        try:
            data = json.loads(p.read_text())
            if isinstance(data, dict):
                return data
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            pass
    peek = newest_readable_checkpoint(Path(run_dir))
    if peek is not None:
        try:
            data = json.loads(peek["config"])
            return data if isinstance(data, dict) else None
        except (KeyError, TypeError, json.JSONDecodeError):
            return None
    return None


def cmd_train(args) -> int:
    from pathlib import Path

    from mabl.config import check_env_name, config_from_dict, make_config
    from mabl.train import train

    resume_dir = args.resume if isinstance(args.resume, str) else None
    if resume_dir and args.run_dir and Path(resume_dir) != Path(args.run_dir):
        raise ConfigError(f"--resume {resume_dir!r} and --run-dir {args.run_dir!r} name different directories")
    if resume_dir:
        if not Path(resume_dir).is_dir():
            raise ConfigError(f"cannot resume {resume_dir!r}: no such run directory")
        args.run_dir = resume_dir
    saved = None
    if args.resume and args.config is None and args.preset is None and args.run_dir:
        # resuming a run: its saved config, then --env/--set and the flags on top
        saved = _saved_config(args.run_dir)
        if saved is None and args.env is None:
            raise ConfigError(f"cannot resume {args.run_dir!r}: it has no config.json or readable checkpoint; "
                              "pass --env/--config to start a new run there")
    elif args.resume and not args.run_dir and args.env is None and args.config is None:
        raise ConfigError("--resume needs a run directory: mabl train --resume RUN_DIR")
    if saved is not None:
        base = config_from_dict(saved).to_dict()
        over = _overrides(args, base)
        env = args.env if args.env is not None else base["run"]["env"]
        check_env_name(env)
        cfg = make_config(base["preset"], env, over)
    else:
        cfg = build_config(args)
    resume = True if args.resume else (False if args.no_resume else None)
    summary = train(cfg, resume=resume)
    print(json.dumps(summary))
    if summary.get("stopped"):
        print(f"mabl: stopped by {summary['stopped']} at {summary['env_steps']:,} env steps with a checkpoint; "
              f"run the same command again (or mabl train --resume {summary['run_dir']}) to continue", file=sys.stderr)
        return 130
    return 0


def cmd_eval(args) -> int:
    from mabl.envs import make_env
    from mabl.train import HELDOUT_SEED, evaluate, load_averaged, load_for_eval

    if args.seed is None:
        args.seed = HELDOUT_SEED
    if args.episodes <= 0:
        raise ConfigError(f"--episodes must be > 0, got {args.episodes}")
    if not 0 <= args.seed < 2**31:
        raise ConfigError(f"--seed must be in [0, 2**31), got {args.seed}")
    options = None
    if args.env_options is not None:
        try:
            options = json.loads(args.env_options)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--env-options is not a JSON object: {e}") from None
        if not isinstance(options, dict):
            raise ConfigError(f"--env-options must be a JSON object, got {args.env_options!r}")
    if args.average < 0:
        raise ConfigError(f"--average must be >= 1 (0: off), got {args.average}")
    averaged: list[int] = []
    if args.average:
        cfg, learner, state, averaged = load_averaged(args.checkpoint, args.average, args.device, args.average_part)
    else:
        cfg, learner, state = load_for_eval(args.checkpoint, args.device)
    if options is None:
        options = dict(cfg.run.env_options)
    try:
        env = make_env(cfg.run.env, seed=args.seed, **options)
    except TypeError as e:
        raise ConfigError(f"bad --env-options {options!r} for {cfg.run.env}: {e}") from None
    import torch

    torch.manual_seed(args.seed)
    # --average averages the live weights of the checkpoints; run.policy_ema's average is the default otherwise
    ema = learner.policy_ema is not None and not (args.live or args.average)
    res = evaluate(env, learner.eval_policy if ema else learner.policy, args.episodes, args.seed, learner.device,
                   deterministic=not args.stochastic, with_ci=True)
    res = {"checkpoint": state["_path"], "env": cfg.run.env, "env_steps": int(state["counters"]["env_steps"]),
           "episodes": args.episodes, "seed": args.seed, **{k: _finite(v) for k, v in res.items()}}
    if ema:
        res["weights"] = "policy_ema"
    if averaged:
        res["averaged"] = {"part": args.average_part, "env_steps": sorted(averaged)}
    print(_human(res))
    print(json.dumps(res))
    return 0


def _finite(v):
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v if not isinstance(v, float) or math.isfinite(v) else None


def _human(res: dict) -> str:
    def ci(key):
        lo, hi = res.get(key) or (None, None)
        return "n/a" if lo is None or hi is None else f"[{lo:.3f}, {hi:.3f}]"

    parts = [f"{res['env']} @ {res['env_steps']} env steps, {res['episodes']} episodes:"]
    if res.get("averaged"):
        steps = res["averaged"]["env_steps"]
        parts[0] = (f"{res['env']}, {res['averaged']['part']} weights averaged over {len(steps)} checkpoints "
                    f"({steps[0]}-{steps[-1]} env steps), {res['episodes']} episodes:")
    if "win_rate" in res:
        parts.append(f"win rate {res['win_rate']:.3f} (95% Wilson CI {ci('win_rate_ci95')})")
    parts.append(f"return {res['return']:.3f} ± {res.get('return_std') or 0.0:.3f} sd (95% t CI {ci('return_ci95')})")
    return " ".join(parts)


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


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except ConfigError as e:
        print(f"mabl: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help / --version
        return e.code if isinstance(e.code, int) else 0
    handler = {"train": cmd_train, "eval": cmd_eval, "envs": cmd_envs, "config": cmd_config}[args.command]
    try:
        return handler(args)
    except DivergenceError as e:
        print(f"mabl: error: {_one_line(e)}", file=sys.stderr)
        return 3
    except (MablError, MissingDependencyError) as e:
        print(f"mabl: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except MemoryError as e:
        print(f"mabl: error: out of memory ({_one_line(e)}); reduce model sizes or model.capacity", file=sys.stderr)
        return 1
    except OSError as e:
        where = f": {e.filename!r}" if getattr(e, "filename", None) else ""
        print(f"mabl: error: {e.strerror or _one_line(e)}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mabl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
