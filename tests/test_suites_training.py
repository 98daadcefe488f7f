"""Smoke training on every optional suite (tiny preset), and continuous actions end to end.

Each run goes through :func:`mabl.train.train` exactly as the CLI does: collect with the
decentralized policy, world-model and MAPPO updates, a greedy evaluation, a checkpoint.
"""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from mabl.config import make_config
from mabl.envs.base import EnvSpec
from mabl.learner import MABLLearner
from mabl.policy import Actor, tanh_gaussian_log_prob
from mabl.train import load_for_eval, train
from mabl.world_model import BiLevelWorldModel


def _tiny(env: str, tmp_path, steps: int, **run):
    over = {"run": {"steps": steps, "run_dir": str(tmp_path / "run"), "threads": 1, "eval_episodes": 1,
                    "min_buffer": 20, **run}}
    return make_config("tiny", env, over)


def _finite_losses(run_dir) -> list[dict]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    trained = [r for r in rows if "model/loss" in r]
    assert trained, "no learner update happened"
    for r in trained:
        for k, v in r.items():
            if k.startswith(("model/", "policy/")):
                assert math.isfinite(v), (k, v)
    return trained


def _eval_rows(run_dir) -> list[dict]:
    return list(csv.DictReader((run_dir / "eval.csv").open()))


def test_mamujoco_humanoid_trains_continuous(tmp_path):
    pytest.importorskip("gymnasium_robotics")
    cfg = _tiny("mamujoco:Humanoid-9|8", tmp_path, steps=300)
    summary = train(cfg)
    run_dir = tmp_path / "run"
    assert summary["env_steps"] >= 300
    trained = _finite_losses(run_dir)
    assert "model/avail" not in trained[-1]  # no availability head without an action mask
    assert trained[-1]["model/action"] > -1e3  # Gaussian NLL of the action decoder
    ev = _eval_rows(run_dir)
    assert ev and "raw_return" in ev[-1] and float(ev[-1]["raw_return"]) > 0
    ckpts = sorted((run_dir / "checkpoints").glob("ckpt_*.pt"))
    assert ckpts
    cfg2, learner, _ = load_for_eval(ckpts[-1])
    assert not learner.spec.discrete and learner.model.avail_head is None
    # the global recurrence takes the joint continuous action of both agents
    n, a = learner.spec.n_agents, learner.spec.action_dim
    assert learner.model.global_in.in_dims[1] == n * a == 18
    assert learner.spec.action_dims == (9, 8) and learner.algo.actor.dim_mask.tolist()[1] == [True] * 8 + [False]
    assert cfg2.run.env == "mamujoco:Humanoid-9|8"


def test_flatland_trains_with_masks_and_reports_arrivals(tmp_path):
    pytest.importorskip("flatland")
    cfg = _tiny("flatland:5_agents", tmp_path, steps=150, env_options={"episode_limit": 40})
    summary = train(cfg)
    run_dir = tmp_path / "run"
    assert summary["env_steps"] >= 150
    trained = _finite_losses(run_dir)
    assert "model/avail" in trained[-1]
    assert cfg.ppo.critic_input == "global"  # Flatland's critic sees only the global latent (App. B.1)
    ev = _eval_rows(run_dir)
    assert ev and "arrived_fraction" in ev[-1] and 0.0 <= float(ev[-1]["arrived_fraction"]) <= 1.0
    assert "eval_arrived_fraction" in summary
    assert list((run_dir / "checkpoints").glob("ckpt_*.pt"))


# ------------------------------------------------------------------------------------------
# continuous actions through the stack, without an environment

SPEC_C = EnvSpec("test:cont", n_agents=2, obs_dim=6, state_dim=5, action_dim=3, discrete=False, has_action_mask=False)


def test_tanh_gaussian_log_prob_by_hand():
    # one dimension: u = 0.5, mean 0.2, std 0.5 -> log N(u) - log(1 - tanh(u)^2)
    u, mean, std = 0.5, 0.2, 0.5
    normal = -0.5 * ((u - mean) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)
    expected = normal - math.log(1 - math.tanh(u) ** 2)
    got = tanh_gaussian_log_prob(torch.tensor([u]), torch.tensor([mean]), torch.tensor([math.log(std)]))
    assert float(got) == pytest.approx(expected, abs=1e-6)
    # several dims sum, and match torch.distributions' tanh-transformed normal (also for large |u|)
    u = torch.tensor([[-3.0, 0.1, 6.0]])
    mean, log_std = torch.tensor([[0.5, -0.2, 1.0]]), torch.tensor([[0.0, -1.0, 0.3]])
    base = torch.distributions.Normal(mean, log_std.exp())
    a = torch.tanh(u.double()).float()
    by_torch = (base.log_prob(u) - torch.distributions.TanhTransform().log_abs_det_jacobian(u, a)).sum(-1)
    assert torch.allclose(tanh_gaussian_log_prob(u, mean, log_std), by_torch, atol=1e-4)
    # and the density integrates to 1 over a in (-1, 1) (1-D, midpoint rule in a)
    a_grid = torch.linspace(-1, 1, 200_001, dtype=torch.float64)[1:-1]
    u_grid = torch.atanh(a_grid)
    dens = tanh_gaussian_log_prob(u_grid.unsqueeze(-1), torch.tensor([[0.3]], dtype=torch.float64),
                                  torch.tensor([[-0.5]], dtype=torch.float64)).exp()
    assert float((dens * (a_grid[1] - a_grid[0])).sum()) == pytest.approx(1.0, abs=1e-3)


def test_continuous_actor_samples_in_bounds_and_is_deterministic_at_mean():
    torch.manual_seed(0)
    actor = Actor(8, 3, 16, 2, discrete=False)
    feat = torch.randn(50, 8)
    raw, env_a, logp = actor.sample(feat)
    assert raw.shape == env_a.shape == (50, 3) and logp.shape == (50,)
    assert (env_a.abs() <= 1).all() and torch.allclose(env_a, torch.tanh(raw))
    mean, _ = actor.params(feat)
    raw_d, env_d, _ = actor.sample(feat, deterministic=True)
    assert torch.equal(raw_d, mean) and torch.allclose(env_d, torch.tanh(mean))
    assert torch.equal(actor.env_to_model_action(raw), env_a)


def test_world_model_continuous_heads_and_joint_action():
    cfg = make_config("tiny", "mamujoco:Humanoid-9|8").model
    m = BiLevelWorldModel(SPEC_C, cfg)
    assert m.avail_head is None
    T, B, n, a = 5, 2, SPEC_C.n_agents, SPEC_C.action_dim
    g = torch.Generator().manual_seed(0)
    act = torch.rand(T, B, n, a, generator=g) * 2 - 1
    is_first = torch.zeros(T, B, dtype=torch.bool)
    is_first[0] = True
    act[0] = 0
    batch = {"obs": torch.randn(T, B, n, 6, generator=g), "state": torch.randn(T, B, 5, generator=g),
             "prev_action": act, "reward": torch.randn(T, B, n, generator=g), "cont": torch.ones(T, B),
             "avail": torch.ones(T, B, n, a, dtype=torch.bool), "is_first": is_first}
    torch.manual_seed(1)
    total, metrics, post = m.loss(batch)
    assert torch.isfinite(total) and "avail" not in metrics
    # the action decoder's term is the Gaussian NLL 0.5 * ||pred - a_t||^2 of the action taken at t
    # (the prev_action of t+1), averaged over steps, batch and agents
    fa, fg = m.features(post)
    with torch.no_grad():
        pred = m.action_decoder(torch.cat([fa, fg], -1)[:-1]).float()
    by_hand = (0.5 * (pred - act[1:]).pow(2).sum(-1)).sum() / ((T - 1) * B * n)
    assert float(metrics["action"]) == pytest.approx(float(by_hand), rel=1e-5)
    # the global recurrence sees the joint action: changing agent 1's action moves agent 0's h^g
    start = post.map(lambda x: x[-1])
    a0 = torch.zeros(B, n, a)
    a1 = a0.clone()
    a1[:, 1] = 0.9
    with torch.no_grad():
        s0, s1 = m.imagine_step(start, a0), m.imagine_step(start, a1)
    assert not torch.allclose(s0.h_g[:, 0], s1.h_g[:, 0])
    assert torch.allclose(s0.h_a[:, 0], s1.h_a[:, 0])  # agent level only sees its own action
    assert not torch.allclose(s0.h_a[:, 1], s1.h_a[:, 1])


def test_learner_update_on_continuous_spec_is_finite():
    from mabl.buffer import ReplayBuffer

    cfg = make_config("tiny", "mamujoco:Humanoid-9|8")
    learner = MABLLearner(SPEC_C, cfg, torch.device("cpu"))
    buf = ReplayBuffer(SPEC_C, 1000)
    rng = np.random.default_rng(0)
    for _ in range(4):
        T = 12
        ep = {"obs": rng.normal(size=(T + 1, 2, 6)).astype(np.float32), "state": rng.normal(size=(T + 1, 5)).astype(np.float32),
              "prev_action": np.concatenate([np.zeros((1, 2, 3)), rng.uniform(-1, 1, (T, 2, 3))]).astype(np.float32),
              "reward": rng.normal(size=(T + 1, 2)).astype(np.float32), "cont": np.ones(T + 1, np.float32),
              "avail": np.ones((T + 1, 2, 3), bool), "is_first": np.eye(1, T + 1, dtype=bool)[0]}
        ep["cont"][-1] = 0.0
        buf.add_episode(ep)
    out = learner.update(buf, rng)
    assert all(math.isfinite(v) for v in out.values() if isinstance(v, float))
    assert "policy/entropy" in out and "model/action" in out


def test_padding_action_dims_are_never_sampled_and_add_no_log_prob():
    """Unequal agents (EnvSpec.action_dims): agent 1's padding dimension is exactly 0 and contributes
    nothing to log-probabilities or entropy, whether the mask comes from the env (avail) or the actor."""
    from mabl.policy import Actor

    torch.manual_seed(0)
    actor = Actor(8, 3, 16, 1, discrete=False, dim_mask=EnvSpec("t:c", 2, 8, 4, 3, discrete=False, action_dims=(3, 2)).action_dim_mask())
    feat = torch.randn(50, 2, 8)
    for avail in (None, torch.tensor([[True, True, True], [True, True, False]]).expand(50, 2, 3)):
        mean, log_std = actor.params(feat, avail)
        raw, act, logp = actor.sample_from_params(mean, log_std)
        assert (raw[:, 1, 2] == 0).all() and (act[:, 1, 2] == 0).all() and (raw[:, 0, 2] != 0).all()
        # agent 1's log-prob and entropy equal those of a 2-dimensional actor on its first two dims
        full_mean, full_log_std = actor.params_from_out(actor.net(feat), torch.ones(50, 2, 3, dtype=torch.bool))
        two = tanh_gaussian_log_prob(raw[:, 1, :2], full_mean[:, 1, :2], full_log_std[:, 1, :2])
        assert torch.allclose(logp[:, 1], two, atol=1e-5)
        lp, ent = actor.log_prob_entropy_from_params(mean, log_std, raw)
        assert torch.allclose(lp, logp, atol=1e-5)
        ent_two = (full_log_std[:, 1, :2] + 0.5 * math.log(2 * math.pi * math.e)).sum(-1)
        assert torch.allclose(ent[:, 1], ent_two, atol=1e-5)
        assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    # deterministic acting: the padding is 0 too
    mean, log_std = actor.params(feat)
    raw, _, logp = actor.sample_from_params(mean, log_std, deterministic=True)
    assert (raw[:, 1, 2] == 0).all() and torch.isfinite(logp).all()
