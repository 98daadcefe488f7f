"""Shared checks that an adapter honours the :class:`mabl.envs.MultiAgentEnv` protocol."""
from __future__ import annotations

import numpy as np

from mabl.envs.base import EnvSpec, MultiAgentEnv, TimeStep


def random_actions(spec: EnvSpec, avail: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if spec.discrete:
        acts = np.empty(spec.n_agents, dtype=np.int64)
        for i in range(spec.n_agents):
            choices = np.flatnonzero(avail[i])
            assert choices.size > 0, f"agent {i} has no available action"
            acts[i] = rng.choice(choices)
        return acts
    return rng.uniform(-1.0, 1.0, size=(spec.n_agents, spec.action_dim)).astype(np.float32)


def check_timestep(spec: EnvSpec, ts: TimeStep) -> None:
    assert isinstance(ts, TimeStep)
    assert ts.obs.shape == (spec.n_agents, spec.obs_dim) and ts.obs.dtype == np.float32
    assert ts.state.shape == (spec.state_dim,) and ts.state.dtype == np.float32
    assert ts.avail.shape == (spec.n_agents, spec.action_dim) and ts.avail.dtype == np.bool_
    assert ts.reward.shape == (spec.n_agents,) and ts.reward.dtype == np.float32
    assert np.isfinite(ts.obs).all() and np.isfinite(ts.state).all() and np.isfinite(ts.reward).all()
    if not spec.has_action_mask:
        if spec.action_dims is None:
            assert ts.avail.all()
        else:  # continuous actions of unequal agents: avail marks the dimensions each agent drives
            expected = np.arange(spec.action_dim)[None, :] < np.asarray(spec.action_dims)[:, None]
            np.testing.assert_array_equal(ts.avail, expected)
    assert ts.avail.any(axis=1).all(), "every agent needs at least one available action"


def run_episode(env: MultiAgentEnv, seed: int, max_steps: int | None = None):
    """Random episode; returns the list of timesteps (reset first) and the actions taken."""
    spec = env.spec
    rng = np.random.default_rng(seed)
    ts = env.reset(seed=seed)
    check_timestep(spec, ts)
    assert not ts.done
    steps, actions = [ts], []
    limit = spec.episode_limit if max_steps is None else max_steps
    for _ in range(limit):
        a = random_actions(spec, ts.avail, rng)
        ts = env.step(a)
        check_timestep(spec, ts)
        steps.append(ts)
        actions.append(a)
        if ts.done:
            break
    return steps, actions


def check_conformance(env: MultiAgentEnv, seed: int = 0, max_steps: int | None = None) -> None:
    """Spaces, masks, state, termination vs truncation and seeding give the same episode."""
    spec = env.spec
    assert isinstance(env, MultiAgentEnv)
    assert spec.n_agents >= 1 and spec.obs_dim > 0 and spec.state_dim > 0 and spec.action_dim > 0
    steps, actions = run_episode(env, seed, max_steps)
    last = steps[-1]
    if max_steps is None:
        assert last.done, "an episode must end within the episode limit"
        assert not (last.terminated and last.truncated)
        if last.truncated:
            assert len(actions) == spec.episode_limit, "truncation only at the time limit"
    # same seed, same actions -> same episode
    ts = env.reset(seed=seed)
    np.testing.assert_array_equal(ts.obs, steps[0].obs)
    np.testing.assert_array_equal(ts.state, steps[0].state)
    for t, a in enumerate(actions):
        ts = env.step(a)
        np.testing.assert_allclose(ts.obs, steps[t + 1].obs, rtol=0, atol=1e-6)
        np.testing.assert_allclose(ts.reward, steps[t + 1].reward, rtol=0, atol=1e-6)
        assert ts.terminated == steps[t + 1].terminated and ts.truncated == steps[t + 1].truncated
