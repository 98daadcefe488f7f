"""SMAX (JaxMARL's JAX re-implementation of SMAC) behind :class:`mabl.envs.MultiAgentEnv`.

The learning agents are SMAX's allies; the enemies are driven by JaxMARL's built-in heuristic
(``jaxmarl.make("HeuristicEnemySMAX", scenario=...)``). Per step the adapter returns

* ``obs``   float32 ``[n_agents, obs_dim]``: SMAX ``unit_list`` observations,
* ``state`` float32 ``[state_dim]``: SMAX ``world_state`` (per unit: health fraction, x, y,
  weapon cooldown, unit-type one-hot; then every unit's team and type id). SMAX leaves it
  unnormalised (positions in map units 0..32, cooldowns in seconds, type ids 0..5), and so does
  the adapter by default (every recorded benchmark used it so). Option ``normalize_state=True``
  scales it like ``obs`` to about [0, 1]: positions by the map's width and height, each unit's
  cooldown by its unit type's weapon cooldown after clipping at 0 (SMAX lets an idle unit's
  cooldown run far below 0; any value <= 0 means "ready"), type ids by the largest id. On SMAX
  3m (one seed, BENCHMARKS.md section ``curve:smax:3m:fast:s0:nstate``) it learned faster early
  and ended far worse, so it is off by default;
* ``avail`` bool ``[n_agents, 5 + n_enemies]``: actions 0-3 move, 4 stop, ``5 + i`` attack enemy
  ``i`` (in range and alive). A dead ally may only stop;
* ``reward`` float32 ``[n_agents]``: the shared team reward for the last transition, identical
  for every agent; zeros after ``reset``. Option ``reward`` picks the function:

  - ``"smax"`` (default): SMAX's native reward (enemy health lost as a fraction, divided by the
    number of enemies, plus 1.0 on a win) times ``reward_scale`` (default 10, so a won episode is
    worth up to ~20 as with SMAC's default reward normalisation, the scale the paper's
    hyperparameters were tuned for; 1 gives SMAX's native reward);
  - ``"smac"``: SMAC's default reward, the one the paper trained on (StarCraft2Env's
    ``reward_battle`` with ``reward_only_positive``): enemy health lost in hit points, plus 10 for
    every enemy killed, plus 200 for a win (all enemies dead, an ally alive), divided by the most
    an episode can earn (``10 n_enemies + 200 +`` the enemies' total health) and times
    ``reward_scale`` (default 20, SMAC's ``reward_scale_rate``: a perfect win is worth 20). Unlike
    SMAX's, it pays for kills, so finishing a damaged enemy (focus fire) earns more than spreading
    the same shots: on 3m a kill is worth 0.55, a marine's 45 hit points 2.47, the win 10.96.

``terminated`` means the battle was decided (every ally or every enemy is dead);
``truncated`` means the episode limit was reached with both sides still standing. JaxMARL itself
folds the time limit into ``dones["__all__"]`` (``is_terminal`` is ``all_dead | all_enemy_dead |
step >= max_steps``), so the adapter recomputes the split from ``unit_alive`` and ``step``.
``info["won"]`` is set on the final step: all enemies dead and at least one ally alive (SMAX can
produce draws, which are not wins).

Maps (:data:`TASKS`): JaxMARL's SMAC scenarios ``3m 8m 25m 2s3z 3s5z 5m_vs_6m 10m_vs_11m
27m_vs_30m 3s5z_vs_3s6z 3s_vs_5z 6h_vs_8z`` plus two scenarios registered here:

* ``3s_vs_4z``: 3 stalkers vs 4 zealots (the SMAC map's units and its limit of 200 steps);
* ``6z_vs_24zg``: 6 zealots vs 24 zerglings, limit 400. These are the units and the episode limit
  of SMAC's ``corridor`` map, **but this is not the corridor map**: SMAX has no terrain, so there
  is no corridor to hold and the two teams simply spawn facing each other in the open.

Episode limits follow SMAC per map (:data:`EPISODE_LIMITS`); JaxMARL gets the map's limit as
``max_steps``, and ``make(task, episode_limit=N)`` overrides the adapter's limit (a traced
argument, so no recompilation). Maps that SMAX cannot build are listed in :data:`UNBUILDABLE`
with the reason (``mabl.envs.make_env`` reports it).

Every unit spawns at a fixed team centre plus uniform noise in [-2, 2] (SMAX's scheme); the
heuristic enemies attack the closest ally.

Speed: reset and step are each one ``jax.jit`` function (compiled and warmed up once per map and
process, shared by all adapters of that map), the PRNG key and the battle state stay on the
device between steps, and each call makes one device-to-host copy of one packed vector.
Building the first adapter of a map takes ~4-7 s (jaxmarl import ~3 s once, compile ~4 s).
Measured with random valid actions, resets included, one process on the 2-core CPU dev machine
(median of 16 chunks of 300 steps; the machine is noisy, runs varied by ~30%):

=============  ====================  ==========================
map            steps/s (as is)       steps/s (process pinned to
                                     one core: ``taskset -c 0``)
=============  ====================  ==========================
``3m``         ~2,300-2,700          ~5,400
``3s_vs_4z``   ~1,700-2,600          ~4,300-5,600
``6z_vs_24zg`` ~1,900-2,000          ~2,800-3,100
=============  ====================  ==========================

One SMAX step is many tiny XLA kernels (~80-150 us of work in all); XLA's CPU runtime runs
them on its worker threads, and on two cores the cross-core hand-offs cost as much as the work.
Pinning the process that steps the env to one core (``os.sched_setaffinity(0, {k})`` before
the first ``make``, e.g. in a dedicated rollout process) halves the step time. The adapter
itself does not pin anything; it only turns off JAX's CPU async dispatch (see
:func:`_tune_jax_cpu`) and XLA's concurrency-optimised scheduler for its step function.

Seeding: ``reset(seed)`` restarts the adapter's key from ``seed`` (same seed + same actions ->
same episode, enemy heuristic included); ``reset()`` continues the adapter's own key stream,
which ``make(task, seed)`` starts.

JaxMARL needs ``jax`` (imported only when an adapter is built; the default JAX platform is set to
CPU unless ``JAX_PLATFORMS`` is already set, since one small env is faster there and this keeps JAX
from reserving GPU memory that the PyTorch learner needs; where jax was imported earlier with a GPU
as its default, the adapter's keys are committed to the CPU device, so its reset and step still run
on the CPU, as on a machine without a GPU). Importing JaxMARL prints two lines
about "submoduled environments" and resets ``sys.stdout``/``sys.stderr`` to the process's
original streams (its mabrax module does that around ``import brax``); the adapter swallows the
lines and puts the streams back.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import sys
from typing import Any

import numpy as np

from mabl.envs.base import EnvSpec, MissingDependencyError, TimeStep
from mabl.errors import ConfigError, one_of

# SMAC episode limits per map; the order is the order of TASKS.
EPISODE_LIMITS: dict[str, int] = {
    "3m": 60,
    "8m": 120,
    "25m": 150,
    "2s3z": 120,
    "3s5z": 150,
    "5m_vs_6m": 70,
    "10m_vs_11m": 150,
    "27m_vs_30m": 180,
    "3s5z_vs_3s6z": 170,
    "3s_vs_4z": 200,
    "3s_vs_5z": 250,
    "6h_vs_8z": 150,
    "6z_vs_24zg": 400,
}

TASKS: tuple[str, ...] = tuple(EPISODE_LIMITS)

# SMAX unit type ids: 0 marine, 1 marauder, 2 stalker, 3 zealot, 4 zergling, 5 hydralisk.
# Custom scenarios registered with JaxMARL: name -> (ally unit types, enemy unit types).
CUSTOM_SCENARIOS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "3s_vs_4z": ((2, 2, 2), (3, 3, 3, 3)),
    "6z_vs_24zg": ((3,) * 6, (4,) * 24),
}

UNBUILDABLE: dict[str, str] = {
    "2s_vs_1sc": "no spine crawler unit in SMAX",
    "corridor": "SMAX has no terrain, so there is no corridor; use 6z_vs_24zg (same units, no terrain)",
}

OPTIONS = ("episode_limit", "reward", "reward_scale", "normalize_state")

# Reward functions (option ``reward``): "smax" = SMAX's native team reward, "smac" = SMAC's default.
REWARDS = ("smax", "smac")
# SMAC's defaults (reward_death_value, reward_win; reward_defeat 0, reward_negative_scale unused since
# reward_only_positive) and its reward_scale_rate: a perfect episode is worth 20
SMAC_DEATH_VALUE, SMAC_WIN_VALUE, SMAC_SCALE = 10.0, 200.0, 20.0

# SMAC normalises its reward so that a won episode is worth at most ~20 (reward_scale_rate=20);
# SMAX's native reward tops out at ~2 (damage fraction + 1 for the win). The paper's
# hyperparameters were tuned on SMAC's scale, so the adapter multiplies by 10 by default.
DEFAULT_REWARD_SCALE = 10.0

# XLA's concurrency-optimised scheduler spreads the step's many tiny kernels over threads; for a
# single small env the hand-offs cost more than they save (see _tune_jax_cpu).
_XLA_OPTIONS = {"xla_cpu_enable_concurrency_optimized_scheduler": False}


@contextlib.contextmanager
def _quiet_jaxmarl_import():
    """Swallow jaxmarl's import-time prints and undo its stream clobbering.

    ``jaxmarl.environments.mabrax`` sets ``sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__``
    while it tries to import brax, which silently discards any redirection in place (pytest's
    capture, a CLI's log redirect); ``jaxmarl.environments`` then prints two lines. Point
    ``sys.__stdout__`` at a buffer for the import and put every stream back afterwards.
    """
    saved = sys.stdout, sys.stderr, sys.__stdout__
    sink = io.StringIO()
    sys.stdout = sys.__stdout__ = sink
    try:
        yield
    finally:
        sys.stdout, sys.stderr, sys.__stdout__ = saved


def _tune_jax_cpu(jax) -> None:
    """Run CPU computations inline (no async dispatch) unless the user chose otherwise.

    The adapter blocks on every step's result anyway, so async dispatch only adds a hand-off to
    a worker thread per call. Timing the jitted step alone (3m, 2-core machine), async off plus
    the scheduler option in :func:`_compiled` took ~90 us against ~250 us with both defaults; in
    the full adapter loop the gain is smaller and within the machine's noise (~10-20%).
    Process-wide, and only possible before JAX creates its CPU client (jaxmarl makes arrays at
    import time, so this runs before importing it); later calls change nothing. Set
    ``JAX_CPU_ENABLE_ASYNC_DISPATCH`` to keep JAX's own choice.
    """
    if "JAX_CPU_ENABLE_ASYNC_DISPATCH" in os.environ:
        return
    from jax._src import xla_bridge

    if not getattr(xla_bridge, "_backends", None):
        jax.config.update("jax_cpu_enable_async_dispatch", False)


_USER_PLATFORMS = None  # JAX_PLATFORMS as the user had set it ('' if not) when the first adapter was built


def _import_jaxmarl():
    """Import jax and jaxmarl lazily; a missing package becomes a :class:`MissingDependencyError`."""
    global _USER_PLATFORMS
    if _USER_PLATFORMS is None:
        _USER_PLATFORMS = os.environ.get("JAX_PLATFORMS", "")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        import jax

        _tune_jax_cpu(jax)
        with _quiet_jaxmarl_import():
            import jaxmarl
            from jaxmarl.environments.smax import Scenario, map_name_to_scenario, register_scenario
    except ImportError as e:  # jaxmarl imports `six` without declaring it
        top = (e.name or "").split(".")[0]
        package = top if top in ("jax", "jaxlib", "six", "flax") else "jaxmarl"
        raise MissingDependencyError("smax", package, "smax") from e
    return jax, jaxmarl, Scenario, map_name_to_scenario, register_scenario


def _pin(jax, x):
    """``x`` committed to JAX's CPU device, so the jitted reset/step that take it run there, also
    where jax was imported before this module with a GPU as its default (the variable
    ``JAX_PLATFORMS=cpu`` set above then comes too late). A platform the user chose with
    ``JAX_PLATFORMS`` is left alone."""
    if _USER_PLATFORMS:
        return x
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # no CPU backend
        return x
    return jax.device_put(x, cpu)


def _scenario(task: str):
    jax, _, Scenario, map_name_to_scenario, register_scenario = _import_jaxmarl()
    if task in CUSTOM_SCENARIOS:
        allies, enemies = CUSTOM_SCENARIOS[task]
        unit_types = jax.numpy.array(allies + enemies, dtype=jax.numpy.uint8)
        register_scenario(task, Scenario(unit_types, len(allies), len(enemies), False, False))
    return map_name_to_scenario(task)


@functools.lru_cache(maxsize=None)
def _compiled(task: str):
    """The JaxMARL env and the jitted reset/step for one map, shared by all its adapters.

    Both functions return one ``uint32`` vector: ``[PRNG key | battle state | obs | world state |
    avail | SMAX reward, SMAC reward, terminated, truncated, won]`` (floats bit-cast, so nothing is
    rounded).
    ``step`` takes that vector back, so the key and state never leave the device and each call
    moves three arguments and one result instead of a dozen pytree leaves each way.
    The episode limit is a traced argument, so an ``episode_limit`` override does not compile
    again; JaxMARL's own ``max_steps`` (it only feeds JaxMARL's ``state.done``, unused here) is
    the map's SMAC limit.
    """
    jax, jaxmarl, *_ = _import_jaxmarl()
    jnp, lax = jax.numpy, jax.lax
    env = jaxmarl.make("HeuristicEnemySMAX", scenario=_scenario(task), max_steps=EPISODE_LIMITS[task])
    agents = list(env.agents)
    n = len(agents)
    u32 = jnp.uint32

    def to_u32(x):
        if x.dtype in (jnp.float32, jnp.int32):
            return lax.bitcast_convert_type(x, u32).reshape(-1)
        return x.astype(u32).reshape(-1)

    def from_u32(u, like):
        if like.dtype in (jnp.float32, jnp.int32):
            return lax.bitcast_convert_type(u, like.dtype).reshape(like.shape)
        if like.dtype == jnp.bool_:
            return (u != 0).reshape(like.shape)
        return u.astype(like.dtype).reshape(like.shape)

    key0 = _pin(jax, jax.random.PRNGKey(0))
    _, state_shape = jax.eval_shape(env.reset, key0)
    carry_like = (key0, state_shape)
    leaves_like, treedef = jax.tree.flatten(carry_like)
    supported = {jnp.dtype(t) for t in (jnp.float32, jnp.int32, jnp.uint32, jnp.uint8, jnp.bool_)}
    assert all(jnp.dtype(x.dtype) in supported for x in leaves_like), [x.dtype for x in leaves_like]
    sizes = [int(np.prod(x.shape)) for x in leaves_like]
    carry_size = sum(sizes)

    def unpack_carry(buf):
        leaves, i = [], 0
        for like, size in zip(leaves_like, sizes):
            leaves.append(from_u32(buf[i : i + size], like))
            i += size
        return jax.tree.unflatten(treedef, leaves)

    def smac_reward(before, after):
        """SMAC's default ``reward_battle`` (reward_only_positive): enemy health lost, 10 per enemy
        killed and 200 for a win, divided by the most an episode can earn (a won battle = 1.0)."""
        alive_b, alive_a = before.unit_alive[n:], after.unit_alive[n:]
        damage = jnp.sum(jnp.where(alive_b, before.unit_health[n:] - after.unit_health[n:], 0.0))
        kills = jnp.sum((alive_b & ~alive_a).astype(jnp.float32))
        won = ~jnp.any(alive_a) & jnp.any(after.unit_alive[:n])
        return (damage + SMAC_DEATH_VALUE * kills + SMAC_WIN_VALUE * won.astype(jnp.float32)) / smac_most

    # the most an episode can earn under SMAC's reward (a per-map constant; JaxMARL keeps the scenario's
    # unit types, allies then enemies, in env.scenario)
    enemy_types = np.asarray(env.scenario)[n:]
    smac_most = float(SMAC_DEATH_VALUE * len(enemy_types) + SMAC_WIN_VALUE
                      + np.asarray(env.unit_type_health)[enemy_types].sum())

    def pack(key, env_state, obs, reward, limit, reward_smac=0.0):
        inner = env_state.state
        alive = inner.unit_alive
        allies_dead = ~jnp.any(alive[:n])
        enemies_dead = ~jnp.any(alive[n:])
        terminated = allies_dead | enemies_dead
        truncated = (inner.step >= limit) & ~terminated
        won = enemies_dead & ~allies_dead
        avail = env.get_avail_actions(env_state)
        parts = [to_u32(x) for x in jax.tree.leaves((key, env_state))]
        parts += [
            to_u32(jnp.stack([obs[a] for a in agents]).astype(jnp.float32)),
            to_u32(obs["world_state"].astype(jnp.float32)),
            to_u32(jnp.stack([avail[a] for a in agents])),
            to_u32(jnp.asarray(reward, jnp.float32)),
            to_u32(jnp.asarray(reward_smac, jnp.float32)),
            to_u32(jnp.stack([terminated, truncated, won])),
        ]
        return jnp.concatenate(parts)

    def reset(key, limit):
        key, sub = jax.random.split(key)
        obs, env_state = env.reset(sub)
        return pack(key, env_state, obs, 0.0, limit)

    def step(buf, actions, limit):
        key, env_state = unpack_carry(buf)
        key, sub = jax.random.split(key)
        act = {a: actions[i] for i, a in enumerate(agents)}
        before = env_state.state
        obs, env_state, rewards, _, _ = env.step_env(sub, env_state, act)
        return pack(key, env_state, obs, rewards[agents[0]], limit, smac_reward(before, env_state.state))

    reset_j, step_j = jax.jit(reset), jax.jit(step, compiler_options=_XLA_OPTIONS)
    # warm up: compile once, outside any episode the caller sees
    limit = np.int32(EPISODE_LIMITS[task])
    buf = reset_j(key0, limit)
    for _ in range(2):
        buf = step_j(buf, np.full(n, 4, dtype=np.int32), limit)
    np.asarray(buf)
    return env, reset_j, step_j, carry_size, sizes[0]


def _state_scale(env) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature factors that bring SMAX's ``world_state`` to about [0, 1] (module docstring; the
    cooldowns, clipped at 0 by the caller, carry SMAX's random jitter, so they can end slightly above 1),
    and the indices of the cooldown features.

    Layout (``jaxmarl`` ``get_world_state``): per unit ``[health fraction, x, y, cooldown,
    type one-hot]``, then every unit's team, then every unit's type id. Unit types are fixed per
    scenario, so each unit's cooldown factor is known up front.
    """
    n_units = int(env.num_allies) + int(env.num_enemies)
    per_unit = len(env.own_features)
    types = np.asarray(env.scenario)  # JaxMARL keeps the scenario's unit types (allies, then enemies) here
    cooldowns = np.asarray(env.unit_type_weapon_cooldowns, dtype=np.float64)[types]
    units = np.ones((n_units, per_unit))
    units[:, 1] = 1.0 / float(env.map_width)
    units[:, 2] = 1.0 / float(env.map_height)
    units[:, 3] = 1.0 / cooldowns
    type_ids = np.full(n_units, 1.0 / max(int(env.unit_type_bits) - 1, 1))
    scale = np.concatenate([units.reshape(-1), np.ones(n_units), type_ids]).astype(np.float32)
    assert scale.shape == (int(env.state_size),), (scale.shape, env.state_size)
    return scale, np.arange(n_units) * per_unit + 3


class SMAXEnv:
    """One SMAX map with heuristic enemies; see the module docstring for the conventions."""

    def __init__(self, task: str, seed: int = 0, episode_limit: int | None = None, reward: str = "smax",
                 reward_scale: float | None = None, normalize_state: bool = False):
        if task not in EPISODE_LIMITS:
            if task in UNBUILDABLE:
                raise ConfigError(
                    f"smax map {task!r} cannot be built: {UNBUILDABLE[task]}; available: {', '.join(TASKS)}"
                )
            raise one_of("smax task", task, TASKS)
        limit = EPISODE_LIMITS[task] if episode_limit is None else episode_limit
        if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
            raise ConfigError(f"smax option episode_limit must be a positive int, got {episode_limit!r}")
        limit = int(limit)
        if not isinstance(reward, str) or reward not in REWARDS:
            raise one_of("smax option reward", reward, REWARDS)
        self._reward_at = REWARDS.index(reward)  # where its value sits in the packed vector
        if reward_scale is None:
            reward_scale = DEFAULT_REWARD_SCALE if reward == "smax" else SMAC_SCALE
        if isinstance(reward_scale, bool) or not isinstance(reward_scale, (int, float)) or not reward_scale > 0:
            raise ConfigError(f"smax option reward_scale must be a positive number, got {reward_scale!r}")
        self._reward_scale = float(reward_scale)
        if not isinstance(normalize_state, bool):
            raise ConfigError(f"smax option normalize_state must be a bool (true/false), got {normalize_state!r}")
        self._jax = _import_jaxmarl()[0]
        env, self._reset_fn, self._step_fn, carry, self._key_size = _compiled(task)
        self._limit = np.int32(limit)
        self.task = task
        self.n_agents = n = int(env.num_allies)
        self.n_enemies = int(env.num_enemies)
        obs_dim, state_dim, n_act = int(env.obs_size), int(env.state_size), int(env.num_ally_actions)
        self.spec = EnvSpec(
            name=f"smax:{task}",
            n_agents=n,
            obs_dim=obs_dim,
            state_dim=state_dim,
            action_dim=n_act,
            discrete=True,
            has_action_mask=True,
            episode_limit=limit,
            has_win=True,
        )
        # the packed vector after the carry: obs | state | avail | reward | terminated, truncated, won
        o = n * obs_dim
        s = o + state_dim
        a = s + n * n_act
        self._carry = carry
        self._cuts = (o, s, a)
        self._state_scale, self._cooldown_cols = _state_scale(env) if normalize_state else (None, None)
        self._key = self._seed_key(seed)  # used by the first reset() without a seed
        self._buf: Any = None  # device vector: key and battle state of the running episode
        self._done = True

    def _seed_key(self, seed):
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ConfigError(f"seed must be an int, got {seed!r}")
        return _pin(self._jax, self._jax.random.PRNGKey(int(seed) & 0xFFFFFFFF))

    def _timestep(self, buf) -> TimeStep:
        # one device-to-host copy of the outputs; the caller owns (and may modify) the arrays
        flat = np.array(np.asarray(buf)[self._carry :])
        o, s, a = self._cuts
        spec = self.spec
        f = flat.view(np.float32)
        terminated, truncated, won = (bool(x) for x in flat[a + 2 :])
        done = terminated or truncated
        self._done = done
        return TimeStep(
            obs=f[:o].reshape(spec.n_agents, spec.obs_dim),
            state=f[o:s] if self._state_scale is None else self._normalize(f[o:s]),
            avail=flat[s:a].reshape(spec.n_agents, spec.action_dim).astype(bool),
            reward=np.full(spec.n_agents, f[a + self._reward_at] * self._reward_scale, dtype=np.float32),
            terminated=terminated,
            truncated=truncated,
            info={"won": won} if done else {},
        )

    def _normalize(self, state: np.ndarray) -> np.ndarray:
        out = state * self._state_scale
        out[self._cooldown_cols] = np.maximum(out[self._cooldown_cols], 0.0)
        return out

    def reset(self, seed: int | None = None) -> TimeStep:
        if seed is not None:
            key = self._seed_key(seed)
        elif self._buf is not None:
            key = self._buf[: self._key_size]  # continue this adapter's key stream
        else:
            key = self._key
        self._buf = self._reset_fn(key, self._limit)
        return self._timestep(self._buf)

    def step(self, actions: np.ndarray) -> TimeStep:
        if self._done:
            raise RuntimeError(f"{self.spec.name}: step() called without an episode in progress; call reset()")
        acts = np.asarray(actions)
        if acts.shape != (self.spec.n_agents,):
            raise ValueError(f"{self.spec.name}: actions must have shape ({self.spec.n_agents},), got {acts.shape}")
        acts = acts.astype(np.int32, copy=False)
        if acts.min() < 0 or acts.max() >= self.spec.action_dim:
            raise ValueError(f"{self.spec.name}: actions must lie in [0, {self.spec.action_dim}), got {acts.tolist()}")
        self._buf = self._step_fn(self._buf, acts, self._limit)
        return self._timestep(self._buf)

    def close(self) -> None:
        self._buf = None
        self._done = True


def make(task: str, seed: int = 0, **options) -> SMAXEnv:
    """Build the SMAX adapter for ``task``; options ``episode_limit`` (positive int), ``reward``
    (``"smax"``, default, or ``"smac"``: see the module docstring), ``reward_scale`` (positive float;
    default 10 for ``"smax"``, SMAC's scale, where 1 is SMAX's native reward; 20 for ``"smac"``, SMAC's
    ``reward_scale_rate``) and ``normalize_state`` (bool, default false; true: the global state scaled
    to about [0, 1])."""
    for name in options:
        if name not in OPTIONS:
            raise ConfigError(f"unknown smax option {name!r}; accepted: {', '.join(OPTIONS)}")
    return SMAXEnv(task, seed=seed, **options)


__all__ = ["TASKS", "EPISODE_LIMITS", "CUSTOM_SCENARIOS", "UNBUILDABLE", "OPTIONS", "SMAXEnv", "make"]
