"""The one environment protocol every suite adapter implements.

An adapter turns a multi-agent environment into :class:`MultiAgentEnv`:
fixed-size per-agent observations, one global state, per-step action masks,
a per-agent reward vector, and a clean split between *termination* (the task
ended: a win, a loss, every train arrived) and *truncation* (the time limit).
The learner never sees anything suite-specific beyond :class:`EnvSpec`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class EnvSpec:
    """Static description of a multi-agent task.

    Attributes:
        name: canonical ``suite:task`` name, e.g. ``smax:3m``.
        n_agents: number of learning agents (fixed for the task).
        obs_dim: size of each agent's (padded) observation vector.
        state_dim: size of the global state vector (training-time only).
        action_dim: number of discrete actions, or the size of a continuous action.
        discrete: True for ``Discrete(action_dim)`` actions, False for boxes in [-1, 1].
        has_action_mask: whether the environment restricts actions per step.
        episode_limit: maximum number of steps before truncation.
        has_win: whether episodes end with a win/loss flag (SMAC-like tasks).
        action_dims: continuous tasks whose agents drive different numbers of actuators: agent i's
            action is the first ``action_dims[i]`` of ``action_dim`` values, the rest is padding
            that the actor never samples (always 0) and that adds nothing to log-probabilities or
            entropy. ``None``: every agent uses all ``action_dim``.
    """

    name: str
    n_agents: int
    obs_dim: int
    state_dim: int
    action_dim: int
    discrete: bool = True
    has_action_mask: bool = False
    episode_limit: int = 1000
    has_win: bool = False
    action_dims: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.action_dims is not None:  # e.g. a list read back from a checkpoint's JSON
            object.__setattr__(self, "action_dims", tuple(int(k) for k in self.action_dims))

    def action_dim_mask(self) -> np.ndarray | None:
        """``[n_agents, action_dim]`` bool, True on the action dimensions agent i drives; ``None``
        when every agent drives all of them."""
        if self.action_dims is None:
            return None
        return np.arange(self.action_dim)[None, :] < np.asarray(self.action_dims)[:, None]


@dataclass
class TimeStep:
    """What the environment returns after ``reset`` or ``step``.

    Shapes: obs ``[n_agents, obs_dim]`` float32, state ``[state_dim]`` float32,
    avail ``[n_agents, action_dim]`` bool (all True for tasks without masks or with
    continuous actions), reward ``[n_agents]`` float32 (reward for the transition
    that led here; zeros after reset). ``info`` may hold ``won`` (bool) and any
    suite metric (e.g. ``arrived_fraction``) reported at the end of an episode.
    """

    obs: np.ndarray
    state: np.ndarray
    avail: np.ndarray
    reward: np.ndarray
    terminated: bool = False
    truncated: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return bool(self.terminated or self.truncated)


@runtime_checkable
class MultiAgentEnv(Protocol):
    """A cooperative multi-agent environment seen through :class:`EnvSpec`.

    ``step`` takes ``int64 [n_agents]`` actions for discrete tasks and
    ``float32 [n_agents, action_dim]`` in [-1, 1] for continuous ones.
    ``reset(seed)`` with the same seed must give the same episode under the same actions.
    """

    spec: EnvSpec

    def reset(self, seed: int | None = None) -> TimeStep: ...

    def step(self, actions: np.ndarray) -> TimeStep: ...

    def close(self) -> None: ...


class MissingDependencyError(ImportError):
    """An optional suite is used without its package installed."""

    def __init__(self, suite: str, package: str, extra: str):
        super().__init__(
            f"environment suite '{suite}' needs the package '{package}': "
            f"install it with  pip install 'mabl[{extra}]'  (or pip install {package})"
        )
