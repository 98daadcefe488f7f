"""Multi-agent MuJoCo (Gymnasium-Robotics ``mamujoco_v1``) behind :class:`mabl.envs.MultiAgentEnv`.

Tasks (:data:`TASKS`): ``Humanoid-9|8`` and ``HumanoidStandup-9|8``, each
``gymnasium_robotics.mamujoco_v1.parallel_env(scenario, "9|8", agent_obsk=1)`` on top of
Gymnasium's ``Humanoid-v5`` / ``HumanoidStandup-v5`` with their default settings. ``9|8`` is the
only two-agent split of the humanoid: agent 0 drives 9 actuators, agent 1 drives 8.

Per step the adapter returns

* ``obs`` float32 ``[2, 244]``: each agent's MaMuJoCo observation (agent 0: 242 values, agent 1:
  170), normalised (see below), zero-padded to 242, then a one-hot agent id (2 values).
* ``state`` float32 ``[348]``: ``env.state()``, the single-agent Gymnasium observation, normalised
  the same way.
* ``avail`` bool ``[2, 9]``: which action dimensions the agent drives (agent 1's ninth is padding:
  ``EnvSpec.action_dims = (9, 8)``; the actor never samples it).
* ``reward`` float32 ``[2]``: the team reward (the single-agent Gymnasium reward) times
  ``reward_scale``, the same for both agents.

Observation normalisation (option ``obs_norm``). The raw humanoid observations mix positions
(~0.1-1) with velocities, inertias and contact forces (``cfrc_ext``) that reach a few thousand
(random actions: 99th percentile of ``|obs|`` 37 for Humanoid, 74 for HumanoidStandup, maximum
~3,000); the world model encodes them with an un-normalised MLP and decodes them with an MSE
loss, which such values would dominate. Gymnasium declares the observation space unbounded, so
no scale can be read off the env spec, and running statistics would make an agent's input depend
on what other agents and other episodes saw. The adapter therefore applies one fixed elementwise
function to every observation and state value:

* ``"symlog"`` (default): ``sign(x) * log(1 + |x|)`` (as in DreamerV3): the identity near 0,
  logarithmic for large values, invertible, no constants. Under random actions the result stays
  within about +-8 with a standard deviation of ~0.9. Each agent's normalised observation is a
  function of its own raw observation only, so decentralised execution is unaffected.
* ``"none"``: the raw MuJoCo quantities.

Padding zeros and the agent-id one-hot are not transformed.

Reward scale (option ``reward_scale``, a positive float). The default (:data:`REWARD_SCALE`)
brings a typical per-step reward to O(1) so that the world model's unit-variance reward head and
the critic's value targets stay small: 0.1 for Humanoid (raw ~5 per step, mostly the healthy
reward) and 0.01 for HumanoidStandup (raw ~30 per step). ``info["raw_return"]`` always holds the
episode's unscaled team return so far (the number papers report), so evaluations show both.

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
OPTIONS: tuple[str, ...] = ("obs_norm", "reward_scale")
OBS_NORMS: tuple[str, ...] = ("symlog", "none")
# default reward_scale per task: a typical per-step reward becomes O(1) (see module docstring)
REWARD_SCALE: dict[str, float] = {"Humanoid-9|8": 0.1, "HumanoidStandup-9|8": 0.01}

MEASURED_STEPS_PER_SECOND = {"Humanoid-9|8": 1800, "HumanoidStandup-9|8": 1300}


def symlog(x: np.ndarray) -> np.ndarray:
    """``sign(x) * log(1 + |x|)``, elementwise (the identity near 0, logarithmic far from it)."""
    return np.sign(x) * np.log1p(np.abs(x))


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

    def __init__(self, task: str, seed: int = 0, obs_norm: str = "symlog", reward_scale: float | None = None):
        if task not in TASK_PARAMS:
            raise one_of("mamujoco task", task, TASKS)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ConfigError(f"seed must be an int, got {seed!r}")
        if not isinstance(obs_norm, str) or obs_norm not in OBS_NORMS:
            raise one_of("mamujoco obs_norm", obs_norm, OBS_NORMS)
        scale = REWARD_SCALE[task] if reward_scale is None else reward_scale
        if (isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer))
                or not np.isfinite(scale) or scale <= 0):
            raise ConfigError(f"mamujoco option reward_scale must be a positive number, got {reward_scale!r}")
        self.obs_norm = obs_norm
        self.reward_scale = float(scale)
        self._norm = symlog if obs_norm == "symlog" else (lambda x: x)
        self._raw_return = 0.0
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
            action_dims=tuple(self._act_sizes) if len(set(self._act_sizes)) > 1 else None,
        )
        self._seeds = np.random.default_rng(int(seed))
        mask = self.spec.action_dim_mask()
        self._avail = np.ones((n, self.spec.action_dim), dtype=bool) if mask is None else mask
        self._done = True

    def _timestep(self, obs: dict, reward: float, terminated: bool, truncated: bool) -> TimeStep:
        n = self.spec.n_agents
        out = np.zeros((n, self.spec.obs_dim), dtype=np.float32)
        for i, a in enumerate(self.agents):
            out[i, : self._obs_sizes[i]] = self._norm(np.asarray(obs[a], dtype=np.float64))
            out[i, self._pad + i] = 1.0
        self._raw_return += reward
        return TimeStep(
            obs=out,
            state=self._norm(np.asarray(self._env.state(), dtype=np.float64)).astype(np.float32),
            avail=self._avail.copy(),
            reward=np.full(n, reward * self.reward_scale, dtype=np.float32),
            terminated=terminated,
            truncated=truncated,
            info={"raw_return": float(self._raw_return)},
        )

    def reset(self, seed: int | None = None) -> TimeStep:
        if seed is None:
            seed = int(self._seeds.integers(0, 2**31 - 1))
        elif isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ConfigError(f"seed must be an int, got {seed!r}")
        obs, _ = self._env.reset(seed=int(seed))
        self._done = False
        self._raw_return = 0.0
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
    """Build the MaMuJoCo adapter for ``task``; options ``obs_norm`` ("symlog" | "none", default
    "symlog") and ``reward_scale`` (positive float, default :data:`REWARD_SCALE` of the task)."""
    for name in options:
        if name not in OPTIONS:
            raise ConfigError(f"unknown mamujoco option {name!r}; accepted: {', '.join(OPTIONS)}")
    return MaMuJoCoEnv(task, seed=seed, **options)


__all__ = ["TASKS", "TASK_PARAMS", "OPTIONS", "OBS_NORMS", "REWARD_SCALE", "EPISODE_LIMIT", "MaMuJoCoEnv",
           "make", "symlog"]
