"""MaMuJoCo adapter: protocol conformance, dims, action rescaling, seeding and errors."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("gymnasium_robotics")

from env_conformance import check_conformance  # noqa: E402

from mabl.envs import MissingDependencyError, make_env  # noqa: E402
from mabl.envs import mamujoco as M  # noqa: E402
from mabl.errors import ConfigError  # noqa: E402


@pytest.fixture(scope="module")
def humanoid():
    return make_env("mamujoco:Humanoid-9|8", seed=0)


def test_spec_and_dims(humanoid):
    spec = humanoid.spec
    assert spec.name == "mamujoco:Humanoid-9|8"
    assert (spec.n_agents, spec.obs_dim, spec.state_dim, spec.action_dim) == (2, 244, 348, 9)
    assert not spec.discrete and not spec.has_action_mask and not spec.has_win
    assert spec.episode_limit == 1000
    ts = humanoid.reset(seed=0)
    # avail marks the driven dimensions: agent 1's ninth is padding
    assert spec.action_dims == (9, 8)
    assert ts.avail.shape == (2, 9) and ts.avail[0].all() and ts.avail[1, :8].all() and not ts.avail[1, 8]
    # one-hot agent ids after the padded observation; agent 1 (170 values) is zero-padded to 242
    np.testing.assert_array_equal(ts.obs[:, 242:], np.eye(2, dtype=np.float32))
    assert (ts.obs[1, 170:242] == 0).all()
    assert np.abs(ts.obs[0, 170:242]).sum() > 0
    np.testing.assert_array_equal(ts.reward, np.zeros(2, dtype=np.float32))


def test_conformance_humanoid(humanoid):
    check_conformance(humanoid, seed=0, max_steps=50)


def test_conformance_humanoid_full_episode(humanoid):
    # random humanoids fall within a few dozen steps: terminated, not truncated
    check_conformance(humanoid, seed=1)


def test_standup_conformance_and_truncation():
    env = make_env("mamujoco:HumanoidStandup-9|8", seed=0)
    assert (env.spec.obs_dim, env.spec.state_dim, env.spec.action_dim) == (244, 348, 9)
    check_conformance(env, seed=0, max_steps=20)
    ts = env.reset(seed=0)
    zeros = np.zeros((2, 9), dtype=np.float32)
    for t in range(1000):
        assert not ts.done
        ts = env.step(zeros)
    assert ts.truncated and not ts.terminated  # HumanoidStandup never terminates


def test_team_reward_broadcast(humanoid):
    humanoid.reset(seed=0)
    ts = humanoid.step(np.zeros((2, 9), dtype=np.float32))
    assert ts.reward.dtype == np.float32 and ts.reward[0] == ts.reward[1] != 0


def test_action_rescaling(humanoid, monkeypatch):
    seen = {}
    inner = humanoid._env
    orig = inner.step

    def spy(actions):
        seen.update({k: np.array(v) for k, v in actions.items()})
        return orig(actions)

    monkeypatch.setattr(inner, "step", spy)
    humanoid.reset(seed=0)
    acts = np.array([[1.0] * 9, [-1.0] * 8 + [0.7]], dtype=np.float32)
    humanoid.step(acts)
    hi0 = inner.action_space("agent_0").high
    lo1 = inner.action_space("agent_1").low
    assert seen["agent_0"].shape == (9,) and seen["agent_1"].shape == (8,)
    np.testing.assert_allclose(seen["agent_0"], hi0)
    np.testing.assert_allclose(seen["agent_1"], lo1)
    np.testing.assert_allclose(hi0, 0.4)
    humanoid.step(np.zeros((2, 9), dtype=np.float32))
    np.testing.assert_allclose(seen["agent_0"], 0.0, atol=1e-7)


def test_agent1_ignores_last_column(humanoid):
    rng = np.random.default_rng(0)
    acts = rng.uniform(-1, 1, size=(2, 9)).astype(np.float32)
    humanoid.reset(seed=3)
    a = humanoid.step(acts)
    acts[1, 8] = -acts[1, 8]
    humanoid.reset(seed=3)
    b = humanoid.step(acts)
    np.testing.assert_array_equal(a.obs, b.obs)
    np.testing.assert_array_equal(a.reward, b.reward)


def test_seeding():
    e1, e2 = make_env("mamujoco:Humanoid-9|8", seed=5), make_env("mamujoco:Humanoid-9|8", seed=5)
    for _ in range(2):
        np.testing.assert_array_equal(e1.reset().state, e2.reset().state)
    a, b = e1.reset(seed=1).state, e1.reset(seed=2).state
    assert not np.array_equal(a, b)


def test_bad_actions(humanoid):
    humanoid.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        humanoid.step(np.zeros((2, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="finite"):
        humanoid.step(np.full((2, 9), np.nan, dtype=np.float32))


def test_errors():
    with pytest.raises(ConfigError, match=r"unknown mamujoco option 'reward'"):
        make_env("mamujoco:Humanoid-9|8", reward="native")
    with pytest.raises(ConfigError, match=r"'Ant-2x4'.*Humanoid-9\|8, HumanoidStandup-9\|8"):
        make_env("mamujoco:Ant-2x4")


def test_missing_dependency(monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnasium_robotics", None)
    with pytest.raises(MissingDependencyError, match="gymnasium-robotics"):
        M.make("Humanoid-9|8")


def test_module_imports_without_dependency_and_no_adroit_notice():
    code = "import sys; sys.modules['gymnasium_robotics'] = None; import mabl.envs.mamujoco as m; print(m.TASKS)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Humanoid-9|8" in out.stdout
    code = "from mabl.envs import make_env; make_env('mamujoco:Humanoid-9|8').reset(seed=0)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Adroit" not in out.stderr + out.stdout


def test_symlog_observation_and_state_by_default():
    raw = make_env("mamujoco:Humanoid-9|8", seed=0, obs_norm="none", reward_scale=1.0)
    norm = make_env("mamujoco:Humanoid-9|8", seed=0)
    assert norm.obs_norm == "symlog" and norm.reward_scale == M.REWARD_SCALE["Humanoid-9|8"] == 0.1
    rng = np.random.default_rng(0)
    a, b = raw.reset(seed=4), norm.reset(seed=4)
    for t in range(30):
        # elementwise and fixed: each agent's normalised obs is a function of its own raw obs only
        np.testing.assert_allclose(b.obs[:, :242], M.symlog(a.obs[:, :242].astype(np.float64)), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(b.obs[:, 242:], np.eye(2, dtype=np.float32))
        assert (b.obs[1, 170:242] == 0).all()
        np.testing.assert_allclose(b.state, M.symlog(a.state.astype(np.float64)), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(b.reward, 0.1 * a.reward, rtol=1e-6)
        np.testing.assert_allclose(b.info["raw_return"], a.info["raw_return"], rtol=1e-6)
        if a.done:
            break
        act = rng.uniform(-1, 1, (2, 9)).astype(np.float32)
        a, b = raw.step(act), norm.step(act)
    assert t > 10
    # raw values are large (contact forces), normalised ones small
    assert np.abs(a.state).max() > 20 and np.abs(b.state).max() < 10


def test_symlog_by_hand():
    x = np.array([-np.e + 1, -1.0, 0.0, 0.5, 1000.0])
    np.testing.assert_allclose(M.symlog(x), [-1.0, -np.log(2), 0.0, np.log(1.5), np.log(1001.0)])


def test_raw_return_accumulates_unscaled_reward():
    env = make_env("mamujoco:HumanoidStandup-9|8", seed=0)
    assert env.reward_scale == 0.01
    ts = env.reset(seed=0)
    assert ts.info["raw_return"] == 0.0
    total = 0.0
    for _ in range(5):
        ts = env.step(np.zeros((2, 9), dtype=np.float32))
        total += float(ts.reward[0]) / 0.01
    assert ts.info["raw_return"] == pytest.approx(total, rel=1e-5)
    assert 10 < ts.info["raw_return"] / 5 < 100  # HumanoidStandup pays ~30 per step


def test_option_errors():
    with pytest.raises(ConfigError, match=r"'zscore'.*symlog, none"):
        make_env("mamujoco:Humanoid-9|8", obs_norm="zscore")
    for bad in (0, -1.0, "1", True, float("nan")):
        with pytest.raises(ConfigError, match="reward_scale must be a positive number"):
            make_env("mamujoco:Humanoid-9|8", reward_scale=bad)


def test_missing_dependency_through_registry_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnasium_robotics", None)
    with pytest.raises(MissingDependencyError) as e:
        make_env("mamujoco:Humanoid-9|8")
    assert "pip install 'mabl[mamujoco]'" in str(e.value) and "gymnasium-robotics" in str(e.value)
    assert "\n" not in str(e.value)
