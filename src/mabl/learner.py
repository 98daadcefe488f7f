"""The MABL learner: world model + pluggable MARL algorithm (Algorithm 1, lines 5-14).

``update(buffer)`` is the post-episode work: ``model.train_steps`` world-model updates on
sampled sequences, then the model is frozen and the algorithm runs ``ppo.updates`` rounds
of imagination + policy optimisation from posterior states of freshly sampled sequences.
"""
from __future__ import annotations

import contextlib
import copy
import time
from typing import Callable

import numpy as np
import torch

from mabl.agent import DecentralizedPolicy
from mabl.buffer import ReplayBuffer
from mabl.config import Config
from mabl.envs.base import EnvSpec
from mabl.errors import DivergenceError
from mabl.fast import Speed, clip_grad_norm, fused_adam, sync, tune_malloc
from mabl.mappo import MAPPO
from mabl.world_model import BiLevelWorldModel


def resolve_device(name: str) -> torch.device:
    from mabl.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available here; accepted: auto, cpu")
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise ConfigError(f"bad device {name!r}; accepted: auto, cpu, cuda, cuda:N") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) here")
        return dev
    raise ConfigError(f"bad device {name!r}; accepted: auto, cpu, cuda, cuda:N")


class NonFiniteGuard:
    """Checks every loss and gradient norm; stops with a report or skips the batch."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.skipped = 0
        self.step = 0
        self.last_good_checkpoint: str | None = None

    def __call__(self, name: str, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        if torch.isfinite(loss) and torch.isfinite(grad_norm):
            return True
        what = "loss" if not torch.isfinite(loss) else "gradient"
        if self.skip:
            self.skipped += 1
            return False
        raise DivergenceError(
            f"non-finite {what} in {name} at learner step {self.step} (loss={float(loss)}, grad_norm={float(grad_norm)}); "
            f"last good checkpoint: {self.last_good_checkpoint or 'none'}; rerun with --set run.skip_nonfinite=true to skip such batches"
        )


class MABLLearner:
    def __init__(self, spec: EnvSpec, cfg: Config, device: torch.device | str = "cpu",
                 make_algorithm: Callable | None = None):
        self.spec, self.cfg = spec, cfg
        self.device = torch.device(device)
        self.speed = Speed.from_run(cfg.run, self.device)  # bf16 only where it is native
        if self.speed.tune_malloc:
            tune_malloc()
        self.model = BiLevelWorldModel(spec, cfg.model, speed=self.speed).to(self.device)
        self.model_opt = fused_adam(self.model.parameters(), cfg.model.lr, self.speed.fused_adam)
        self.algo = (make_algorithm or MAPPO)(spec, self.model, cfg.ppo).to(self.device)
        self.policy = DecentralizedPolicy(self.model, self.algo.actor)
        # run.policy_ema: an averaged copy of the acting networks (own parameters, never trained)
        self.policy_ema: DecentralizedPolicy | None = None
        self.ema_updates = 0
        if cfg.run.policy_ema > 0:
            self.policy_ema = copy.deepcopy(self.policy).requires_grad_(False)
        self.guard = NonFiniteGuard(cfg.run.skip_nonfinite)
        self.updates = 0
        self.timings: dict[str, float] = {}

    # autocast: bf16 matmuls with fp32 master weights (CPU AMX / CUDA tensor cores)
    def autocast(self):
        if not self.speed.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def train_model_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.model.train()
        if self.model.obs_norm is not None:  # model.obs_norm: the running statistics see every replayed batch
            self.model.obs_norm.update(batch["obs"])
        if self.model.state_norm is not None:  # model.state_norm: likewise for s_t
            self.model.state_norm.update(batch["state"])
        with self.autocast():
            loss, metrics, _ = self.model.loss(batch)
        self.model_opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.speed.fused_adam:
            norm = clip_grad_norm(self.model.parameters(), self.cfg.model.grad_clip, foreach=True)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.model.grad_clip)
        self.guard.step += 1
        if self.guard("world_model_loss", loss.detach(), norm):
            self.model_opt.step()
        else:
            self.model_opt.zero_grad(set_to_none=True)
        out = {f"model/{k}": float(v) for k, v in metrics.items()}
        out["model/loss"] = float(loss.detach())
        out["model/grad_norm"] = float(norm)
        return out

    @torch.no_grad()
    def starts(self, batch: dict[str, torch.Tensor], return_posterior: bool = False):
        """Imagination starts ``[M, N, ...]``: the posterior states of every non-terminal step of the
        sampled sequences. A terminal step (``cont == 0``) has no future: the model never saw a
        transition out of one, so a rollout from it would be invented (DreamerV3 zero-weights them).
        With ``return_posterior``: ``(starts, post)``, post the ``[T, B, ...]`` posterior states."""
        with self.autocast():
            post, _, _ = self.model.observe(batch["obs"], batch["state"], batch["prev_action"], batch["is_first"])
        keep = batch["cont"].flatten(0, 1) > 0
        starts = post.map(lambda x: x.flatten(0, 1)[keep])
        return (starts, post) if return_posterior else starts

    def update(self, buffer: ReplayBuffer, rng: np.random.Generator) -> dict[str, float]:
        """All post-episode learning (Algorithm 1, lines 5-14).

        Returns the last model step's and round's metrics plus ``time/model_s`` (world-model steps),
        ``time/imagine_s`` (imagination starts + rollouts), ``time/policy_s`` (values, GAE, PPO
        epochs) and ``time/update_s`` (their sum). The speed switches are ``cfg.run`` flags
        (:mod:`mabl.fast`)."""
        mc, pc = self.cfg.model, self.cfg.ppo
        metrics: dict[str, float] = {}
        t0 = time.perf_counter()
        for _ in range(mc.train_steps):
            batch = buffer.sample(mc.batch_size, mc.seq_len, rng, self.device, mc.recent_fraction, mc.recent_window)
            m = self.train_model_step(batch)
        metrics.update(m)
        sync(self.device)
        t1 = time.perf_counter()
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        try:
            t_imag = 0.0
            for _ in range(pc.updates):
                ts = time.perf_counter()
                batch = buffer.sample(pc.imagine_batch, pc.imagine_seq_len, rng, self.device, mc.recent_fraction,
                                      mc.recent_window)
                if pc.self_imitation > 0 or pc.real_value > 0:  # the replayed sequences go along (MAPPO.train_round's ``real``)
                    starts, post = self.starts(batch, return_posterior=True)
                    extra = {"real": (post, batch)}
                else:
                    starts, extra = self.starts(batch), {}
                sync(self.device)
                t_imag += time.perf_counter() - ts
                a = self.algo.train_round(self.model, starts, self.autocast, self.guard, **extra)
                t_imag += float(getattr(self.algo, "timings", {}).get("imagine_s", 0.0))
            metrics.update({f"policy/{k}": v for k, v in a.items()})
        finally:
            for p in self.model.parameters():
                p.requires_grad_(True)
        sync(self.device)
        t2 = time.perf_counter()
        self.updates += 1
        self.update_policy_ema()
        # model_s: world-model steps; imagine_s: imagination starts + rollouts; policy_s: the rest
        # (values, GAE, PPO epochs); update_s = model_s + imagine_s + policy_s
        self.timings = {"model_s": t1 - t0, "imagine_s": t_imag, "policy_s": t2 - t1 - t_imag, "update_s": t2 - t0}
        metrics.update({f"time/{k}": v for k, v in self.timings.items()})
        return metrics

    @property
    def eval_policy(self) -> DecentralizedPolicy:
        """The policy a run evaluates and reports: the weight average with ``run.policy_ema``, else the live one."""
        return self.policy_ema if self.policy_ema is not None else self.policy

    @torch.no_grad()
    def update_policy_ema(self) -> None:
        """ema <- decay * ema + (1 - decay) * live, decay = min(run.policy_ema, (1 + n) / (10 + n)) at the n-th call."""
        if self.policy_ema is None:
            return
        n = self.ema_updates
        decay = min(self.cfg.run.policy_ema, (1 + n) / (10 + n))
        torch._foreach_lerp_(list(self.policy_ema.parameters()), list(self.policy.parameters()), 1.0 - decay)
        self.ema_updates += 1

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict(), "model_opt": self.model_opt.state_dict(),
                 "algo": self.algo.state_dict(), "updates": torch.tensor(self.updates)}
        if self.policy_ema is not None:
            state["policy_ema"] = self.policy_ema.state_dict()
            state["ema_updates"] = torch.tensor(self.ema_updates)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.model_opt.load_state_dict(state["model_opt"])
        self.algo.load_state_dict(state["algo"])
        self.updates = int(state["updates"])
        if self.policy_ema is not None:
            if "policy_ema" not in state:
                raise KeyError("policy_ema (run.policy_ema is set but the checkpoint holds no averaged policy)")
            self.policy_ema.load_state_dict(state["policy_ema"])
            self.ema_updates = int(state["ema_updates"])
