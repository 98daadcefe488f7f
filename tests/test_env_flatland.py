"""Flatland adapter: protocol conformance, dims, masks, rewards, info and errors."""
from __future__ import annotations

import gc
import subprocess
import sys
import weakref

import numpy as np
import pytest

pytest.importorskip("flatland")

from env_conformance import check_conformance, random_actions  # noqa: E402
from flatland.envs.rail_env_action import RailEnvActions  # noqa: E402

from mabl.envs import MissingDependencyError, make_env  # noqa: E402
from mabl.envs import flatland as F  # noqa: E402
from mabl.errors import ConfigError  # noqa: E402

DEADLOCK_FLAG = F.TREE_DIM + 8  # own feature: deadlocked


@pytest.fixture(scope="module")
def env5():
    return make_env("flatland:5_agents", seed=0)


def greedy_actions(env: F.FlatlandEnv, avail: np.ndarray) -> np.ndarray:
    """Follow the distance map: the available move that gets closest to the target."""
    fe = env._env
    dist = fe.distance_map.get()
    acts = np.zeros(env.n_agents, dtype=np.int64)
    for h, a in enumerate(fe.agents):
        if not avail[h, 1:4].any():
            continue
        if a.state.is_off_map_state():
            acts[h] = int(np.flatnonzero(avail[h, 1:4])[0]) + 1
            continue
        (r, c), d = a.current_configuration
        best, best_a = np.inf, F.DO_NOTHING
        for act in (F.MOVE_LEFT, F.MOVE_FORWARD, F.MOVE_RIGHT):
            if not avail[h, act]:
                continue
            nxt = fe.rail.apply_action_independent(RailEnvActions.from_value(act), ((r, c), int(d)))
            if nxt is None:
                continue
            ((nr, nc), nd), _ = nxt
            if dist[h, nr, nc, int(nd)] < best:
                best, best_a = dist[h, nr, nc, int(nd)], act
        acts[h] = best_a
    return acts


def test_spec_and_dims(env5):
    spec = env5.spec
    assert spec.name == "flatland:5_agents"
    assert (spec.n_agents, spec.obs_dim, spec.action_dim) == (5, 265, 5)
    assert spec.state_dim == 5 * (265 + 8) == 1365
    assert spec.discrete and spec.has_action_mask and not spec.has_win
    assert spec.episode_limit == F.classic_episode_limit("5_agents") == 573
    assert F.TREE_DIM == 252 and F.OBS_DIM == 265


def test_ten_agents_dims():
    env = make_env("flatland:10_agents", seed=0)
    spec = env.spec
    assert (spec.n_agents, spec.obs_dim, spec.state_dim, spec.episode_limit) == (10, 265, 10 * 273, 580)
    ts = env.reset(seed=1)
    assert ts.obs.shape == (10, 265) and ts.state.shape == (2730,)


def test_conformance_full_episode(env5):
    check_conformance(env5, seed=0)


def test_conformance_native_truncates_at_limit():
    env = make_env("flatland:5_agents", seed=0, reward="native", episode_limit=30)
    assert env.spec.episode_limit == 30
    check_conformance(env, seed=2)
    # random trains do not all arrive within 30 steps: the episode is truncated at exactly 30
    rng = np.random.default_rng(0)
    ts = env.reset(seed=2)
    for t in range(30):
        assert not ts.done
        ts = env.step(random_actions(env.spec, ts.avail, rng))
    assert ts.truncated and not ts.terminated
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(5, dtype=np.int64))


def test_state_layout(env5):
    ts = env5.reset(seed=4)
    n, d = 5, F.OBS_DIM
    np.testing.assert_array_equal(ts.state[: n * d], ts.obs.reshape(-1))
    per_agent = ts.state[n * d :].reshape(n, 8)
    # nobody has departed at reset: positions -1 and no heading; targets on the grid
    np.testing.assert_array_equal(per_agent[:, :2], -1.0)
    np.testing.assert_array_equal(per_agent[:, 4:], 0.0)
    assert ((per_agent[:, 2:4] >= 0) & (per_agent[:, 2:4] <= 1)).all()
    assert np.abs(ts.obs).max() <= 1.0


def test_seeding(env5):
    a = env5.reset(seed=7)
    b = env5.reset(seed=7)
    np.testing.assert_array_equal(a.state, b.state)
    c = env5.reset(seed=8)
    assert not np.array_equal(a.state, c.state)
    # reset() without a seed follows the generator started by make(seed)
    e1, e2 = make_env("flatland:5_agents", seed=3), make_env("flatland:5_agents", seed=3)
    np.testing.assert_array_equal(e1.reset().state, e2.reset().state)
    np.testing.assert_array_equal(e1.reset().state, e2.reset().state)


def test_masks_follow_rail_and_state(env5):
    TS = env5._TrainState
    rng = np.random.default_rng(1)
    ts = env5.reset(seed=1)
    for _ in range(150):
        fe = env5._env
        for h, a in enumerate(fe.agents):
            row = ts.avail[h]
            assert row[F.DO_NOTHING]
            only_noop = a.state in (TS.WAITING, TS.DONE) or a.malfunction_handler.in_malfunction or env5._deadlocked[h]
            if only_noop:
                assert row.tolist() == [True, False, False, False, False], (h, a.state)
                continue
            assert row[F.STOP_MOVING]
            cfg = a.current_configuration if a.state.is_on_map_state() else a.initial_configuration
            (r, c), d = cfg
            for act, turn in ((F.MOVE_LEFT, -1), (F.MOVE_RIGHT, 1)):
                if row[act]:  # an available turn really turns
                    nxt = fe.rail.apply_action_independent(RailEnvActions.from_value(act), cfg)
                    assert nxt is not None and nxt[0][1] == (d + turn) % 4
            assert row[F.MOVE_LEFT] or row[F.MOVE_FORWARD] or row[F.MOVE_RIGHT], "every rail cell has an exit"
        ts = env5.step(random_actions(env5.spec, ts.avail, rng))
        if ts.done:
            ts = env5.reset()


def test_arrival_reward_mask_and_arrived_fraction():
    env = make_env("flatland:5_agents", seed=0)
    TS = env._TrainState
    arrivals = 0
    for seed in (1, 2, 4):  # greedy trains reach targets on these maps (they block each other on seed 0)
        ts = env.reset(seed=seed)
        assert ts.info["arrived_fraction"] == 0.0
        prev_arrived = np.zeros(5, dtype=bool)
        while not ts.done:
            ts = env.step(greedy_actions(env, ts.avail))
            arrived = np.array([a.state == TS.DONE for a in env._env.agents])
            assert ts.info["arrived_fraction"] == pytest.approx(arrived.mean())
            for h in np.flatnonzero(arrived & ~prev_arrived):
                # +10 once, plus 0.01 for the last cell (distance 1 -> 0)
                assert ts.reward[h] == pytest.approx(F.FINISH_REWARD + F.PROGRESS_COEF, abs=1e-5)
                arrivals += 1
            for h in np.flatnonzero(arrived & prev_arrived):
                assert ts.reward[h] == 0.0  # paid once
            for h in np.flatnonzero(arrived):
                assert ts.avail[h].tolist() == [True, False, False, False, False]
                assert ts.obs[h, F.TREE_DIM + 6] == 1.0  # status one-hot: DONE
            prev_arrived = arrived
        assert ts.info["arrived_fraction"] == pytest.approx(prev_arrived.mean())
    assert arrivals >= 3, "greedy trains should reach some targets"


def test_deadlock_penalty_and_termination():
    env = make_env("flatland:5_agents", seed=0)
    rng = np.random.default_rng(0)
    penalised = 0
    for ep in range(4):
        ts = env.reset(seed=100 + ep)
        prev = np.zeros(5, dtype=bool)
        while not ts.done:
            ts = env.step(random_actions(env.spec, ts.avail, rng))
            dead = ts.obs[:, DEADLOCK_FLAG] == 1.0
            assert ts.info["deadlocked_fraction"] == pytest.approx(dead.mean())
            for h in np.flatnonzero(dead & ~prev):
                assert ts.reward[h] <= F.DEADLOCK_PENALTY + 0.5
                penalised += 1
            for h in np.flatnonzero(dead):
                assert ts.avail[h].tolist() == [True, False, False, False, False]
            prev = dead
        if ts.terminated:
            done = ts.info["arrived_fraction"] + ts.info["deadlocked_fraction"]
            assert done == pytest.approx(1.0)
    assert penalised > 0, "random trains deadlock within a few episodes"


def test_native_reward_matches_info():
    shaped = make_env("flatland:5_agents", seed=0)
    native = make_env("flatland:5_agents", seed=0, reward="native")
    rng = np.random.default_rng(0)
    a, b = shaped.reset(seed=5), native.reset(seed=5)
    np.testing.assert_array_equal(a.obs, b.obs)
    sum_native, sum_info = 0.0, 0.0
    for _ in range(60):
        acts = random_actions(shaped.spec, a.avail, rng)
        a, b = shaped.step(acts), native.step(acts)
        sum_native += float(b.reward.sum())
        sum_info += a.info["native_reward"]
        if a.done or b.done:
            break
    assert sum_native == pytest.approx(sum_info)


def test_old_rails_are_released(env5):
    """Flatland's class-level lru_caches would keep every old rail alive (memory leak)."""
    rng = np.random.default_rng(0)
    ts = env5.reset(seed=11)
    for _ in range(20):
        ts = env5.step(random_actions(env5.spec, ts.avail, rng))
    old = weakref.ref(env5._env.rail)
    env5.reset(seed=12)
    gc.collect()
    assert old() is None


def test_normalize_tree_handles_infinities():
    nodes = np.full((F.TREE_NODES, F.N_FEATURES), -np.inf)
    nodes[0] = [0, 0, 0, 0, 0, 0, 12, 0, 0, 0, 1, 0]
    nodes[1] = [np.inf, 3, np.inf, 25, np.inf, 4, 8, 1, 0, 30, 1, 2]
    out = F.normalize_tree(nodes)
    assert out.shape == (252,) and np.isfinite(out).all()
    assert out.min() >= -1 and out.max() <= 1
    data = out[:126].reshape(21, 6)
    assert data[1].tolist() == [1.0, 0.3, 1.0, 1.0, 1.0, 0.4]
    assert (data[2:] == -1).all()  # missing branches


def test_errors():
    with pytest.raises(ConfigError, match=r"'bogus'.*accepted: reward, episode_limit, deadlock_penalty, progress_coef, auto_depart"):
        make_env("flatland:5_agents", bogus=1)
    with pytest.raises(ConfigError, match=r"'dense'.*accepted: shaped, native"):
        make_env("flatland:5_agents", reward="dense")
    with pytest.raises(ConfigError, match="episode_limit"):
        make_env("flatland:5_agents", episode_limit=0)
    with pytest.raises(ConfigError, match=r"'3_agents'.*5_agents, 10_agents"):
        make_env("flatland:3_agents")


def test_bad_actions(env5):
    env5.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        env5.step(np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="lie in"):
        env5.step(np.full(5, 5))


def test_missing_dependency(monkeypatch):
    monkeypatch.setitem(sys.modules, "flatland.envs.line_generators", None)
    with pytest.raises(MissingDependencyError, match="flatland-rl"):
        F.make("5_agents")


def test_module_imports_without_flatland():
    code = "import sys; sys.modules['flatland'] = None; import mabl.envs.flatland as m; print(m.TASKS)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "5_agents" in out.stdout


def test_missing_dependency_through_registry_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "flatland", None)
    monkeypatch.setitem(sys.modules, "flatland.envs.rail_env", None)
    with pytest.raises(MissingDependencyError) as e:
        make_env("flatland:5_agents")
    assert "pip install 'mabl[flatland]'" in str(e.value) and "flatland-rl" in str(e.value)
    assert "\n" not in str(e.value)


def test_deadlock_penalty_option():
    """Same episodes with and without the penalty: rewards differ by exactly the penalty, once per deadlock."""
    a_env = make_env("flatland:5_agents", seed=0)
    b_env = make_env("flatland:5_agents", seed=0, deadlock_penalty=0)
    assert b_env.deadlock_penalty == 0.0 and a_env.deadlock_penalty == F.DEADLOCK_PENALTY == -5.0
    rng = np.random.default_rng(0)
    paid = 0
    for ep in range(3):
        a, b = a_env.reset(seed=100 + ep), b_env.reset(seed=100 + ep)
        prev = np.zeros(5, dtype=bool)
        while not a.done:
            acts = random_actions(a_env.spec, a.avail, rng)
            a, b = a_env.step(acts), b_env.step(acts)
            dead = a.obs[:, DEADLOCK_FLAG] == 1.0
            new = dead & ~prev
            np.testing.assert_allclose(a.reward - b.reward, np.where(new, -5.0, 0.0), atol=1e-5)
            paid += int(new.sum())
            prev = dead
            assert a.terminated == b.terminated and a.truncated == b.truncated
    assert paid > 0
    for bad in (1.0, True, "x", float("nan")):
        with pytest.raises(ConfigError, match="deadlock_penalty must be a number <= 0"):
            make_env("flatland:5_agents", deadlock_penalty=bad)


def test_auto_depart_masks_waiting_at_home():
    env = make_env("flatland:5_agents", seed=0, auto_depart=True)
    plain = make_env("flatland:5_agents", seed=0)
    TS = env._TrainState
    rng = np.random.default_rng(0)
    ts, ref = env.reset(seed=3), plain.reset(seed=3)
    np.testing.assert_array_equal(ts.obs, ref.obs)
    seen_ready = 0
    for _ in range(60):
        for h, a in enumerate(env._env.agents):
            if a.state == TS.READY_TO_DEPART:
                seen_ready += 1
                assert not ts.avail[h, F.DO_NOTHING] and not ts.avail[h, F.STOP_MOVING]
                assert ts.avail[h, F.MOVE_LEFT:F.STOP_MOVING].any()
                # the only difference to the plain mask
                np.testing.assert_array_equal(ts.avail[h, 1:4], ref.avail[h, 1:4])
            else:
                np.testing.assert_array_equal(ts.avail[h], ref.avail[h])
        acts = random_actions(env.spec, ts.avail, rng)
        ts, ref = env.step(acts), plain.step(acts)
        if ts.done:
            break
    assert seen_ready > 0
    with pytest.raises(ConfigError, match="auto_depart must be a bool"):
        make_env("flatland:5_agents", auto_depart="yes")


def test_progress_coef_option():
    a_env = make_env("flatland:5_agents", seed=0, deadlock_penalty=0)
    b_env = make_env("flatland:5_agents", seed=0, deadlock_penalty=0, progress_coef=0.1)
    rng = np.random.default_rng(1)
    a, b = a_env.reset(seed=7), b_env.reset(seed=7)
    moved = 0
    for _ in range(80):
        acts = random_actions(a_env.spec, a.avail, rng)
        a, b = a_env.step(acts), b_env.step(acts)
        arrive_a = np.where(a.reward >= F.FINISH_REWARD - 1, F.FINISH_REWARD, 0.0)
        np.testing.assert_allclose(b.reward - arrive_a, 10 * (a.reward - arrive_a), atol=1e-4)
        moved += int((a.reward != 0).sum())
        if a.done:
            break
    assert moved > 0
    for bad in (-0.1, True, None):
        with pytest.raises(ConfigError, match="progress_coef must be a number >= 0"):
            make_env("flatland:5_agents", progress_coef=bad)
