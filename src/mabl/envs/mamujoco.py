"""Multi-agent MuJoCo (Gymnasium-Robotics ``mamujoco_v1``) behind :class:`mabl.envs.MultiAgentEnv`.

Tasks (:data:`TASKS`): ``Humanoid-9|8`` and ``HumanoidStandup-9|8``, each
``gymnasium_robotics.mamujoco_v1.parallel_env(scenario, "9|8", agent_obsk=1)`` on top of
Gymnasium's ``Humanoid-v5`` / ``HumanoidStandup-v5`` with their default settings. ``9|8`` is the
only two-agent split of the humanoid: agent 0 drives 9 actuators, agent 1 drives 8.

Per step the adapter returns

* ``obs`` float32 ``[2, 244]``: each agent's MaMuJoCo observation (agent 0: 242 values, agent 1:
  170) zero-padded to 242, then a one-hot agent id (2 values). Raw MuJoCo quantities, not
  normalised.
* ``state`` float32 ``[348]``: ``env.state()``, the single-agent Gymnasium observation.
* ``avail`` bool ``[2, 9]``: all True (continuous actions).
* ``reward`` float32 ``[2]``: the team reward (the single-agent Gymnasium reward) for both agents.

Actions: float32 ``[2, 9]`` in [-1, 1] (values outside are clipped), rescaled linearly to each
agent's action-space bounds (``[-0.4, 0.4]`` for every humanoid actuator). Agent 1 has 8
actuators and ignores the last column of its row.

Episodes: ``terminated`` when Gymnasium says the robot is unhealthy (Humanoid: torso height
outside (1.0, 2.0); HumanoidStandup never terminates), ``truncated`` at 1000 steps (Gymnasium's
``TimeLimit``, the paper's limit). Should both happen on step 1000, it counts as terminated.

Seeding: ``reset(seed)`` seeds the MuJoCo reset noise (same seed + same actions -> same
episode); ``reset()`` draws the next seed from the adapter's generator, which
``make(task, seed)`` starts.

Importing ``gymnasium_robotics`` prints a warning about the Adroit hand environments' rewards,
which have nothing to do with MaMuJoCo; the adapter drops that one notification before importing.

Speed (one process, 2-core CPU machine shared with other jobs, random actions, resets included):
``Humanoid-9|8`` ~1,500-2,200 steps/s (random humanoids fall after ~25 steps, so many resets),
``HumanoidStandup-9|8`` ~1,150-1,500 steps/s (:data:`MEASURED_STEPS_PER_SECOND`).
"""
from __future__ import annotations

import numpy as np

from mabl.envs.base import EnvSpec, MissingDependencyError, TimeStep
from mabl.errors import ConfigError, one_of

# task -> (Gymnasium scenario, agent split)
TASK_PARAMS: dict[str, tuple[str, str]] = {
    "Humanoid-9|8": ("Humanoid", "9|8"),
    "HumanoidStandup-9|8": ("HumanoidStandup", "9|8"),
}
TASKS: tuple[str, ...] = tuple(TASK_PARAMS)
AGENT_OBSK = 1
EPISODE_LIMIT = 1000
OPTIONS: tuple[str, ...] = ()

MEASURED_STEPS_PER_SECOND = {"Humanoid-9|8": 1800, "HumanoidStandup-9|8": 1300}


def _silence_adroit_notice() -> None:
    """Drop Farama's Adroit-reward notice, which ``import gymnasium_robotics`` prints to stderr."""
    try:
        import farama_notifications
    except ImportError:
        return
    notes = farama_notifications.notifications.get("gymnasium_robotics")
    if isinstance(notes, dict):
        for version, msg in list(notes.items()):
            if isinstance(msg, str) and "Adroit" in msg:
                del notes[version]


def _import_mamujoco():
    try:
        _silence_adroit_notice()
        from gymnasium_robotics import mamujoco_v1
    except ImportError as e:
        raise MissingDependencyError("mamujoco", "gymnasium-robotics", "mamujoco") from e
    return mamujoco_v1


class MaMuJoCoEnv:
    """One MaMuJoCo humanoid task; see the module docstring for the conventions."""

    def __init__(self, task: str, seed: int = 0):
        if task not in TASK_PARAMS:
            raise one_of("mamujoco task", task, TASKS)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ConfigError(f"seed must be an int, got {seed!r}")
        mamujoco_v1 = _import_mamujoco()
        scenario, conf = TASK_PARAMS[task]
        self._env = mamujoco_v1.parallel_env(scenario, conf, agent_obsk=AGENT_OBSK)
        self.task = task
        self.agents = list(self._env.possible_agents)
        n = len(self.agents)
        self._obs_sizes = [int(self._env.observation_space(a).shape[0]) for a in self.agents]
        self._act_sizes = [int(self._env.action_space(a).shape[0]) for a in self.agents]
        self._low = [np.asarray(self._env.action_space(a).low, dtype=np.float64) for a in self.agents]
        self._high = [np.asarray(self._env.action_space(a).high, dtype=np.float64) for a in self.agents]
        self._pad = max(self._obs_sizes)
        state_dim = int(np.asarray(self._env.state()).shape[0])
        self.spec = EnvSpec(
            name=f"mamujoco:{task}",
            n_agents=n,
            obs_dim=self._pad + n,
            state_dim=state_dim,
            action_dim=max(self._act_sizes),
            discrete=False,
            has_action_mask=False,
            episode_limit=EPISODE_LIMIT,
            has_win=False,
        )
        self._seeds = np.random.default_rng(int(seed))
        self._avail = np.ones((n, self.spec.action_dim), dtype=bool)
        self._done = True

    def _timestep(self, obs: dict, reward: float, terminated: bool, truncated: bool) -> TimeStep:
        n = self.spec.n_agents
        out = np.zeros((n, self.spec.obs_dim), dtype=np.float32)
        for i, a in enumerate(self.agents):
            out[i, : self._obs_sizes[i]] = obs[a]
            out[i, self._pad + i] = 1.0
        return TimeStep(
            obs=out,
            state=np.asarray(self._env.state(), dtype=np.float32),
            avail=self._avail.copy(),
            reward=np.full(n, reward, dtype=np.float32),
            terminated=terminated,
            truncated=truncated,
            info={},
        )

    def reset(self, seed: int | None = None) -> TimeStep:
        if seed is None:
            seed = int(self._seeds.integers(0, 2**31 - 1))
        elif isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ConfigError(f"seed must be an int, got {seed!r}")
        obs, _ = self._env.reset(seed=int(seed))
        self._done = False
        return self._timestep(obs, 0.0, False, False)

    def step(self, actions: np.ndarray) -> TimeStep:
        if self._done:
            raise RuntimeError(f"{self.spec.name}: step() called without an episode in progress; call reset()")
        acts = np.asarray(actions, dtype=np.float64)
        if acts.shape != (self.spec.n_agents, self.spec.action_dim):
            raise ValueError(
                f"{self.spec.name}: actions must have shape ({self.spec.n_agents}, {self.spec.action_dim}), got {acts.shape}"
            )
        if not np.isfinite(acts).all():
            raise ValueError(f"{self.spec.name}: actions must be finite")
        acts = np.clip(acts, -1.0, 1.0)
        act_dict = {}
        for i, a in enumerate(self.agents):
            k = self._act_sizes[i]
            lo, hi = self._low[i], self._high[i]
            act_dict[a] = (lo + (acts[i, :k] + 1.0) * 0.5 * (hi - lo)).astype(np.float32)
        obs, rewards, terms, truncs, _ = self._env.step(act_dict)
        a0 = self.agents[0]
        terminated = bool(terms[a0])
        truncated = bool(truncs[a0]) and not terminated
        self._done = terminated or truncated
        return self._timestep(obs, float(rewards[a0]), terminated, truncated)

    def close(self) -> None:
        self._done = True
        self._env.close()


def make(task: str, seed: int = 0, **options) -> MaMuJoCoEnv:
    """Build the MaMuJoCo adapter for ``task``; there are no options."""
    for name in options:
        raise ConfigError(f"unknown mamujoco option {name!r}; accepted: none")
    return MaMuJoCoEnv(task, seed=seed)


__all__ = ["TASKS", "TASK_PARAMS", "OPTIONS", "EPISODE_LIMIT", "MaMuJoCoEnv", "make"]
