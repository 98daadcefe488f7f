"""The training loop of Algorithm 1, built from factories.

``train(cfg, make_env, make_learner)`` knows nothing of a specific suite or algorithm:

    collect an episode with the decentralized policy (agent i sees only o^i)   (lines 2-4)
    add it to the buffer D                                                      (line 4)
    learner.update(D): world-model steps, then MARL in imagination              (lines 5-14)
    every ``eval_every`` env steps: greedy evaluation episodes (on seeds offset from the training
        episodes'; with ``run.eval_seeds=fresh``, on seeds no earlier evaluation used)
    every ``checkpoint_every`` env steps: an atomic checkpoint (exact resume)

Everything is written under the run directory: ``config.json``, ``metrics.jsonl`` (one row
per episode), ``eval.csv``, TensorBoard events in ``tb/``, ``curve.png``,
``checkpoints/ckpt_<steps>.pt`` and the buffer shards they list in ``checkpoints/buffer/``
(see :mod:`mabl.checkpoint`), and ``best.pt``: the learner at the best evaluation so far
(``run.keep_best``; win rate where the env reports one, else return, averaged over the newest
``run.best_window`` evaluations once there are that many; ties keep the earlier).

Exact resume: a checkpoint holds the networks, optimizer states, the MAPPO entropy schedule
(as an exact float), the model buffer, the torch (CPU and CUDA), numpy and Python RNG states,
the step/episode/schedule counters and the guard's counters. Episode seeds derive from the
episode index and every env reset is seeded, so the env needs no saved state; evaluation
saves and restores the torch RNG. On resume, ``metrics.jsonl`` and ``eval.csv`` rows logged
after the checkpoint are dropped (they will be produced again) and TensorBoard purges its
events past that step: a run killed at any moment and resumed logs the same rows as an
uninterrupted one (bit-exact on CPU with fp32; tests/test_reliability.py checks it).
A run directory is locked (``.lock``) while a process trains in it. SIGINT (Ctrl-C) or SIGTERM
stops a run cleanly: it finishes the learner update in progress, writes a checkpoint at that step
and returns (``summary["stopped"]``); the same command continues it exactly (:class:`StopRequest`).
"""
from __future__ import annotations

import collections
import csv
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mabl.agent import DecentralizedPolicy
from mabl.buffer import ReplayBuffer
from mabl.checkpoint import (atomic_write_text, checkpoint_candidates, list_checkpoints, load_buffer, load_checkpoint,
                             load_latest, save_best, peek_checkpoint, remove_stale_temporaries, save_buffer, save_checkpoint)
from mabl.config import Config, check_env_name, config_from_dict, config_differences
from mabl.cpustat import StealMeter
from mabl.envs.base import MultiAgentEnv
from mabl.errors import CheckpointError, ConfigError, CorruptCheckpointError, DivergenceError, warn
from mabl.learner import MABLLearner, resolve_device

EVAL_SEED_OFFSET = 1_000_003  # evaluation episodes never share a seed with training episodes
# First seed of the held-out episodes: ``mabl eval``'s default and the benchmarks' final comparisons. A run
# with seed <= 125 never trains on them (seeds seed*7919 + episode, under 1M episodes) nor evaluates on them
# periodically (eval_seed_base(seed) + evaluation episodes played, under 10k of those).
HELDOUT_SEED = 2_000_003


def eval_seed_base(run_seed: int) -> int:
    """First seed of a run's evaluation range (the block ``run.eval_seeds=fixed`` replays)."""
    return EVAL_SEED_OFFSET + run_seed * 7_919


def resolve_run_dir(cfg: Config, run_dir: str | Path | None = None) -> Path:
    return Path(run_dir) if run_dir else (Path(cfg.run.run_dir) if cfg.run.run_dir else default_run_dir(cfg))


def refuse_overwrite(run_dir: Path) -> None:
    if list_checkpoints(run_dir / "checkpoints"):
        raise CheckpointError(f"run directory {str(run_dir)!r} already holds checkpoints; "
                              "continue it with --resume (the default) or choose another --run-dir")


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


def explore_actions(spec, env_action: np.ndarray, avail: np.ndarray | None, eps: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Exploration noise on one step's actions (``run.explore``).

    Discrete: each agent's action is replaced, with probability ``eps``, by a uniform draw from
    its available actions. Continuous: Gaussian noise of std ``eps`` is added and the result
    clipped to [-1, 1] (padding dimensions of unequal agents stay 0).
    """
    if spec.discrete:
        out = env_action.copy()
        for i in np.flatnonzero(rng.random(spec.n_agents) < eps):
            choices = np.flatnonzero(avail[i]) if avail is not None else np.arange(spec.action_dim)
            out[i] = rng.choice(choices)
        return out
    noisy = np.clip(env_action + eps * rng.standard_normal(env_action.shape), -1.0, 1.0).astype(env_action.dtype)
    mask = spec.action_dim_mask()
    return noisy if mask is None else np.where(mask, noisy, env_action)


@torch.no_grad()
def run_episode(env: MultiAgentEnv, policy: DecentralizedPolicy, seed: int, deterministic: bool,
                device: torch.device, record: bool = True,
                explore: float = 0.0) -> tuple[dict[str, np.ndarray] | None, EpisodeStats]:
    """One episode with the decentralized policy, all agents in one batched forward.

    ``explore > 0`` adds :func:`explore_actions` noise (drawn from a generator seeded by ``seed``);
    the buffer and the agents' carries record the action actually taken.
    Returns the buffer episode (``T+1`` steps: the reset step and every step after an action;
    see :mod:`mabl.buffer` for the fields) and the episode statistics.
    """
    spec = env.spec
    rng = np.random.default_rng([seed, 0x5EED]) if explore > 0 else None
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
        act = env_action.cpu().numpy()
        if rng is not None:
            act = explore_actions(spec, act, ts.avail if spec.has_action_mask else None, explore, rng)
            taken = torch.as_tensor(act, device=device)
            # what the model sees of the action taken: one-hot, or the (already squashed) action itself
            carry = replace(carry, prev_action=policy.actor.env_to_model_action(taken) if spec.discrete else taken.float())
        prev_action = carry.prev_action.cpu().numpy()
        ts = env.step(act)
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
             device: torch.device, deterministic: bool = True, with_ci: bool = False) -> dict[str, Any]:
    """Greedy (or sampled) evaluation episodes: mean return, length, win rate, suite metrics.

    ``with_ci`` adds 95% confidence intervals: Wilson for the win rate, Student t for the
    mean return (``win_rate_ci95``, ``return_ci95``, ``return_std``).
    """
    stats = [run_episode(env, policy, seed + k, deterministic, device, record=False)[1] for k in range(episodes)]
    return summarize(stats, env.spec.has_win, with_ci)


def summarize(stats: list[EpisodeStats], has_win: bool, with_ci: bool = False) -> dict[str, Any]:
    """The figures :func:`evaluate` reports, from the episodes' statistics."""
    rets = [s.ret for s in stats]
    out: dict[str, Any] = {"return": float(np.mean(rets)), "length": float(np.mean([s.length for s in stats]))}
    if has_win:
        out["win_rate"] = float(np.mean([bool(s.won) for s in stats]))
    for key in stats[0].info if stats else []:
        out[key] = float(np.mean([s.info.get(key, 0.0) for s in stats]))
    if with_ci:
        out["return_std"] = float(np.std(rets, ddof=1)) if len(rets) > 1 else 0.0
        out["return_ci95"] = list(mean_ci(rets))
        if has_win:
            out["win_rate_ci95"] = list(wilson_ci(sum(bool(s.won) for s in stats), len(stats)))
    return out


Z95 = 1.959963984540054
# Student t 0.975 quantiles for 1..30 degrees of freedom (beyond: Cornish-Fisher expansion)
_T975 = (12.706204736, 4.302652730, 3.182446305, 2.776445105, 2.570581836, 2.446911851, 2.364624252,
         2.306004135, 2.262157163, 2.228138852, 2.200985160, 2.178812830, 2.160368656, 2.144786688,
         2.131449546, 2.119905299, 2.109815578, 2.100922040, 2.093024054, 2.085963447, 2.079613845,
         2.073873068, 2.068657610, 2.063898562, 2.059538553, 2.055529439, 2.051830516, 2.048407142,
         2.045229642, 2.042272456)


def t975(df: int) -> float:
    if df <= 0:
        return math.inf
    if df <= len(_T975):
        return _T975[df - 1]
    z = Z95
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def wilson_ci(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (sound at 0/n and n/n)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_ci(values) -> tuple[float, float]:
    """95% Student t interval for the mean; unbounded for fewer than two values."""
    x = np.asarray(values, np.float64)
    if len(x) < 2:
        return (-math.inf, math.inf)
    m = float(x.mean())
    half = t975(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return (m - half, m + half)


# ------------------------------------------------------------------------------------------
# Logging

class RunLogger:
    """metrics.jsonl (every episode), eval.csv, TensorBoard and a PNG learning curve."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: int | None = None):
        self.dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.eval_path = run_dir / "eval.csv"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # on resume, TensorBoard drops the events a killed run wrote after the checkpoint
                purge = None if resume_step is None else resume_step + 1
                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=purge)
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

class RunLock:
    """An exclusive lock on ``<run_dir>/.lock`` for the life of a run: two processes never write
    one run directory. The OS drops it when the process ends, SIGKILL included."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            self.fd = None
            raise CheckpointError(f"run directory {str(self.path.parent)!r} is in use by another mabl process "
                                  f"(pid {other}); wait for it to end or choose another --run-dir") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None


class StopRequest:
    """SIGINT (Ctrl-C) or SIGTERM while a run trains: stop cleanly instead of losing the work.

    The first signal only sets :attr:`requested` (its name); the loop sees it at the next episode
    boundary, after the learner update in progress, writes a checkpoint there and returns, so the
    same command continues exactly from that step. A second signal interrupts at once
    (``KeyboardInterrupt``; the checkpoints already written are complete, writes are atomic).
    Handlers are installed only in the main thread and restored on exit.
    """

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        sys.stderr.write(f"\nmabl: {self.requested} received: stopping after the current update with a checkpoint "
                         "(send it again to stop at once)\n")
        sys.stderr.flush()

    def __exit__(self, *exc) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()


class Trainer:
    """State of one run: env, learner, buffer, counters, RNGs; ``run()`` drives Algorithm 1."""

    def __init__(self, cfg: Config, make_env: Callable[[int], MultiAgentEnv],
                 make_learner: Callable[..., MABLLearner] | None = None, run_dir: str | Path | None = None):
        self.cfg = cfg
        rc = cfg.run
        if rc.threads > 0:
            torch.set_num_threads(rc.threads)
        torch.manual_seed(rc.seed)
        random.seed(rc.seed)
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
        self.steps_since_update = 0  # env steps collected since the last update (run.train_every_steps)
        self.stream_total = 0  # buffer rows ever added (the buffer holds the newest len(buffer))
        self.wall = 0.0  # training wall time, summed across resumes
        self.next_eval = rc.eval_every
        self.next_ckpt = rc.checkpoint_every
        self.last_eval: dict[str, float] = {}
        self.best_eval = -math.inf  # best ranking score so far (run.keep_best, run.best_window)
        self.recent_scores: list[float] = []  # the newest evaluations' scores, for run.best_window
        self.eval_episodes_done = 0  # evaluation episodes played so far (run.eval_seeds=fresh: the next seeds)
        self.logger: RunLogger | None = None
        self._buffer_entry: dict | None = None  # the buffer entry of the last checkpoint saved/loaded
        self.checkpoint_stats: list[dict[str, float]] = []  # write time and size of each save
        self.steal: StealMeter | None = None  # CPU time stolen by the hypervisor during this session's run()
        self.stop: StopRequest | None = None  # SIGINT/SIGTERM during run(): stop at the next episode boundary

    # -- state ------------------------------------------------------------------------------
    def meta(self) -> dict[str, str]:
        return {"learner": type(self.learner).__name__, "algorithm": type(getattr(self.learner, "algo", None)).__name__}

    def state_dict(self, buffer_entry: dict | None = None) -> dict:
        """Everything a resume needs; the buffer is referenced through ``buffer_entry`` (shards)."""
        g = self.learner.guard
        algo = getattr(self.learner, "algo", None)
        exact = {}
        if isinstance(getattr(algo, "entropy_coef", None), float):  # the algo saves it as float32
            exact["entropy_coef"] = repr(algo.entropy_coef)
        rng = {"numpy": json.dumps(self.rng.bit_generator.state), "torch": torch.get_rng_state(),
               "python": json.dumps(random.getstate())}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["torch_cuda"] = torch.cuda.get_rng_state_all()
        return {
            "config": self.cfg.to_json(),
            "spec": json.dumps(self.spec.__dict__),
            "meta": json.dumps(self.meta()),
            "learner": self.learner.state_dict(),
            "exact": json.dumps(exact),
            "buffer": buffer_entry or {},
            "counters": {"env_steps": self.env_steps, "episodes": self.episodes, "next_eval": self.next_eval,
                         "next_ckpt": self.next_ckpt, "wall": self.wall, "stream_total": self.stream_total,
                         "guard_step": g.step, "guard_skipped": g.skipped, "steps_since_update": self.steps_since_update,
                         "best_eval": self.best_eval, "eval_episodes_done": self.eval_episodes_done,
                         "recent_scores": list(self.recent_scores)},
            "last_eval": json.dumps(self.last_eval),
            "rng": rng,
        }

    def check_compatible(self, state: dict) -> None:
        """Refuse a checkpoint of another env, algorithm or config, naming what differs."""
        where = state.get("_path", "?")
        meta = json.loads(state.get("meta", "{}"))
        for key, here in self.meta().items():
            if key in meta and meta[key] != here:
                raise CheckpointError(f"checkpoint {where!r} was trained with {key} {meta[key]!r}, "
                                      f"this run uses {here!r}")
        check_config(state, self.cfg)
        spec = json.loads(state["spec"])
        mine = _jsonable(self.spec.__dict__)
        diff = [f"{k}={spec.get(k)!r} there, {mine.get(k)!r} here" for k in sorted(set(spec) | set(mine))
                if spec.get(k) != mine.get(k)]
        if diff:
            raise CheckpointError(f"checkpoint {where!r} was made for another env spec: " + "; ".join(diff))

    def load_state_dict(self, state: dict) -> None:
        try:
            self.check_compatible(state)
            self.stream_total = load_buffer(self.buffer, state["buffer"], state.get("_path", self.ckpt_dir / "x"))
            self._buffer_entry = state["buffer"] if state["buffer"].get("kind") == "shards" else None
            self.learner.load_state_dict(state["learner"])
            exact = json.loads(state.get("exact", "{}"))
            if "entropy_coef" in exact:
                self.learner.algo.entropy_coef = float(exact["entropy_coef"])
            c = state["counters"]
            self.env_steps, self.episodes = int(c["env_steps"]), int(c["episodes"])
            self.next_eval, self.next_ckpt, self.wall = int(c["next_eval"]), int(c["next_ckpt"]), float(c["wall"])
            self.learner.guard.step = int(c.get("guard_step", 0))
            self.learner.guard.skipped = int(c.get("guard_skipped", 0))
            self.steps_since_update = int(c.get("steps_since_update", 0))
            self.best_eval = float(c.get("best_eval", -math.inf))
            self.eval_episodes_done = int(c.get("eval_episodes_done", 0))
            self.recent_scores = [float(v) for v in c.get("recent_scores", [])]
            self.last_eval = json.loads(state["last_eval"])
            self.rng.bit_generator.state = json.loads(state["rng"]["numpy"])
            torch.set_rng_state(state["rng"]["torch"])
            if "python" in state["rng"]:
                v, internal, gauss = json.loads(state["rng"]["python"])
                random.setstate((v, tuple(internal), gauss))
            if "torch_cuda" in state["rng"] and torch.cuda.is_available():
                cuda = state["rng"]["torch_cuda"]
                if len(cuda) == torch.cuda.device_count():
                    torch.cuda.set_rng_state_all(cuda)
        except CheckpointError:
            raise
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as e:
            raise CheckpointError(f"checkpoint {state.get('_path', '?')!r} does not fit this run "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None

    def save(self) -> Path:
        t0 = time.perf_counter()
        prev = self._buffer_entry
        entry = save_buffer(self.buffer, self.ckpt_dir, self.stream_total, prev)
        path = save_checkpoint(self.state_dict(entry), self.ckpt_dir, self.env_steps, self.cfg.run.keep_checkpoints)
        self._buffer_entry = entry
        self.learner.guard.last_good_checkpoint = str(path)
        shards = json.loads(entry["shards"])
        wrote_shard = shards and (prev is None or int(prev["total"]) < int(entry["total"]))
        new_bytes = path.stat().st_size + ((self.ckpt_dir / "buffer" / shards[-1]).stat().st_size if wrote_shard else 0)
        self.checkpoint_stats.append({"seconds": time.perf_counter() - t0, "bytes": new_bytes})
        return path

    def resume(self, source: str | Path | None = None) -> bool:
        """Restore the newest usable checkpoint of this run (or ``source``); False if there is none.

        A corrupt newest checkpoint is skipped with a warning (and renamed ``*.corrupt``).
        """
        if source is None and not list_checkpoints(self.ckpt_dir):
            return False

        def loader(p: Path) -> dict:
            st = load_checkpoint(p)
            self.load_state_dict(st)
            return st

        state = load_latest(source or self.ckpt_dir, loader, quarantine=source is None)
        self.learner.guard.last_good_checkpoint = state["_path"]
        return True

    # -- loop -------------------------------------------------------------------------------
    def episode_seed(self, k: int) -> int:
        return (self.cfg.run.seed * 7_919 + k) % (2**31 - 1)

    def run(self, resume: bool = False) -> dict[str, Any]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with RunLock(self.run_dir), StopRequest() as self.stop:
            remove_stale_temporaries(self.ckpt_dir)
            resumed = self.resume() if resume else False
            if not resumed:
                refuse_overwrite(self.run_dir)
            atomic_write_text(self.run_dir / "config.json", self.cfg.to_json() + "\n")
            self.logger = RunLogger(self.run_dir, resume_step=self.env_steps)
            # rows a killed run logged after its last checkpoint will be produced again
            self.logger.truncate_after(self.env_steps)
            self.steal = StealMeter()
            try:
                self._loop()
            except DivergenceError as e:
                raise self._divergence_report(e) from None
        summary = {"run_dir": str(self.run_dir), "env_steps": self.env_steps, "episodes": self.episodes,
                   "wall_s": round(self.wall, 1), **{f"eval_{k}": v for k, v in self.last_eval.items()}}
        if self.stop.requested is not None and self.env_steps < self.cfg.run.steps:
            summary["stopped"] = self.stop.requested  # by a signal, with a checkpoint at env_steps
        speed = getattr(self.learner, "speed", None)
        if speed is not None:  # the switches in effect (bf16 falls back to fp32 where it is not native)
            summary["speed"] = speed.describe()
        steal = self.steal.total() if self.steal is not None else None
        if steal is not None:  # this session's part of the run (a resumed run: since the resume)
            summary["cpu_steal"] = round(steal, 4)
        if self.cfg.run.skip_nonfinite:
            summary["nonfinite_skipped"] = self.learner.guard.skipped
        if self.checkpoint_stats:  # this session's checkpoint writes (buffer shard + checkpoint file)
            summary["checkpoint_write_s_max"] = round(max(c["seconds"] for c in self.checkpoint_stats), 3)
            summary["checkpoint_write_mb_last"] = round(self.checkpoint_stats[-1]["bytes"] / 2**20, 2)
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary

    def _loop(self) -> None:
        rc = self.cfg.run
        bar = _progress(rc, self.env_steps)
        try:
            while self.env_steps < rc.steps:
                t0 = time.perf_counter()
                self.learner.policy.eval()
                ep, stats = run_episode(self.env, self.learner.policy, self.episode_seed(self.episodes), False, self.device,
                                        explore=rc.explore)
                self.buffer.add_episode(ep)
                self.stream_total += len(ep["obs"])
                self.env_steps += stats.length
                self.episodes += 1
                row: dict[str, Any] = {"env_steps": self.env_steps, "episode": self.episodes, "return": stats.ret,
                                       "length": stats.length}
                if stats.won is not None:
                    row["won"] = float(stats.won)
                row.update(stats.info)
                t1 = time.perf_counter()
                due = self._updates_due(stats.length)
                for _ in range(due):
                    row.update(self.learner.update(self.buffer, self.rng))
                if due:
                    row["learner/updates"] = self.learner.updates
                if rc.skip_nonfinite:
                    row["guard/skipped"] = self.learner.guard.skipped
                self.wall += time.perf_counter() - t0
                row["time/collect_s"] = t1 - t0
                row["wall_s"] = self.wall
                if self.episodes % rc.log_every == 0:
                    steal = self.steal.lap() if self.steal is not None else None
                    if steal is not None:  # fraction of the CPU's time taken by other VMs since the previous row
                        row["time/cpu_steal"] = steal
                    self.logger.episode(row)
                if self.env_steps >= self.next_eval or self.env_steps >= rc.steps:
                    self.evaluate_now()
                    self.next_eval = (self.env_steps // rc.eval_every + 1) * rc.eval_every
                stopping = self.stop is not None and self.stop.requested is not None  # read once: a late signal waits a round
                if self.env_steps >= self.next_ckpt or self.env_steps >= rc.steps:
                    self.next_ckpt = (self.env_steps // rc.checkpoint_every + 1) * rc.checkpoint_every
                    self.save()  # after next_ckpt moved on: a resume keeps the same schedule
                elif stopping:
                    self.save()  # off the schedule, next_ckpt untouched: a resume continues as if never stopped
                _advance(bar, self.env_steps, row, self.last_eval)
                if stopping:
                    break
        finally:
            if bar is not None:
                bar.close()
            self.logger.close()

    def _updates_due(self, episode_length: int) -> int:
        """Learner updates after the episode just collected: one every ``run.train_every`` episodes,
        or with ``run.train_every_steps > 0`` one per that many env steps (the remainder carries over
        to the next episode, so long and short episodes get the same updates per env step). Nothing
        before the buffer holds ``run.min_buffer`` steps."""
        rc = self.cfg.run
        if len(self.buffer) < rc.min_buffer:
            return 0
        if rc.train_every_steps <= 0:
            return int(self.episodes % rc.train_every == 0)
        self.steps_since_update += episode_length
        n, self.steps_since_update = divmod(self.steps_since_update, rc.train_every_steps)
        return n

    def _divergence_report(self, e: DivergenceError) -> DivergenceError:
        """The guard's line plus where the run stood; also written to ``divergence.json``."""
        msg = f"{e} [run {str(self.run_dir)!r}, env step {self.env_steps}, episode {self.episodes}]"
        report = {"error": str(e), "env_steps": self.env_steps, "episode": self.episodes,
                  "learner_step": self.learner.guard.step,
                  "last_good_checkpoint": self.learner.guard.last_good_checkpoint}
        try:
            atomic_write_text(self.run_dir / "divergence.json", json.dumps(report, indent=2) + "\n")
        except OSError:
            pass
        return DivergenceError(msg)

    def eval_seed(self) -> int:
        """First episode seed of the next evaluation (``run.eval_seeds``): ``fixed`` replays the run's
        block of ``eval_episodes`` seeds every time; ``fresh`` moves on past every seed an earlier
        evaluation of this run played, so no evaluation reuses an episode. Either way offset by
        ``EVAL_SEED_OFFSET`` from the training episodes' seeds (:meth:`episode_seed`, below it for
        run seeds <= 116 and up to 70k episodes)."""
        base = eval_seed_base(self.cfg.run.seed)
        return base if self.cfg.run.eval_seeds == "fixed" else base + self.eval_episodes_done

    def evaluate_now(self) -> dict[str, float]:
        if self.eval_env is None:
            self.eval_env = self.make_env(self.cfg.run.seed + EVAL_SEED_OFFSET)
        # evaluation must not disturb the training RNG streams (exact resume, reproducibility)
        torch_state = torch.get_rng_state()
        torch.manual_seed(self.cfg.run.seed + EVAL_SEED_OFFSET + self.env_steps)
        first = self.eval_seed()
        try:
            res = evaluate(self.eval_env, self.learner.eval_policy, self.cfg.run.eval_episodes,
                           first, self.device, deterministic=self.cfg.run.eval_greedy)
            if self.learner.policy_ema is not None:  # run.policy_ema: the live weights on the same episodes
                torch.manual_seed(self.cfg.run.seed + EVAL_SEED_OFFSET + self.env_steps)
                live = evaluate(self.eval_env, self.learner.policy, self.cfg.run.eval_episodes,
                                first, self.device, deterministic=self.cfg.run.eval_greedy)
                res.update({f"live_{k}": v for k, v in live.items()})
        finally:
            torch.set_rng_state(torch_state)
        self.eval_episodes_done += self.cfg.run.eval_episodes
        self.last_eval = res
        self.logger.evaluation(self.env_steps, self.wall, res)
        window = self.cfg.run.best_window
        self.recent_scores = (self.recent_scores + [eval_score(res)])[-window:]
        full = len(self.recent_scores) == window
        score = best_rank(self.recent_scores)
        # until run.best_window evaluations exist best.pt follows the newest one (best_eval stays -inf),
        # so one early lucky reading cannot outrank every later window
        if self.cfg.run.keep_best and (not full or score > self.best_eval):
            self.best_eval = score if full else -math.inf
            save_best(self.state_dict(), self.run_dir)
        return res


def eval_score(res: dict[str, float]) -> float:
    """What ``run.keep_best`` ranks evaluations by: the win rate where the env reports one, else the return."""
    v = res.get("win_rate", res.get("return", -math.inf))
    return float(v) if math.isfinite(float(v)) else -math.inf


def best_rank(recent: list[float]) -> float:
    """What ``best.pt`` is ranked by: the mean of the newest ``run.best_window`` evaluation scores
    (:func:`eval_score`); -inf while any of them is."""
    return -math.inf if not recent or not all(map(math.isfinite, recent)) else sum(recent) / len(recent)


def check_config(state: dict, cfg: Config) -> None:
    """Refuse a checkpoint whose config differs from ``cfg`` beyond the keys a resume may change."""
    from mabl.config import RESUME_STRICT_RUN

    try:
        saved = json.loads(state["config"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise CheckpointError(f"checkpoint {state.get('_path', '?')!r} lacks a valid config") from None
    diff = config_differences(saved, cfg)
    if diff:
        shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
        raise CheckpointError(f"checkpoint {state.get('_path', '?')!r} was made with a different config: {shown} "
                              f"(a resume keeps model.*, ppo.* and {', '.join(sorted(RESUME_STRICT_RUN))}); "
                              "use another --run-dir for a new run")


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d))


def _progress(rc, start: int):
    if not rc.progress:
        return None
    from tqdm import tqdm

    bar = tqdm(total=rc.steps, initial=start, unit="step", dynamic_ncols=True, smoothing=0.05)
    bar.recent = collections.deque(maxlen=20)  # the last 20 training episodes
    return bar


def _advance(bar, env_steps: int, row: dict, last_eval: dict) -> None:
    """Progress bar: env steps, ETA (tqdm), recent training return / win rate (last 20 episodes), last eval."""
    if bar is None:
        return
    bar.update(env_steps - bar.n)
    bar.recent.append(row)
    post = {"ret": f"{np.mean([r['return'] for r in bar.recent]):.2f}"}
    if "won" in row:
        post["win"] = f"{np.mean([r.get('won', 0.0) for r in bar.recent]):.2f}"
    if "win_rate" in last_eval:
        post["eval_win"] = f"{last_eval['win_rate']:.2f}"
    elif "return" in last_eval:
        post["eval_ret"] = f"{last_eval['return']:.2f}"
    if "time/update_s" in row:
        post["upd_s"] = f"{row['time/update_s']:.1f}"
    bar.set_postfix(post, refresh=False)


def registry_env_factory(cfg: Config) -> Callable[[int], MultiAgentEnv]:
    from mabl.envs import make_env as registry_make

    name, options = cfg.run.env, dict(cfg.run.env_options)

    def make(seed: int) -> MultiAgentEnv:
        try:
            return registry_make(name, seed=seed, **options)
        except TypeError as e:
            if "argument" not in str(e):
                raise
            raise ConfigError(f"bad run.env_options {options!r} for {name}: {e}") from None

    return make


def check_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {str(run_dir)!r} exists and is not a directory")
    ck = run_dir / "checkpoints"
    if ck.exists() and not ck.is_dir():
        raise ConfigError(f"{str(ck)!r} exists and is not a directory")


def newest_readable_checkpoint(run_dir: Path) -> dict | None:
    """The small parts of the newest checkpoint that opens (no tensors read), or None."""
    for cand in reversed(checkpoint_candidates(run_dir)):
        try:
            return peek_checkpoint(cand)
        except CorruptCheckpointError:
            continue
    return None


def train(cfg: Config, make_env: Callable[[int], MultiAgentEnv] | None = None,
          make_learner: Callable[..., MABLLearner] | None = None, run_dir: str | Path | None = None,
          resume: bool | None = None) -> dict[str, Any]:
    """Train per ``cfg``; ``make_env(seed)`` defaults to the registry entry for ``cfg.run.env``.

    ``resume``: None (default) continues the run directory's newest checkpoint when there is
    one and starts fresh otherwise; True is the same but says so when there is nothing to
    continue; False refuses a directory that already holds checkpoints. A checkpoint whose
    config differs (beyond ``run.steps`` and the like) is refused, naming the keys.
    """
    rd = resolve_run_dir(cfg, run_dir)
    check_run_dir(rd)
    if make_env is None:
        check_env_name(cfg.run.env)
        make_env = registry_env_factory(cfg)
    resolve_device(cfg.run.device)  # `--device cuda` without CUDA fails before anything is built
    has = bool(list_checkpoints(rd / "checkpoints"))
    if has and resume is False:
        refuse_overwrite(rd)
    if has:
        peek = newest_readable_checkpoint(rd)
        if peek is not None:  # fail before building anything (env JIT, networks)
            check_config(peek, cfg)
    elif resume:
        warn(f"no checkpoint in {str(rd)!r} yet; starting from step 0")
    return Trainer(cfg, make_env, make_learner, rd).run(resume=has)


def load_for_eval(path: str | Path, device: str = "cpu") -> tuple[Config, MABLLearner, dict]:
    """Rebuild the learner of a checkpoint (config and spec from the checkpoint itself).

    A run directory whose newest checkpoint is corrupt falls back to the previous one.
    """
    state = load_latest(path)
    try:
        cfg = config_from_dict(json.loads(state["config"]))
        from mabl.envs.base import EnvSpec

        spec = EnvSpec(**json.loads(state["spec"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {state['_path']!r} lacks a valid config/spec ({e})") from None
    learner = MABLLearner(spec, cfg, resolve_device(device))
    try:
        learner.load_state_dict(state["learner"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {state['_path']!r} has weights that do not fit its config "
                              f"({str(e).splitlines()[0][:200]})") from None
    return cfg, learner, state


AVERAGE_PARTS = ("policy", "actor")


def average_policy(learners: list[MABLLearner], part: str = "policy") -> MABLLearner:
    """Stochastic weight averaging (Izmailov et al., 2018) of a run's decentralized policy.

    The first learner's ``part`` parameters become the uniform mean of that part over all
    ``learners`` (checkpoints of one run); everything else stays the first learner's. ``part``:
    ``"policy"`` = every module of :class:`mabl.agent.DecentralizedPolicy` (observation encoder,
    agent recurrent model, agent posterior, actor), the networks that act at run time;
    ``"actor"`` = the actor alone, on the first learner's encoder and posterior.
    Returns the first learner, changed in place.
    """
    if not learners:
        raise ConfigError("no checkpoints to average")
    return set_policy_average(learners[0], [list(ln.policy.parameters()) for ln in learners], part)


@torch.no_grad()
def set_policy_average(host: MABLLearner, weights: list[list[torch.Tensor]], part: str = "policy") -> MABLLearner:
    """``host``'s acting networks from ``weights``, one ``policy.parameters()`` list per checkpoint, newest
    first: the ``part`` parameters (see :func:`average_policy`) their uniform mean, the others the newest's."""
    if part not in AVERAGE_PARTS:
        raise ConfigError(f"unknown part to average {part!r}; accepted: {', '.join(AVERAGE_PARTS)}")
    actor = {id(p) for p in host.algo.actor.parameters()}
    for i, p in enumerate(host.policy.parameters()):
        if part == "policy" or id(p) in actor:
            value = sum(w[i].double() for w in weights) / len(weights)
        else:
            value = weights[0][i]
        p.copy_(value.to(p.dtype))
    return host


def load_averaged(path: str | Path, last: int, device: str = "cpu", part: str = "policy",
                  upto: int | None = None) -> tuple[Config, MABLLearner, dict, list[int]]:
    """A run's ``last`` newest checkpoints (those at or below ``upto`` env steps when given), their
    policies averaged by :func:`average_policy`. Returns ``(cfg, learner, newest state, env steps of
    the checkpoints averaged)``. The checkpoints must come from one run (same config beyond the keys
    a resume may change); an unreadable one is skipped with a warning."""
    if isinstance(last, bool) or not isinstance(last, int) or last < 1:
        raise ConfigError(f"the number of checkpoints to average must be an int >= 1, got {last!r}")
    cands = checkpoint_candidates(path)
    if not cands:
        raise CheckpointError(f"no checkpoints to average in {str(path)!r} (a run directory or its checkpoints/)")
    if upto is not None:
        cands = [c for c in cands if int(c.stem.split("_")[1]) <= upto]
        if not cands:
            raise CheckpointError(f"no checkpoint at or below {upto} env steps in {str(path)!r}")
    loaded: list[tuple[Config, MABLLearner, dict]] = []
    for cand in reversed(cands):
        if len(loaded) == last:
            break
        try:
            loaded.append(load_for_eval(cand, device))
        except CorruptCheckpointError as e:
            warn(f"{e}; not averaged")
    if not loaded:
        raise CheckpointError(f"no readable checkpoint to average in {str(path)!r}")
    if len(loaded) < last:
        warn(f"{str(path)!r} holds {len(loaded)} readable checkpoint(s), fewer than the {last} asked; averaging those")
    cfg, _, newest = loaded[0]
    for _, _, st in loaded[1:]:
        check_config(st, cfg)
    learner = average_policy([ln for _, ln, _ in loaded], part)
    return cfg, learner, newest, [int(st["counters"]["env_steps"]) for _, _, st in loaded]
