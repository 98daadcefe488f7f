"""Decentralized execution, proven on real SMAX episodes: agent i's action distribution is a
function of its own observation history only (never the state, never another agent's obs)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mabl.config import make_config
from mabl.learner import MABLLearner

pytest.importorskip("jaxmarl", reason="SMAX needs the smax extra")  # the CI installs it; this guards local partial installs


@pytest.fixture(scope="module")
def setup():
    from mabl.envs import make_env

    env = make_env("smax:3m", seed=0)
    cfg = make_config("tiny", "smax:3m")
    torch.manual_seed(0)
    learner = MABLLearner(env.spec, cfg)
    # random (non-trivial) weights everywhere so that a leak would show
    with torch.no_grad():
        for p in learner.model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return env, learner


def record_episode(env, policy, seed):
    """obs/avail streams and per-agent policy logits of one greedy episode."""
    ts = env.reset(seed=seed)
    carry = policy.initial(env.spec.n_agents)
    obs, avail, logits = [], [], []
    while not ts.done:
        o, a = torch.as_tensor(ts.obs), torch.as_tensor(ts.avail)
        _, act, carry, lg = policy.step(o, a, carry, deterministic=True)
        obs.append(o), avail.append(a), logits.append(lg)
        ts = env.step(act.numpy())
    return torch.stack(obs), torch.stack(avail), torch.stack(logits)


def replay(policy, obs, avail):
    carry = policy.initial(obs.shape[1])
    out = []
    for t in range(len(obs)):
        _, _, carry, lg = policy.step(obs[t], avail[t], carry, deterministic=True)
        out.append(lg)
    return torch.stack(out)


def test_policy_holds_no_global_level(setup):
    _, learner = setup
    policy_params = {id(p) for p in learner.policy.parameters()}
    model = learner.model
    for name in ("state_encoder", "global_in", "global_gru", "global_post", "global_prior"):
        assert not any(id(p) in policy_params for p in getattr(model, name).parameters()), name
    import inspect

    assert "state" not in inspect.signature(learner.policy.step).parameters


@pytest.mark.parametrize("seed", [0, 1])
def test_agent_i_depends_only_on_its_own_observations(setup, seed):
    env, learner = setup
    policy = learner.policy
    obs, avail, logits = record_episode(env, policy, seed)
    assert len(obs) > 5
    n = env.spec.n_agents
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        # everything of the other agents replaced by noise
        noisy = obs.clone()
        others = [j for j in range(n) if j != i]
        noisy[:, others] = torch.randn(noisy[:, others].shape, generator=g) * 3
        lg = replay(policy, noisy, avail)
        assert torch.allclose(lg[:, i], logits[:, i], atol=1e-5), f"agent {i} is influenced by other agents"
        # agent i alone, as it would run on its own device
        alone = replay(policy, obs[:, i:i + 1], avail[:, i:i + 1])
        assert torch.allclose(alone[:, 0], logits[:, i], atol=1e-5), f"agent {i} alone differs"
    # and the observations do matter: perturbing agent 0's own obs changes its policy
    mine = obs.clone()
    mine[:, 0] += torch.randn(mine[:, 0].shape, generator=g)
    assert not torch.allclose(replay(policy, mine, avail)[:, 0], logits[:, 0], atol=1e-4)


def test_jacobian_is_block_diagonal(setup):
    """d logits_i / d obs_j = 0 for j != i through the whole recurrent step."""
    env, learner = setup
    policy = learner.policy
    ts = env.reset(seed=3)
    o = torch.as_tensor(ts.obs)
    carry = policy.initial(env.spec.n_agents)
    for _ in range(3):  # a non-trivial recurrent carry
        _, act, carry, _ = policy.step(o, torch.as_tensor(ts.avail), carry, deterministic=True)
        ts = env.step(act.numpy())
        o = torch.as_tensor(ts.obs)

    def feat_fn(x):
        return policy.actor.params(_post_features(policy, x, carry))[0]

    jac = torch.autograd.functional.jacobian(feat_fn, o)  # [N, A, N, O]
    n = env.spec.n_agents
    for i in range(n):
        for j in range(n):
            block = jac[i, :, j]
            if i == j:
                assert block.abs().sum() > 0
            else:
                assert torch.count_nonzero(block) == 0


def _post_features(policy, obs, carry):
    """Differentiable version of the posterior features used in step (probabilities instead of samples)."""
    h = policy.agent_gru(torch.relu(policy.agent_in(carry.z_a, carry.prev_action)), carry.h_a)
    logits = policy.agent_post[2](torch.relu(policy.agent_post[0](h, policy.obs_encoder(obs))))
    probs = logits.unflatten(-1, (policy.n_cat, -1)).softmax(-1).flatten(-2)
    return torch.cat([probs, h], -1)


def test_execution_uses_decentralized_policy_in_training_loop(setup, tmp_path):
    """The collector calls the policy with one agent's row per agent: shuffle agents -> same actions."""
    env, learner = setup
    obs, avail, logits = record_episode(env, learner.policy, 5)
    perm = torch.tensor([2, 0, 1])
    lg = replay(learner.policy, obs[:, perm], avail[:, perm])
    assert torch.allclose(lg, logits[:, perm], atol=1e-5)
    assert np.isfinite(logits.numpy()).all()
