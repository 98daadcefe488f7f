"""SMAX adapter: protocol conformance, dims, termination vs truncation, masks, errors."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from mabl.envs import MissingDependencyError, make_env
from mabl.errors import ConfigError

jaxmarl = pytest.importorskip("jaxmarl", reason="smax tests need jaxmarl")  # noqa: F841

from env_conformance import check_conformance, random_actions  # noqa: E402

from mabl.envs import smax  # noqa: E402

STOP = 4


@pytest.fixture(scope="module")
def env_3m():
    return make_env("smax:3m", seed=0)


@pytest.fixture(scope="module")
def env_3s_vs_4z():
    return make_env("smax:3s_vs_4z", seed=0)


def test_import_does_not_need_jax():
    code = "import sys, mabl.envs.smax as m; assert 'jax' not in sys.modules and 'jaxmarl' not in sys.modules; print(m.TASKS)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "3s_vs_4z" in out.stdout


def test_tasks_and_limits():
    assert set(smax.TASKS) >= {"3m", "2s3z", "3s_vs_5z", "3s5z_vs_3s6z", "3s_vs_4z", "6z_vs_24zg"}
    assert "2s_vs_1sc" not in smax.TASKS and "corridor" not in smax.TASKS
    assert smax.EPISODE_LIMITS["3m"] == 60 and smax.EPISODE_LIMITS["6z_vs_24zg"] == 400
    assert smax.EPISODE_LIMITS["3s_vs_4z"] == 200 and smax.EPISODE_LIMITS["3s5z_vs_3s6z"] == 170


@pytest.mark.parametrize("fixture", ["env_3m", "env_3s_vs_4z"])
def test_conformance(fixture, request):
    env = request.getfixturevalue(fixture)
    check_conformance(env, seed=3)
    check_conformance(env, seed=4, max_steps=10)


def test_spec_and_dims(env_3s_vs_4z, env_3m):
    spec = env_3s_vs_4z.spec
    assert spec.name == "smax:3s_vs_4z"
    assert (spec.n_agents, spec.obs_dim, spec.state_dim, spec.action_dim) == (3, 88, 84, 9)
    assert spec.discrete and spec.has_action_mask and spec.has_win and spec.episode_limit == 200
    assert env_3m.spec.episode_limit == 60 and env_3m.spec.action_dim == 8


def test_reset_reward_zero_and_shared_reward(env_3m):
    ts = env_3m.reset(seed=1)
    assert not ts.reward.any() and ts.info == {}
    rng = np.random.default_rng(1)
    total = 0.0
    while not ts.done:
        ts = env_3m.step(random_actions(env_3m.spec, ts.avail, rng))
        assert np.all(ts.reward == ts.reward[0])  # SMAX's reward is shared by the team
        total += float(ts.reward[0])
    assert isinstance(ts.info["won"], bool)
    assert 0.0 <= total <= smax.DEFAULT_REWARD_SCALE * (2.0 + 1e-4)


def test_focus_fire_wins_are_terminations(env_3m):
    """Walk east (action 1, towards the enemy) and shoot the first enemy in range: wins some 3m battles."""
    for seed in range(20):
        ts = env_3m.reset(seed=seed)
        while not ts.done:
            acts = [5 + np.flatnonzero(av[5:])[0] if av[5:].any() else (1 if av[1] else STOP) for av in ts.avail]
            ts = env_3m.step(np.array(acts))
        if ts.info["won"]:
            assert ts.terminated and not ts.truncated
            assert ts.reward[0] >= smax.DEFAULT_REWARD_SCALE  # the win bonus, scaled
            return
    pytest.fail("focus fire never won 3m in 20 seeds")


def test_reset_without_seed_continues_stream():
    a, b = smax.make("3m", seed=7), smax.make("3m", seed=7)
    a1, a2 = a.reset(), a.reset()
    b1, b2 = b.reset(), b.reset()
    np.testing.assert_array_equal(a1.state, b1.state)
    np.testing.assert_array_equal(a2.state, b2.state)
    assert not np.array_equal(a1.state, a2.state)


def test_battle_state_is_committed_to_the_cpu(env_3m):
    """The episode's key and state are committed to JAX's CPU device, so the jitted reset/step run
    there even where jax's default device is a GPU (checked on an H200: BENCHMARKS.md, "Learner on a
    CUDA GPU"); on this CPU-only machine the check is that they are committed at all."""
    env_3m.reset(seed=3)
    after_reset = env_3m._buf
    env_3m.step(np.zeros(3, dtype=np.int64))
    for buf in (after_reset, env_3m._buf):
        assert {d.platform for d in buf.devices()} == {"cpu"}
        assert buf._committed  # uncommitted arrays would follow jax's default device


def test_time_limit_is_truncation():
    env = smax.make("3m", seed=0, episode_limit=5)
    assert env.spec.episode_limit == 5
    ts = env.reset(seed=0)
    for t in range(5):
        assert not ts.done
        ts = env.step(np.full(env.spec.n_agents, STOP))
    assert ts.truncated and not ts.terminated
    assert ts.info == {"won": False}
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.full(env.spec.n_agents, STOP))


def test_dead_units_may_only_stop(env_3m):
    """Random allies lose units in 3m; a dead ally's mask is exactly {stop} and its obs is zero."""
    rng = np.random.default_rng(0)
    seen_dead = False
    for ep in range(6):
        ts = env_3m.reset(seed=100 + ep)
        while not ts.done:
            ts = env_3m.step(random_actions(env_3m.spec, ts.avail, rng))
            dead = ~ts.avail[:, :4].any(axis=1)
            if dead.any():
                seen_dead = True
                only_stop = np.zeros(env_3m.spec.action_dim, dtype=bool)
                only_stop[STOP] = True
                assert (ts.avail[dead] == only_stop).all()
                assert not ts.obs[dead].any()
        if seen_dead:
            break
    assert seen_dead, "no ally died in 6 random 3m episodes"


def test_bad_actions_rejected(env_3m):
    env_3m.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        env_3m.step(np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        env_3m.step(np.array([0, 0, 8]))


def test_unbuildable_and_unknown_maps():
    with pytest.raises(ConfigError) as e:
        make_env("smax:2s_vs_1sc")
    msg = str(e.value)
    assert "'2s_vs_1sc'" in msg and "spine crawler" in msg and "3s_vs_4z" in msg and "\n" not in msg
    with pytest.raises(ConfigError) as e:
        make_env("smax:corridor")
    assert "6z_vs_24zg" in str(e.value)
    with pytest.raises(ConfigError) as e:
        make_env("smax:nope")
    msg = str(e.value)
    assert "'nope'" in msg and "3m" in msg and "6z_vs_24zg" in msg and "\n" not in msg


def test_bad_options():
    with pytest.raises(ConfigError, match="'foo'.*episode_limit"):
        smax.make("3m", foo=1)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="episode_limit"):
            smax.make("3m", episode_limit=bad)


def test_missing_jaxmarl(monkeypatch):
    monkeypatch.setitem(sys.modules, "jaxmarl", None)
    with pytest.raises(MissingDependencyError, match="jaxmarl"):
        smax.make("3m")


def test_reward_scale_option():
    native = make_env("smax:3m", seed=0, reward_scale=1.0)
    scaled = make_env("smax:3m", seed=0)
    rng1, rng2 = np.random.default_rng(0), np.random.default_rng(0)
    a, b = native.reset(seed=3), scaled.reset(seed=3)
    while not a.done:
        a = native.step(random_actions(native.spec, a.avail, rng1))
        b = scaled.step(random_actions(scaled.spec, b.avail, rng2))
        np.testing.assert_allclose(b.reward, smax.DEFAULT_REWARD_SCALE * a.reward, rtol=1e-6)
    with pytest.raises(ConfigError, match="reward_scale"):
        make_env("smax:3m", reward_scale=-1)
    with pytest.raises(ConfigError, match="accepted: episode_limit, reward, reward_scale, normalize_state"):
        make_env("smax:3m", reward_sclae=2)


def _smac_reward_by_hand(state0, state1, won, n_allies, n_enemies, max_health):
    """SMAC's reward_battle (reward_only_positive) from two SMAX world states: per unit the state
    starts with [health fraction, x, y, cooldown, 6 type bits]."""
    per = 10
    h0 = state0[: per * (n_allies + n_enemies)].reshape(-1, per)[n_allies:, 0] * max_health
    h1 = state1[: per * (n_allies + n_enemies)].reshape(-1, per)[n_allies:, 0] * max_health
    alive0 = h0 > 0
    damage = np.sum(np.where(alive0, h0 - h1, 0.0))
    kills = np.sum(alive0 & (h1 <= 0))
    most = 10 * n_enemies + 200 + n_enemies * max_health
    return 20 * (damage + 10 * kills + 200 * won) / most


def test_smac_reward_option():
    """reward="smac": SMAC's damage + 10 per kill + 200 per win, scaled so a perfect win is worth 20,
    checked against a hand computation from the global state; same battle as the SMAX reward."""
    smac, native = make_env("smax:3m", seed=0, reward="smac"), make_env("smax:3m", seed=0)
    kills_seen = wins = 0
    for seed in range(12):
        a, b = smac.reset(seed=seed), native.reset(seed=seed)
        total = 0.0
        while not a.done:
            # walk east and shoot the first enemy in range, a few random actions: kills, wins and losses
            rng = np.random.default_rng([seed, len(a.state)])
            acts = np.array([rng.choice(np.flatnonzero(av)) if rng.random() < 0.05 else
                             5 + np.flatnonzero(av[5:])[0] if av[5:].any() else (1 if av[1] else STOP) for av in a.avail])
            prev = a.state
            a, b = smac.step(acts), native.step(acts)
            np.testing.assert_array_equal(a.obs, b.obs)  # the option changes the reward only
            want = _smac_reward_by_hand(prev, a.state, bool(a.info.get("won", False)), 3, 3, 45.0)
            np.testing.assert_allclose(a.reward, np.full(3, want, np.float32), rtol=1e-5, atol=1e-5)
            kills_seen += int(a.reward[0] > 20 * 10 / 365 - 1e-4)
            total += float(a.reward[0])
        wins += bool(a.info["won"])
        if a.info["won"]:
            assert total == pytest.approx(20.0, abs=1e-3)  # everything there is to earn
    assert kills_seen > 0 and wins > 0, (kills_seen, wins)
    scaled = make_env("smax:3m", seed=0, reward="smac", reward_scale=1.0)
    ts = scaled.reset(seed=0)
    while not ts.done:
        ts = scaled.step(np.array([5 + np.flatnonzero(av[5:])[0] if av[5:].any() else 1 for av in ts.avail]))
    assert 0.0 <= ts.reward[0] <= 1.0
    with pytest.raises(ConfigError, match="unknown smax option reward 'sc2'; accepted: smax, smac"):
        make_env("smax:3m", reward="sc2")


@pytest.mark.parametrize("task", ["3m", "3s_vs_4z"])
def test_state_normalized(task):
    """With ``normalize_state`` the global state is SMAX's world_state scaled per feature: positions by the map size,
    cooldowns clipped at 0 and divided by the unit type's weapon cooldown, type ids by the largest
    id; nothing else moves."""
    raw_env = make_env(f"smax:{task}", seed=0)  # the default: SMAX's own numbers
    env = make_env(f"smax:{task}", seed=0, normalize_state=True)
    jenv = smax._compiled(task)[0]
    n_units, per_unit = jenv.num_allies + jenv.num_enemies, len(jenv.own_features)
    rng1, rng2 = np.random.default_rng(1), np.random.default_rng(1)
    raw, ts = raw_env.reset(seed=5), env.reset(seed=5)
    seen = []
    while True:
        units_raw = raw.state[: n_units * per_unit].reshape(n_units, per_unit)
        units = ts.state[: n_units * per_unit].reshape(n_units, per_unit)
        assert raw.state.max() > 5  # SMAX's own state is in map units
        np.testing.assert_allclose(units[:, 1], units_raw[:, 1] / jenv.map_width, rtol=1e-6)
        np.testing.assert_allclose(units[:, 2], units_raw[:, 2] / jenv.map_height, rtol=1e-6)
        cd = np.asarray(jenv.unit_type_weapon_cooldowns)[np.asarray(jenv.scenario)]
        np.testing.assert_allclose(units[:, 3], np.maximum(units_raw[:, 3], 0) / cd, rtol=1e-6)
        keep = np.ones(per_unit, bool)
        keep[1:4] = False
        np.testing.assert_array_equal(units[:, keep], units_raw[:, keep])  # health, type one-hot
        tail, tail_raw = ts.state[n_units * per_unit:], raw.state[n_units * per_unit:]
        np.testing.assert_array_equal(tail[:n_units], tail_raw[:n_units])  # teams
        np.testing.assert_allclose(tail[n_units:], tail_raw[n_units:] / (jenv.unit_type_bits - 1), rtol=1e-6)
        np.testing.assert_array_equal(ts.obs, raw.obs)
        seen.append(ts.state)
        if raw.done:
            break
        raw = raw_env.step(random_actions(raw_env.spec, raw.avail, rng1))
        ts = env.step(random_actions(env.spec, ts.avail, rng2))
    seen = np.stack(seen)
    assert seen.min() >= 0 and seen.max() < 1.5  # about [0, 1] (SMAX jitters cooldowns)
    with pytest.raises(ConfigError, match="normalize_state"):
        make_env(f"smax:{task}", normalize_state=1)
