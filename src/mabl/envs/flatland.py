"""Flatland (flatland-rl 4.3) railway scheduling behind :class:`mabl.envs.MultiAgentEnv`.

Tasks (:data:`TASKS`) follow Table 5 of the MABL paper (the MAMBA "classic" settings): a 35x35
map from ``sparse_rail_generator`` without grid distribution of cities, at most 2 rails between
cities and 4 rails in a city (``max_rail_pairs_in_city=2``), every train at speed 1, and
malfunctions from ``ParamMalfunctionGen(MalfunctionParameters(rate, 20, 50))``:

* ``5_agents``: 5 trains, 3 cities, malfunction rate 1/100;
* ``10_agents``: 10 trains, 4 cities, malfunction rate 1/150.

Per step the adapter returns

* ``obs`` float32 ``[n_agents, 265]``: the agent's ``TreeObsForRailEnv(max_depth=2,
  ShortestPathPredictorForRailEnv(30))`` flattened to 21 nodes x 12 features = 252 values and
  normalised as in Flatland's starter kit (``normalize_observation`` /
  ``flatland.ml``'s ``FlattenedNormalizedTreeObsForRailEnv``, re-implemented here because that
  module imports ray), followed by 13 own features (see ``FlatlandEnv._own_features``).
  Tree layout: nodes in pre-order (root, then the L, F, R, B subtrees, each root first), features
  regrouped as ``[6 distance features x 21 nodes | dist_min_to_target x 21 | 5 agent counts x 21]``.
  Normalisation: the 6 distance features are divided by the observation radius 10 and clipped to
  [-1, 1]; ``dist_min_to_target`` is min-max scaled over this observation's finite non-negative
  values and clipped to [-1, 1]; the agent counts are clipped to [-1, 1]. ``+inf`` (nothing met on
  the branch) becomes 1 and a missing branch (``-inf``, including every node below it) becomes -1.
* ``state`` float32 ``[n_agents * 273]``: Flatland has no global state, so it is built from what
  the environment knows: every agent's 265-value observation (in agent order), then per agent 8
  values: position ``(row / (H-1), col / (W-1))`` or ``(-1, -1)`` while off the map (not yet
  departed or arrived and removed), target ``(row / (H-1), col / (W-1))``, and a direction one-hot
  (N, E, S, W; zeros while off the map). The observations already carry each agent's status
  one-hot, malfunction counter and deadlock flag.
* ``avail`` bool ``[n_agents, 5]`` over Flatland's actions ``DO_NOTHING, MOVE_LEFT,
  MOVE_FORWARD, MOVE_RIGHT, STOP_MOVING``. Only DO_NOTHING is available to an agent that has
  arrived, is waiting for its earliest departure (WAITING: Flatland ignores its actions), is in a
  malfunction (actions are ignored until it ends) or is deadlocked. Otherwise DO_NOTHING and STOP
  are available and LEFT / RIGHT / FORWARD follow the rail at the agent's cell and heading (its
  start cell while off the map): LEFT iff the rail allows leaving towards ``heading - 1``, RIGHT
  iff towards ``heading + 1``, FORWARD iff straight on is allowed or the cell has a single exit
  (curves and dead-ends, where Flatland maps FORWARD onto that exit). Flatland silently turns an
  impossible LEFT / RIGHT into FORWARD; the mask marks those as unavailable instead.
  Option ``auto_depart`` (default False): a train that is ready to depart (READY_TO_DEPART, its
  earliest departure reached) may only take an entering move (LEFT / FORWARD / RIGHT as above):
  DO_NOTHING and STOP, which keep it off the map, are masked. Waiting at home is then not a choice
  (a greedy policy cannot keep a train at home for the whole episode); while the start cell is
  occupied Flatland keeps the train off the map anyway.
* ``reward`` float32 ``[n_agents]``, per agent, see below.

Rewards (option ``reward``):

* ``"shaped"`` (default) is MAMBA's Flatland shaping (``train.py`` in jbr-ai-labs/mamba:
  ``FinishRewardConfig(10)``, ``NearRewardConfig(0.01)``, ``DeadlockPunishmentConfig(-5)``),
  which MABL's Flatland experiments reuse. For agent ``i`` and one transition:
  ``r_i = 10 * [i arrived at its target in this step]
        + 0.01 * (d_i(before) - d_i(after))
        - 5 * [i became deadlocked in this step]``,
  where ``d_i`` is the shortest-path distance (cells) from the agent's cell and heading to its
  target in Flatland's distance map (its start cell and heading while off the map, 0 once
  arrived). An infinite distance (no path from that heading) keeps the last finite distance (and
  no progress is paid before the first finite one), so the progress term stays finite and
  telescopes. Arrival and deadlock are each paid once per
  episode. See :data:`FINISH_REWARD`, :data:`PROGRESS_COEF`, :data:`DEADLOCK_PENALTY`.
  Option ``progress_coef`` (a number >= 0, default 0.01) replaces the 0.01: the progress term
  is the only reward that tells a train which way to turn at a switch before it arrives, and at
  0.01 per cell it is ~100x smaller than the arrival reward.
  Option ``deadlock_penalty`` (a number <= 0, default -5) replaces the -5. With -5, a policy
  that never departs (return 0) beats one that moves but often deadlocks, and short runs
  (~20k steps) settle there: the greedy policy keeps every train at home (measured, see
  BENCHMARKS.md). With ``deadlock_penalty=0`` every departure can only add reward (arrival +10,
  progress telescopes), so moving towards the target is what the reward favours from the start.
* ``"native"`` is Flatland's own per-agent reward (``DefaultRewards``: zero on the way, a
  late-arrival penalty on arrival, and at the episode end a penalty for each train that did not
  arrive: its delay, or for a train that never departed its shortest travel time).

Deadlock rule (a train stuck for the rest of the episode): take the largest set of trains on the
map such that every exit of each member's cell (for its heading) is occupied by another member.
Inside it, a train is deadlocked if each of its blockers is either deadlocked or faces it head-on
(the blocker's exits include the train's cell), iterated to a fixed point. So two trains facing
each other on adjacent cells with no other way out are deadlocked, and so is every train queued
behind them with no alternative; a closed loop of trains following each other (which Flatland can
rotate) is not. Malfunctions do not matter: a head-on pair never resolves in Flatland.

Episodes: ``terminated`` when every train has arrived; with ``reward="shaped"`` also when every
train has arrived or is deadlocked (nothing can change any more and the shaped reward of the rest
of the episode is 0). ``truncated`` at ``episode_limit`` steps. Flatland 4's timetable gives a
per-episode ``max_episode_steps`` that varies a lot with the map (45-154 steps for 5 agents,
72-171 for 10 over 40 seeds), while :class:`EnvSpec` needs one fixed limit. The adapter therefore
overrides Flatland's limit with a fixed one: by default Flatland's classic formula
``int(8 * (width + height + n_agents / n_cities))`` (573 for 5 agents, 580 for 10), which is the
episode length of Flatland 2 as used by MAMBA; ``make(task, episode_limit=N)`` picks another.
The timetable (earliest departures, latest arrivals) is Flatland 4's and only matters for
``reward="native"`` and for the WAITING state.

``info`` on every step: ``arrived_fraction`` (fraction of trains at their target),
``deadlocked_fraction``, and ``native_reward`` (Flatland's reward summed over agents, whichever
reward the adapter returns).

Seeding: ``reset(seed)`` regenerates the same rail, line, timetable and malfunctions (Flatland's
``ParamMalfunctionGen`` caches random numbers across episodes; the adapter clears that cache on
every reset); ``reset()`` draws the next seed from the adapter's generator, which
``make(task, seed)`` starts.

Speed (one process, 2-core CPU machine shared with other jobs, random valid actions, resets
included): ``5_agents`` ~390 steps/s, ``10_agents`` ~210 steps/s (:data:`MEASURED_STEPS_PER_SECOND`).
About 80% of a step is Flatland's own tree observation and shortest-path predictor; a reset (new
rail) costs ~0.1-0.3 s. Flatland keeps rail-method results in class-level ``lru_cache``s that
hold every old rail alive (~4 MB per reset); the adapter empties them on each reset.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from mabl.envs.base import EnvSpec, MissingDependencyError, TimeStep
from mabl.errors import ConfigError, one_of

# task -> (n_agents, n_cities, malfunction rate); Table 5 of the paper.
TASK_PARAMS: dict[str, tuple[int, int, float]] = {
    "5_agents": (5, 3, 1.0 / 100),
    "10_agents": (10, 4, 1.0 / 150),
}
TASKS: tuple[str, ...] = tuple(TASK_PARAMS)

WIDTH = HEIGHT = 35
MAX_RAILS_BETWEEN_CITIES = 2
MAX_RAIL_PAIRS_IN_CITY = 2  # "4 rails in cities"
MALFUNCTION_MIN, MALFUNCTION_MAX = 20, 50

TREE_DEPTH = 2
PREDICTOR_DEPTH = 30
OBS_RADIUS = 10.0  # the starter kit's observation_radius
N_FEATURES = 12
TREE_NODES = sum(4**d for d in range(TREE_DEPTH + 1))  # 21
TREE_DIM = TREE_NODES * N_FEATURES  # 252
N_STATES = 7  # TrainState: WAITING, READY_TO_DEPART, MALFUNCTION_OFF_MAP, MOVING, STOPPED, MALFUNCTION, DONE
OWN_DIM = N_STATES + 6
OBS_DIM = TREE_DIM + OWN_DIM  # 265
AGENT_STATE_DIM = 8  # position (2), target (2), direction one-hot (4)
N_ACTIONS = 5
DO_NOTHING, MOVE_LEFT, MOVE_FORWARD, MOVE_RIGHT, STOP_MOVING = range(N_ACTIONS)

FINISH_REWARD = 10.0
PROGRESS_COEF = 0.01
DEADLOCK_PENALTY = -5.0

REWARDS = ("shaped", "native")
OPTIONS = ("reward", "episode_limit", "deadlock_penalty", "progress_coef", "auto_depart")

# measured with tests' random valid actions, resets included (see module docstring)
MEASURED_STEPS_PER_SECOND = {"5_agents": 390, "10_agents": 210}

_MISSING = -np.inf
_DIRS = ((-1, 0), (0, 1), (1, 0), (0, -1))  # N, E, S, W


def classic_episode_limit(task: str) -> int:
    """Flatland's classic (v2) episode length ``int(8 * (W + H + n_agents / n_cities))``."""
    n, cities, _ = TASK_PARAMS[task]
    return int(4 * 2 * (WIDTH + HEIGHT + n / cities))


def _import_flatland():
    try:
        from flatland.envs.line_generators import sparse_line_generator
        from flatland.envs.malfunction_generators import MalfunctionParameters, ParamMalfunctionGen
        from flatland.envs.observations import TreeObsForRailEnv
        from flatland.envs.predictions import ShortestPathPredictorForRailEnv
        from flatland.envs.rail_env import RailEnv
        from flatland.envs.rail_generators import sparse_rail_generator
        from flatland.envs.step_utils.states import TrainState
    except ImportError as e:
        raise MissingDependencyError("flatland", "flatland-rl", "flatland") from e
    return {
        "RailEnv": RailEnv,
        "sparse_rail_generator": sparse_rail_generator,
        "sparse_line_generator": sparse_line_generator,
        "ParamMalfunctionGen": ParamMalfunctionGen,
        "MalfunctionParameters": MalfunctionParameters,
        "TreeObsForRailEnv": TreeObsForRailEnv,
        "ShortestPathPredictorForRailEnv": ShortestPathPredictorForRailEnv,
        "TrainState": TrainState,
    }


def _clear_rail_caches(rail) -> None:
    """Empty the ``functools.lru_cache``s on the rail map's methods.

    Flatland caches rail-method results per rail object (keyed by a uuid) in class-level caches of
    up to 1-4 million entries, which keep every previous episode's rail alive: without this, memory
    grows by ~4 MB per reset. Clearing only costs re-filling the cache for the current rail (other
    adapters in the same process just recompute their entries).
    """
    for cls in type(rail).__mro__:
        for attr in vars(cls).values():
            clear = getattr(attr, "cache_clear", None)
            if callable(clear):
                clear()


# ---------------------------------------------------------------------------------------------
# tree observation: flatten + normalise


def _flatten_tree(node, out: np.ndarray) -> None:
    """Write a depth-``TREE_DEPTH`` tree into ``out`` ``[TREE_NODES, 12]`` in pre-order.

    ``out`` must be pre-filled with ``-inf``: missing branches (``-inf`` children, children cut
    at the depth limit, ``None`` for an agent without a configuration) are left as they are.
    """
    idx = 0

    def visit(n, depth):
        nonlocal idx
        if not hasattr(n, "childs"):  # -inf / None / []: missing branch, skip its whole subtree
            idx += sum(4**d for d in range(TREE_DEPTH - depth + 1))
            return
        out[idx, :] = n[:N_FEATURES]
        idx += 1
        if depth == TREE_DEPTH:
            return
        childs = n.childs if n.childs else {}
        for key in ("L", "F", "R", "B"):
            visit(childs.get(key, _MISSING), depth + 1)

    visit(node, 0)


def normalize_tree(nodes: np.ndarray, radius: float = OBS_RADIUS) -> np.ndarray:
    """Flatland starter-kit normalisation of raw node features ``[..., TREE_NODES, 12]`` -> ``[..., 252]``.

    Distances (features 0-5) / ``radius`` clipped to [-1, 1]; ``dist_min_to_target`` (feature 6)
    min-max scaled per tree over its non-negative values (the max taken over values below 1000,
    at least 1, plus 1; the min over all non-negative values) and clipped to [-1, 1]; agent counts
    (features 7-11) clipped to [-1, 1]. ``inf`` -> 1, ``-inf`` -> -1; never NaN.
    Output layout: ``[features 0-5 of node 0, node 1, ... | feature 6 of every node | 7-11 ...]``.
    """
    nodes = np.asarray(nodes, dtype=np.float64)
    lead = nodes.shape[:-2]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        data = np.clip(nodes[..., :6] / radius, -1.0, 1.0)
        dist = nodes[..., 6]
        small = np.where((dist >= 0) & (dist < 1000), dist, 0.0)
        max_obs = np.maximum(1.0, small.max(axis=-1, keepdims=True)) + 1.0
        min_obs = np.where(dist >= 0, dist, np.inf).min(axis=-1, keepdims=True)
        min_obs = np.minimum(min_obs, max_obs)
        norm = np.where(max_obs == min_obs, max_obs, np.abs(max_obs - min_obs))
        shift = np.where(max_obs == min_obs, 0.0, min_obs)
        dist_n = np.clip((dist - shift) / norm, -1.0, 1.0)
        agent = np.clip(nodes[..., 7:], -1.0, 1.0)
    return np.concatenate(
        [data.reshape(*lead, -1), dist_n, agent.reshape(*lead, -1)], axis=-1
    )


# ---------------------------------------------------------------------------------------------


class FlatlandEnv:
    """One Flatland task; see the module docstring for observations, state, masks and rewards."""

    def __init__(self, task: str, seed: int = 0, reward: str = "shaped", episode_limit: int | None = None,
                 deadlock_penalty: float = DEADLOCK_PENALTY, progress_coef: float = PROGRESS_COEF,
                 auto_depart: bool = False):
        if task not in TASK_PARAMS:
            raise one_of("flatland task", task, TASKS)
        if not isinstance(reward, str) or reward not in REWARDS:
            raise one_of("flatland reward", reward, REWARDS)
        limit = classic_episode_limit(task) if episode_limit is None else episode_limit
        if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
            raise ConfigError(f"flatland option episode_limit must be a positive int, got {episode_limit!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ConfigError(f"seed must be an int, got {seed!r}")
        if (isinstance(deadlock_penalty, bool) or not isinstance(deadlock_penalty, (int, float, np.integer, np.floating))
                or not np.isfinite(deadlock_penalty) or deadlock_penalty > 0):
            raise ConfigError(f"flatland option deadlock_penalty must be a number <= 0, got {deadlock_penalty!r}")
        if (isinstance(progress_coef, bool) or not isinstance(progress_coef, (int, float, np.integer, np.floating))
                or not np.isfinite(progress_coef) or progress_coef < 0):
            raise ConfigError(f"flatland option progress_coef must be a number >= 0, got {progress_coef!r}")
        self.progress_coef = float(progress_coef)
        if not isinstance(auto_depart, (bool, np.bool_)):
            raise ConfigError(f"flatland option auto_depart must be a bool (true/false), got {auto_depart!r}")
        self.auto_depart = bool(auto_depart)
        fl = _import_flatland()
        self._TrainState = fl["TrainState"]
        self.task = task
        self.reward_mode = reward
        self.deadlock_penalty = float(deadlock_penalty)
        n, cities, rate = TASK_PARAMS[task]
        self.n_agents = n
        self.episode_limit = int(limit)
        self._malfunction_gen = fl["ParamMalfunctionGen"](
            fl["MalfunctionParameters"](rate, MALFUNCTION_MIN, MALFUNCTION_MAX)
        )
        self._env = fl["RailEnv"](
            width=WIDTH,
            height=HEIGHT,
            rail_generator=fl["sparse_rail_generator"](
                max_num_cities=cities,
                grid_mode=False,
                max_rails_between_cities=MAX_RAILS_BETWEEN_CITIES,
                max_rail_pairs_in_city=MAX_RAIL_PAIRS_IN_CITY,
            ),
            line_generator=fl["sparse_line_generator"]({1.0: 1.0}),
            number_of_agents=n,
            obs_builder_object=fl["TreeObsForRailEnv"](
                max_depth=TREE_DEPTH, predictor=fl["ShortestPathPredictorForRailEnv"](PREDICTOR_DEPTH)
            ),
            malfunction_generator=self._malfunction_gen,
            remove_agents_at_target=True,
            random_seed=int(seed) & 0x7FFFFFFF,
        )
        self.spec = EnvSpec(
            name=f"flatland:{task}",
            n_agents=n,
            obs_dim=OBS_DIM,
            state_dim=n * (OBS_DIM + AGENT_STATE_DIM),
            action_dim=N_ACTIONS,
            discrete=True,
            has_action_mask=True,
            episode_limit=self.episode_limit,
            has_win=False,
        )
        self._seeds = np.random.default_rng(int(seed))
        self._t = 0
        self._done = True
        self._arrived = np.zeros(n, dtype=bool)
        self._deadlocked = np.zeros(n, dtype=bool)
        self._dist = np.zeros(n, dtype=np.float64)
        self._raw_dist = np.zeros(n, dtype=np.float64)
        self._tree_buf = np.empty((n, TREE_NODES, N_FEATURES), dtype=np.float64)

    # -- helpers ----------------------------------------------------------------------------

    def _virtual_config(self, agent):
        """(position, direction) the agent's obs is computed from: start cell while off the map."""
        st = agent.state
        if st.is_off_map_state():
            return agent.initial_configuration
        if st.is_on_map_state():
            return agent.current_configuration
        return agent.target_configuration

    def _distance(self, handle: int, agent) -> float:
        if agent.state == self._TrainState.DONE:
            return 0.0
        cfg = self._virtual_config(agent)
        if cfg is None:
            return np.inf
        (r, c), d = cfg
        return float(self._env.distance_map.get()[handle, r, c, int(d)])

    def _find_deadlocks(self) -> np.ndarray:
        """Deadlocked trains by the rule in the module docstring."""
        env = self._env
        occ: dict[tuple[int, int], int] = {}
        configs: dict[int, Any] = {}
        for h, a in enumerate(env.agents):
            if a.state.is_on_map_state() and a.current_configuration is not None:
                occ[tuple(a.current_configuration[0])] = h
                configs[h] = a.current_configuration
        blockers: dict[int, list[int]] = {}
        for h, ((r, c), d) in configs.items():
            trans = env.rail.get_transitions(((r, c), int(d)))
            bl = []
            free = False
            for nd in range(4):
                if not trans[nd]:
                    continue
                dr, dc = _DIRS[nd]
                o = occ.get((r + dr, c + dc))
                if o is None:
                    free = True
                    break
                bl.append(o)
            if not free and bl:
                blockers[h] = bl
        # largest set whose members are blocked only by members
        stuck = set(blockers)
        changed = True
        while changed:
            changed = False
            for h in list(stuck):
                if any(b not in stuck for b in blockers[h]):
                    stuck.discard(h)
                    changed = True
        # keep those grounded in a head-on pair
        dead: set[int] = set()
        changed = True
        while changed:
            changed = False
            for h in stuck - dead:
                if all(b in dead or h in blockers[b] for b in blockers[h]):
                    dead.add(h)
                    changed = True
        out = np.zeros(self.n_agents, dtype=bool)
        out[list(dead)] = True
        return out

    def _own_features(self, handle: int, agent, dist: float) -> np.ndarray:
        """13 own features of one agent.

        ``[0:7]`` TrainState one-hot (WAITING, READY_TO_DEPART, MALFUNCTION_OFF_MAP, MOVING, STOPPED,
        MALFUNCTION, DONE); ``[7]`` malfunction steps left / 51; ``[8]`` deadlocked flag;
        ``[9]`` shortest-path distance to target / (2 (W + H)), clipped to [0, 1] (1 if no path);
        ``[10]`` elapsed steps / episode_limit; ``[11]`` steps until earliest departure /
        episode_limit (0 once reached); ``[12]`` slack ``(latest_arrival - t - distance) /
        episode_limit`` clipped to [-1, 1] (-1 if no path).
        """
        f = np.zeros(OWN_DIM, dtype=np.float64)
        f[int(agent.state)] = 1.0
        f[7] = min(agent.malfunction_handler.malfunction_down_counter / (MALFUNCTION_MAX + 1), 1.0)
        f[8] = float(self._deadlocked[handle])
        L = float(self.episode_limit)
        f[9] = 1.0 if not np.isfinite(dist) else min(dist / (2.0 * (WIDTH + HEIGHT)), 1.0)
        f[10] = min(self._t / L, 1.0)
        f[11] = min(max(agent.earliest_departure - self._t, 0) / L, 1.0)
        if agent.state == self._TrainState.DONE:
            f[12] = 0.0
        elif not np.isfinite(dist):
            f[12] = -1.0
        else:
            f[12] = float(np.clip((agent.latest_arrival - self._t - dist) / L, -1.0, 1.0))
        return f

    def _avail(self) -> np.ndarray:
        TS = self._TrainState
        avail = np.zeros((self.n_agents, N_ACTIONS), dtype=bool)
        avail[:, DO_NOTHING] = True
        rail = self._env.rail
        for h, a in enumerate(self._env.agents):
            st = a.state
            if (
                st == TS.DONE
                or st == TS.WAITING
                or a.malfunction_handler.in_malfunction
                or self._deadlocked[h]
            ):
                continue
            cfg = a.current_configuration if st.is_on_map_state() else a.initial_configuration
            if cfg is None:
                continue
            (r, c), d = cfg
            d = int(d)
            trans = rail.get_transitions(((r, c), d))
            n_exits = int(sum(1 for x in trans if x))
            avail[h, STOP_MOVING] = True
            avail[h, MOVE_LEFT] = bool(trans[(d - 1) % 4])
            avail[h, MOVE_RIGHT] = bool(trans[(d + 1) % 4])
            avail[h, MOVE_FORWARD] = bool(trans[d]) or n_exits == 1
            if self.auto_depart and st == TS.READY_TO_DEPART and avail[h, MOVE_LEFT:STOP_MOVING].any():
                avail[h, DO_NOTHING] = avail[h, STOP_MOVING] = False
        return avail

    def _observe(self, obs_dict, reward: np.ndarray, terminated: bool, truncated: bool, info) -> TimeStep:
        env = self._env
        n = self.n_agents
        obs = np.empty((n, OBS_DIM), dtype=np.float32)
        agent_state = np.zeros((n, AGENT_STATE_DIM), dtype=np.float32)
        buf = self._tree_buf
        buf.fill(_MISSING)
        for h in range(n):
            _flatten_tree(obs_dict.get(h) if obs_dict is not None else None, buf[h])
        obs[:, :TREE_DIM] = normalize_tree(buf)
        for h, a in enumerate(env.agents):
            obs[h, TREE_DIM:] = self._own_features(h, a, self._raw_dist[h])
            if a.state.is_on_map_state() and a.current_configuration is not None:
                (r, c), d = a.current_configuration
                agent_state[h, 0] = r / (HEIGHT - 1)
                agent_state[h, 1] = c / (WIDTH - 1)
                agent_state[h, 4 + int(d)] = 1.0
            else:
                agent_state[h, 0:2] = -1.0
            tr, tc = next(iter(a.targets))[0]
            agent_state[h, 2] = tr / (HEIGHT - 1)
            agent_state[h, 3] = tc / (WIDTH - 1)
        state = np.concatenate([obs.reshape(-1), agent_state.reshape(-1)]).astype(np.float32)
        info = dict(info)
        info["arrived_fraction"] = float(self._arrived.mean())
        info["deadlocked_fraction"] = float(self._deadlocked.mean())
        return TimeStep(
            obs=obs,
            state=state,
            avail=self._avail(),
            reward=reward.astype(np.float32),
            terminated=terminated,
            truncated=truncated,
            info=info,
        )

    # -- protocol ---------------------------------------------------------------------------

    def reset(self, seed: int | None = None) -> TimeStep:
        if seed is None:
            seed = int(self._seeds.integers(0, 2**31 - 1))
        elif isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ConfigError(f"seed must be an int, got {seed!r}")
        # ParamMalfunctionGen caches its random numbers across episodes: start them afresh
        g = self._malfunction_gen
        g._cached_rand = None
        g._cached_broken = None
        g._rand_idx = 0
        obs_dict, _ = self._env.reset(regenerate_rail=True, regenerate_schedule=True, random_seed=int(seed) & 0x7FFFFFFF)
        _clear_rail_caches(self._env.rail)
        # a fixed time limit instead of the timetable's per-episode one (see module docstring)
        self._env._max_episode_steps = self.episode_limit
        self._t = 0
        self._done = False
        self._arrived[:] = False
        self._deadlocked[:] = self._find_deadlocks()
        self._raw_dist = np.array([self._distance(h, a) for h, a in enumerate(self._env.agents)])
        # last finite distance per agent; NaN until there is one (no progress reward before that)
        self._dist = np.where(np.isfinite(self._raw_dist), self._raw_dist, np.nan)
        return self._observe(obs_dict, np.zeros(self.n_agents, dtype=np.float32), False, False, {"native_reward": 0.0})

    def step(self, actions: np.ndarray) -> TimeStep:
        if self._done:
            raise RuntimeError(f"{self.spec.name}: step() called without an episode in progress; call reset()")
        acts = np.asarray(actions)
        if acts.shape != (self.n_agents,):
            raise ValueError(f"{self.spec.name}: actions must have shape ({self.n_agents},), got {acts.shape}")
        acts = acts.astype(np.int64, copy=False)
        if acts.min() < 0 or acts.max() >= N_ACTIONS:
            raise ValueError(f"{self.spec.name}: actions must lie in [0, {N_ACTIONS}), got {acts.tolist()}")
        obs_dict, rewards, _, _ = self._env.step({h: int(a) for h, a in enumerate(acts)})
        self._t += 1
        env = self._env
        TS = self._TrainState
        native = np.array([float(rewards[h]) for h in range(self.n_agents)], dtype=np.float64)

        arrived = np.array([a.state == TS.DONE for a in env.agents], dtype=bool)
        new_arrivals = arrived & ~self._arrived
        self._arrived = arrived
        dead_now = self._find_deadlocks() & ~arrived
        new_dead = dead_now & ~self._deadlocked
        self._deadlocked = self._deadlocked | dead_now  # a deadlock never resolves; keep it paid once

        raw = np.array([self._distance(h, a) for h, a in enumerate(env.agents)])
        finite = np.isfinite(raw)
        new_dist = np.where(finite, raw, self._dist)
        progress = np.nan_to_num(self._dist - new_dist, nan=0.0)
        self._dist = new_dist
        self._raw_dist = raw

        if self.reward_mode == "shaped":
            reward = FINISH_REWARD * new_arrivals + self.progress_coef * progress + self.deadlock_penalty * new_dead
            terminated = bool(np.all(arrived | self._deadlocked))
        else:
            reward = native
            terminated = bool(np.all(arrived))
        truncated = (not terminated) and self._t >= self.episode_limit
        self._done = terminated or truncated
        return self._observe(obs_dict, reward, terminated, truncated, {"native_reward": float(native.sum())})

    def close(self) -> None:
        self._done = True


def make(task: str, seed: int = 0, **options) -> FlatlandEnv:
    """Build the Flatland adapter for ``task``; options ``reward`` ("shaped" | "native"),
    ``episode_limit`` (positive int, default the classic ``8 (W + H + n / cities)``) and
    ``deadlock_penalty`` (number <= 0, default -5; shaped reward only), ``progress_coef`` (number
    >= 0, default 0.01; shaped reward only) and ``auto_depart`` (bool,
    default False: mask waiting at home once a train is ready to depart)."""
    for name in options:
        if name not in OPTIONS:
            raise ConfigError(f"unknown flatland option {name!r}; accepted: {', '.join(OPTIONS)}")
    return FlatlandEnv(task, seed=seed, **options)


__all__ = [
    "TASKS",
    "TASK_PARAMS",
    "OPTIONS",
    "REWARDS",
    "OBS_DIM",
    "TREE_DIM",
    "FINISH_REWARD",
    "PROGRESS_COEF",
    "DEADLOCK_PENALTY",
    "FlatlandEnv",
    "classic_episode_limit",
    "make",
    "normalize_tree",
]
