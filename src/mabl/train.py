"""The training loop of Algorithm 1, built from factories.

``train(cfg, make_env, make_learner)`` knows nothing of a specific suite or algorithm:

    collect an episode with the decentralized policy (agent i sees only o^i)   (lines 2-4)
    add it to the buffer D                                                      (line 4)
    learner.update(D): world-model steps, then MARL in imagination              (lines 5-14)
    every ``eval_every`` env steps: greedy evaluation episodes
    every ``checkpoint_every`` env steps: an atomic checkpoint (exact resume)

Everything is written under the run directory: ``config.json``, ``metrics.jsonl`` (one row
per episode), ``eval.csv``, TensorBoard events in ``tb/``, ``curve.png`` and
``checkpoints/ckpt_<steps>.pt``. All randomness (torch, numpy, episode seeds) derives from
``run.seed`` and is checkpointed, so a resumed run continues exactly where it stopped.
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mabl.agent import DecentralizedPolicy
from mabl.buffer import ReplayBuffer
from mabl.checkpoint import atomic_write_text, list_checkpoints, load_checkpoint, save_checkpoint
from mabl.config import Config, config_from_dict
from mabl.envs.base import MultiAgentEnv
from mabl.errors import CheckpointError
from mabl.learner import MABLLearner, resolve_device

EVAL_SEED_OFFSET = 1_000_003  # evaluation episodes never share a seed with training episodes


def resolve_run_dir(cfg: Config, run_dir: str | Path | None = None) -> Path:
    return Path(run_dir) if run_dir else (Path(cfg.run.run_dir) if cfg.run.run_dir else default_run_dir(cfg))


def refuse_overwrite(run_dir: Path) -> None:
    if list_checkpoints(run_dir / "checkpoints"):
        raise CheckpointError(f"run directory {str(run_dir)!r} already holds checkpoints; "
                              "pass --resume to continue it or choose another --run-dir")


def default_run_dir(cfg: Config) -> Path:
    env = cfg.run.env.replace(":", "_").replace("|", "-")
    return Path("runs") / env / cfg.preset / f"seed{cfg.run.seed}"


# ------------------------------------------------------------------------------------------
# Acting

@dataclass
class EpisodeStats:
    ret: float  # undiscounted team return (mean over agents of summed rewards)
    length: int
    won: bool | None
    info: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def run_episode(env: MultiAgentEnv, policy: DecentralizedPolicy, seed: int, deterministic: bool,
                device: torch.device, record: bool = True) -> tuple[dict[str, np.ndarray] | None, EpisodeStats]:
    """One episode with the decentralized policy, all agents in one batched forward.

    Returns the buffer episode (``T+1`` steps: the reset step and every step after an action;
    see :mod:`mabl.buffer` for the fields) and the episode statistics.
    """
    spec = env.spec
    ts = env.reset(seed=seed)
    carry = policy.initial(spec.n_agents, device)
    rows: dict[str, list] = {k: [] for k in ("obs", "state", "prev_action", "reward", "cont", "avail", "is_first")}
    prev_action = np.zeros((spec.n_agents, spec.action_dim), np.float32)

    def push(ts, first: bool):
        if not record:
            return
        rows["obs"].append(ts.obs), rows["state"].append(ts.state), rows["prev_action"].append(prev_action)
        rows["reward"].append(np.asarray(ts.reward, np.float32)), rows["cont"].append(0.0 if ts.terminated else 1.0)
        rows["avail"].append(ts.avail), rows["is_first"].append(first)

    push(ts, True)
    total, length = 0.0, 0
    while not ts.done:
        obs = torch.as_tensor(ts.obs, device=device)
        avail = torch.as_tensor(ts.avail, device=device) if spec.has_action_mask else None
        _, env_action, carry, _ = policy.step(obs, avail, carry, deterministic=deterministic)
        prev_action = carry.prev_action.cpu().numpy()
        ts = env.step(env_action.cpu().numpy())
        total += float(np.mean(ts.reward))
        length += 1
        push(ts, False)
    won = ts.info.get("won") if spec.has_win else None
    extra = {k: v for k, v in ts.info.items() if k != "won" and isinstance(v, (int, float, bool))}
    ep = {k: np.asarray(v) for k, v in rows.items()} if record else None
    if ep is not None:
        ep["cont"] = ep["cont"].astype(np.float32)
        ep["is_first"] = ep["is_first"].astype(bool)
    return ep, EpisodeStats(total, length, None if won is None else bool(won), extra)


def evaluate(env: MultiAgentEnv, policy: DecentralizedPolicy, episodes: int, seed: int,
             device: torch.device, deterministic: bool = True) -> dict[str, float]:
    """Greedy (or sampled) evaluation episodes: mean return, length, win rate, suite metrics."""
    stats = [run_episode(env, policy, seed + k, deterministic, device, record=False)[1] for k in range(episodes)]
    out = {"return": float(np.mean([s.ret for s in stats])), "length": float(np.mean([s.length for s in stats]))}
    if env.spec.has_win:
        out["win_rate"] = float(np.mean([bool(s.won) for s in stats]))
    for key in stats[0].info if stats else []:
        out[key] = float(np.mean([s.info.get(key, 0.0) for s in stats]))
    return out


# ------------------------------------------------------------------------------------------
# Logging

class RunLogger:
    """metrics.jsonl (every episode), eval.csv, TensorBoard and a PNG learning curve."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.eval_path = run_dir / "eval.csv"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:  # tensorboard is a dependency, but stay usable without it
                self.tb = None

    def truncate_after(self, env_steps: int) -> None:
        """On resume: drop rows written after the checkpoint (they will be produced again)."""
        if self.metrics_path.exists():
            keep = [ln for ln in self.metrics_path.read_text().splitlines() if ln.strip()
                    and _safe_json(ln).get("env_steps", math.inf) <= env_steps]
            atomic_write_text(self.metrics_path, "".join(k + "\n" for k in keep))
        if self.eval_path.exists():
            lines = self.eval_path.read_text().splitlines()
            keep = lines[:1] + [ln for ln in lines[1:] if _leading_int(ln) <= env_steps]
            atomic_write_text(self.eval_path, "".join(k + "\n" for k in keep))

    def episode(self, row: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            step = row["env_steps"]
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "env_steps":
                    self.tb.add_scalar(k if "/" in k else f"train/{k}", v, step)

    def evaluation(self, env_steps: int, wall: float, result: dict[str, float]) -> None:
        new = not self.eval_path.exists()
        keys = sorted(result)
        with open(self.eval_path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["env_steps", "wall_s", *keys])
            w.writerow([env_steps, f"{wall:.1f}", *[f"{result[k]:.6g}" for k in keys]])
        if self.tb is not None:
            for k, v in result.items():
                self.tb.add_scalar(f"eval/{k}", v, env_steps)
            self.tb.flush()
        self.plot()

    def plot(self) -> None:
        if not self.eval_path.exists():
            return
        rows = list(csv.DictReader(self.eval_path.open()))
        if not rows:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        key = "win_rate" if "win_rate" in rows[0] else "return"
        x = [int(r["env_steps"]) for r in rows]
        y = [float(r[key]) for r in rows]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(x, y, marker="o", ms=3)
        ax.set_xlabel("environment steps")
        ax.set_ylabel(f"eval {key.replace('_', ' ')}")
        ax.set_title(self.dir.as_posix()[-60:], fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        tmp = self.dir / ".curve.png.tmp"
        fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        os.replace(tmp, self.dir / "curve.png")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _safe_json(line: str) -> dict:
    try:
        out = json.loads(line)
        return out if isinstance(out, dict) else {}
    except json.JSONDecodeError:
        return {}


def _leading_int(line: str) -> float:
    try:
        return int(line.split(",", 1)[0])
    except ValueError:
        return math.inf


# ------------------------------------------------------------------------------------------
# The loop

class Trainer:
    """State of one run: env, learner, buffer, counters, RNGs; ``run()`` drives Algorithm 1."""

    def __init__(self, cfg: Config, make_env: Callable[[int], MultiAgentEnv],
                 make_learner: Callable[..., MABLLearner] | None = None, run_dir: str | Path | None = None):
        self.cfg = cfg
        rc = cfg.run
        if rc.threads > 0:
            torch.set_num_threads(rc.threads)
        torch.manual_seed(rc.seed)
        self.rng = np.random.default_rng(rc.seed)
        self.device = resolve_device(rc.device)
        self.env = make_env(rc.seed)
        self.eval_env: MultiAgentEnv | None = None
        self.make_env = make_env
        self.spec = self.env.spec
        self.learner = (make_learner or MABLLearner)(self.spec, cfg, self.device)
        self.buffer = ReplayBuffer(self.spec, cfg.model.capacity)
        self.run_dir = resolve_run_dir(cfg, run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.env_steps = 0
        self.episodes = 0
        self.wall = 0.0  # training wall time, summed across resumes
        self.next_eval = rc.eval_every
        self.next_ckpt = rc.checkpoint_every
        self.last_eval: dict[str, float] = {}
        self.logger: RunLogger | None = None

    # -- state ------------------------------------------------------------------------------
    def state_dict(self, with_buffer: bool = True) -> dict:
        return {
            "config": self.cfg.to_json(),
            "spec": json.dumps(self.spec.__dict__),
            "learner": self.learner.state_dict(),
            "buffer": self.buffer.state_dict() if with_buffer else {},
            "counters": {"env_steps": self.env_steps, "episodes": self.episodes, "next_eval": self.next_eval,
                         "next_ckpt": self.next_ckpt, "wall": self.wall},
            "last_eval": json.dumps(self.last_eval),
            "rng": {"numpy": json.dumps(self.rng.bit_generator.state), "torch": torch.get_rng_state()},
        }

    def load_state_dict(self, state: dict) -> None:
        try:
            spec = json.loads(state["spec"])
            if spec != _jsonable(self.spec.__dict__):
                raise CheckpointError(f"checkpoint was made for env {spec.get('name')!r} with spec {spec}, "
                                      f"this run uses {self.spec.name!r} with spec {_jsonable(self.spec.__dict__)}")
            self.learner.load_state_dict(state["learner"])
            if state["buffer"]:
                self.buffer.load_state_dict(state["buffer"])
            c = state["counters"]
            self.env_steps, self.episodes = int(c["env_steps"]), int(c["episodes"])
            self.next_eval, self.next_ckpt, self.wall = int(c["next_eval"]), int(c["next_ckpt"]), float(c["wall"])
            self.last_eval = json.loads(state["last_eval"])
            self.rng.bit_generator.state = json.loads(state["rng"]["numpy"])
            torch.set_rng_state(state["rng"]["torch"])
        except CheckpointError:
            raise
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise CheckpointError(f"checkpoint {state.get('_path', '?')!r} does not fit this run "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None

    def save(self) -> Path:
        path = save_checkpoint(self.state_dict(), self.ckpt_dir, self.env_steps, self.cfg.run.keep_checkpoints)
        self.learner.guard.last_good_checkpoint = str(path)
        return path

    def resume(self, source: str | Path | None = None) -> bool:
        """Restore the newest checkpoint of this run (or ``source``); False if there is none."""
        if source is None and not list_checkpoints(self.ckpt_dir):
            return False
        state = load_checkpoint(source or self.ckpt_dir)
        self.load_state_dict(state)
        self.learner.guard.last_good_checkpoint = state["_path"]
        return True

    # -- loop -------------------------------------------------------------------------------
    def episode_seed(self, k: int) -> int:
        return (self.cfg.run.seed * 7_919 + k) % (2**31 - 1)

    def run(self, resume: bool = False) -> dict[str, Any]:
        rc = self.cfg.run
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resumed = self.resume() if resume else False
        if not resumed:
            refuse_overwrite(self.run_dir)
        atomic_write_text(self.run_dir / "config.json", self.cfg.to_json() + "\n")
        self.logger = RunLogger(self.run_dir)
        if resumed:
            self.logger.truncate_after(self.env_steps)
        bar = _progress(rc, self.env_steps)
        try:
            while self.env_steps < rc.steps:
                t0 = time.perf_counter()
                self.learner.policy.eval()
                ep, stats = run_episode(self.env, self.learner.policy, self.episode_seed(self.episodes), False, self.device)
                self.buffer.add_episode(ep)
                self.env_steps += stats.length
                self.episodes += 1
                row: dict[str, Any] = {"env_steps": self.env_steps, "episode": self.episodes, "return": stats.ret,
                                       "length": stats.length}
                if stats.won is not None:
                    row["won"] = float(stats.won)
                row.update(stats.info)
                t1 = time.perf_counter()
                if len(self.buffer) >= rc.min_buffer and self.episodes % rc.train_every == 0:
                    row.update(self.learner.update(self.buffer, self.rng))
                self.wall += time.perf_counter() - t0
                row["time/collect_s"] = t1 - t0
                row["wall_s"] = self.wall
                if self.episodes % rc.log_every == 0:
                    self.logger.episode(row)
                if self.env_steps >= self.next_eval or self.env_steps >= rc.steps:
                    self.evaluate_now()
                    self.next_eval = (self.env_steps // rc.eval_every + 1) * rc.eval_every
                if self.env_steps >= self.next_ckpt or self.env_steps >= rc.steps:
                    self.save()
                    self.next_ckpt = (self.env_steps // rc.checkpoint_every + 1) * rc.checkpoint_every
                _advance(bar, self.env_steps, row, self.last_eval)
        finally:
            if bar is not None:
                bar.close()
            self.logger.close()
        summary = {"run_dir": str(self.run_dir), "env_steps": self.env_steps, "episodes": self.episodes,
                   "wall_s": round(self.wall, 1), **{f"eval_{k}": v for k, v in self.last_eval.items()}}
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary

    def evaluate_now(self) -> dict[str, float]:
        if self.eval_env is None:
            self.eval_env = self.make_env(self.cfg.run.seed + EVAL_SEED_OFFSET)
        # evaluation must not disturb the training RNG streams (exact resume, reproducibility)
        torch_state = torch.get_rng_state()
        torch.manual_seed(self.cfg.run.seed + EVAL_SEED_OFFSET + self.env_steps)
        try:
            res = evaluate(self.eval_env, self.learner.policy, self.cfg.run.eval_episodes,
                           EVAL_SEED_OFFSET + self.cfg.run.seed * 7_919, self.device, deterministic=True)
        finally:
            torch.set_rng_state(torch_state)
        self.last_eval = res
        self.logger.evaluation(self.env_steps, self.wall, res)
        return res


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d))


def _progress(rc, start: int):
    if not rc.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=rc.steps, initial=start, unit="step", dynamic_ncols=True, smoothing=0.05)


def _advance(bar, env_steps: int, row: dict, last_eval: dict) -> None:
    if bar is None:
        return
    bar.update(env_steps - bar.n)
    post = {"ret": f"{row['return']:.2f}"}
    if "win_rate" in last_eval:
        post["eval_win"] = f"{last_eval['win_rate']:.2f}"
    elif "return" in last_eval:
        post["eval_ret"] = f"{last_eval['return']:.2f}"
    if "time/update_s" in row:
        post["upd_s"] = f"{row['time/update_s']:.1f}"
    bar.set_postfix(post, refresh=False)


def train(cfg: Config, make_env: Callable[[int], MultiAgentEnv] | None = None,
          make_learner: Callable[..., MABLLearner] | None = None, run_dir: str | Path | None = None,
          resume: bool = False) -> dict[str, Any]:
    """Train per ``cfg``; ``make_env(seed)`` defaults to the registry entry for ``cfg.run.env``."""
    if make_env is None:
        from mabl.envs import make_env as registry_make

        name, options = cfg.run.env, dict(cfg.run.env_options)
        make_env = lambda seed: registry_make(name, seed=seed, **options)  # noqa: E731
    if not resume:  # fail before building anything
        refuse_overwrite(resolve_run_dir(cfg, run_dir))
    return Trainer(cfg, make_env, make_learner, run_dir).run(resume=resume)


def load_for_eval(path: str | Path, device: str = "cpu") -> tuple[Config, MABLLearner, dict]:
    """Rebuild the learner of a checkpoint (config and spec from the checkpoint itself)."""
    state = load_checkpoint(path)
    try:
        cfg = config_from_dict(json.loads(state["config"]))
        from mabl.envs.base import EnvSpec

        spec = EnvSpec(**json.loads(state["spec"]))
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {state['_path']!r} lacks a valid config/spec ({e})") from None
    learner = MABLLearner(spec, cfg, resolve_device(device))
    try:
        learner.load_state_dict(state["learner"])
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {state['_path']!r} has weights that do not fit its config "
                              f"({str(e).splitlines()[0][:200]})") from None
    return cfg, learner, state
