"""The model buffer D of Algorithm 1: a ring of env steps, sampled as fixed-length sequences.

Each stored step t holds o_t (all agents), s_t, the previous joint action a_{t-1}, the reward
for arriving at t, cont_t (0 if t is terminal, 1 otherwise - a time-limit truncation is not
terminal), the action masks at t and is_first_t. Sequences may cross episode boundaries: the
model resets its carry where ``is_first`` is set, so every sampled step is real data.
"""
from __future__ import annotations

import numpy as np
import torch

from mabl.envs.base import EnvSpec

FIELDS = ("obs", "state", "prev_action", "reward", "cont", "avail", "is_first")


class ReplayBuffer:
    def __init__(self, spec: EnvSpec, capacity: int):
        self.spec, self.capacity = spec, int(capacity)
        n, a = spec.n_agents, spec.action_dim
        c = self.capacity
        # np.zeros is lazily backed: memory is touched only as the buffer fills
        self.data = {
            "obs": np.zeros((c, n, spec.obs_dim), np.float32),
            "state": np.zeros((c, spec.state_dim), np.float32),
            "prev_action": np.zeros((c, n, a), np.float32),
            "reward": np.zeros((c, n), np.float32),
            "cont": np.zeros((c,), np.float32),
            "avail": np.zeros((c, n, a), np.bool_),
            "is_first": np.zeros((c,), np.bool_),
        }
        self.ptr = 0
        self.size = 0
        self.episodes = 0

    def __len__(self) -> int:
        return self.size

    def add_episode(self, ep: dict[str, np.ndarray]) -> None:
        """Append one episode (arrays with a leading time axis, as made by the collector)."""
        T = len(ep["obs"])
        for k in FIELDS:
            assert len(ep[k]) == T, f"field {k} has length {len(ep[k])}, expected {T}"
        idx = (self.ptr + np.arange(T)) % self.capacity
        for k in FIELDS:
            self.data[k][idx] = ep[k]
        self.ptr = int((self.ptr + T) % self.capacity)
        self.size = int(min(self.size + T, self.capacity))
        self.episodes += 1

    def sample(self, batch: int, length: int, rng: np.random.Generator, device="cpu", recent: float = 0.0,
               window: int = 0) -> dict[str, torch.Tensor]:
        """``batch`` sequences of ``length`` consecutive steps, time-major ``[T, B, ...]`` tensors.

        Starts are uniform over the stored steps; with ``recent > 0`` a fraction ``recent`` of the
        sequences (rounded) starts uniformly within the newest ``window`` steps instead (a uniform +
        recency mixture, as DreamerV3's replay ``fracs``), so fresh data from the current policy
        is not drowned by the early episodes that a uniform draw over a large buffer favours."""
        length = min(length, self.size)
        # logical positions: 0 = oldest stored step; a sequence never straddles the write pointer
        hi = self.size - length + 1
        n_recent = int(round(batch * recent)) if recent > 0 else 0
        lo_recent = max(0, self.size - max(int(window), length))
        logical = np.concatenate([rng.integers(0, hi, size=batch - n_recent),
                                  rng.integers(lo_recent, hi, size=n_recent)])
        oldest = 0 if self.size < self.capacity else self.ptr
        starts = (oldest + logical) % self.capacity
        idx = (starts[None, :] + np.arange(length)[:, None]) % self.capacity  # [T, B]
        out = {k: torch.from_numpy(self.data[k][idx]) for k in FIELDS}
        out["is_first"][0] = True  # a sequence starts with an empty carry
        out["prev_action"][0] = 0.0
        return {k: v.to(device) for k, v in out.items()}

    # -- checkpointing --------------------------------------------------------------------
    def state_dict(self) -> dict:
        n = self.size
        order = (self.ptr - n + np.arange(n)) % self.capacity  # oldest first
        out = {k: torch.from_numpy(np.ascontiguousarray(v[order])) for k, v in self.data.items()}
        out["episodes"] = torch.tensor(self.episodes)
        return out

    def load_state_dict(self, state: dict) -> None:
        n = len(state["obs"])
        if n > self.capacity:
            raise ValueError(f"buffer in checkpoint holds {n} steps, more than capacity {self.capacity}")
        for k in FIELDS:
            self.data[k][:n] = state[k].numpy()
        self.size = n
        self.ptr = n % self.capacity
        self.episodes = int(state["episodes"])
