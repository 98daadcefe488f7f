"""MAPPO in imagination: GAE and the clipped loss by hand, imagination masks, a training round."""
from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from mabl.config import make_config
from mabl.errors import ConfigError
from mabl.envs.base import EnvSpec
from mabl.mappo import MAPPO, gae, imagine, ppo_clip_loss, reach_weights
from mabl.world_model import BiLevelWorldModel

SPEC = EnvSpec("test:toy", n_agents=3, obs_dim=11, state_dim=7, action_dim=5, discrete=True, has_action_mask=True)


def test_gae_by_hand():
    r = torch.tensor([[1.0], [2.0]])
    v = torch.tensor([[0.5], [1.0], [3.0]])
    c = torch.tensor([[1.0], [0.0]])  # the state after step 1 is terminal
    g, lam = 0.9, 0.5
    d1 = 2.0 + g * 0.0 * 3.0 - 1.0
    d0 = 1.0 + g * 1.0 * 1.0 - 0.5
    a1 = d1
    a0 = d0 + g * lam * 1.0 * a1
    adv, ret = gae(r, v, c, g, lam)
    assert torch.allclose(adv.squeeze(), torch.tensor([a0, a1]))
    assert torch.allclose(ret.squeeze(), torch.tensor([a0 + 0.5, a1 + 1.0]))


def test_ppo_clip_loss_by_hand():
    logp_old = torch.zeros(3)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1]))
    adv = torch.tensor([1.0, -1.0, 2.0])
    loss = ppo_clip_loss(logp, logp_old, adv, 0.2)
    assert torch.allclose(loss, torch.tensor([-1.2, 0.8, -2.2]), atol=1e-6)


def test_reach_weights():
    c = torch.tensor([0.5, 0.5, 1.0])
    assert torch.allclose(reach_weights(c), torch.tensor([1.0, 0.5, 0.25]))


def _setup(**ppo):
    cfg = make_config("tiny", "smax:3m", {"ppo": ppo} if ppo else None)
    torch.manual_seed(0)
    model = BiLevelWorldModel(SPEC, cfg.model)
    algo = MAPPO(SPEC, model, cfg.ppo)
    start = model.initial((7,))
    start.z_a.copy_(torch.nn.functional.one_hot(torch.randint(0, 4, (7, 3, 4)), 4).flatten(-2).float())
    return cfg, model, algo, start


def test_imagination_respects_predicted_availability():
    cfg, model, algo, start = _setup()
    traj = imagine(model, algo.actor, start, horizon=6)
    assert traj.feat_a.shape[:3] == (7, 7, 3) and traj.raw.shape == (6, 7, 3)
    assert traj.avail is not None
    chosen = traj.avail.gather(-1, traj.raw.unsqueeze(-1)).squeeze(-1)
    no_option = ~traj.avail.any(-1)  # rows with nothing available fall back to all actions
    assert (chosen | no_option).all()
    assert ((traj.cont >= 0) & (traj.cont <= 1)).all()


def test_train_round_updates_actor_and_critic():
    cfg, model, algo, start = _setup()
    for p in model.parameters():
        p.requires_grad_(False)
    before_a = [p.clone() for p in algo.actor.parameters()]
    before_c = [p.clone() for p in algo.critic.parameters()]
    model_before = [p.clone() for p in model.parameters()]
    stats = algo.train_round(model, start, contextlib.nullcontext)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert any(not torch.equal(a, b) for a, b in zip(before_a, algo.actor.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before_c, algo.critic.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(model_before, model.parameters()))  # the model is frozen
    assert stats["entropy_coef"] < cfg.ppo.entropy  # annealed once per minibatch


def test_critic_mixes_agents_actor_does_not():
    cfg, model, algo, start = _setup()
    fa, fg = model.features(start)
    x = algo.critic_features(fa, fg)
    v = algo.critic(x)
    x2 = x.clone()
    x2[:, 1] += 1.0  # change agent 1's features only
    v2 = algo.critic(x2)
    assert not torch.allclose(v[:, 0], v2[:, 0])  # the centralized critic attends across agents
    p1, _ = algo.actor.params(fa)
    fa2 = fa.clone()
    fa2[:, 1] += 1.0
    p2, _ = algo.actor.params(fa2)
    assert torch.allclose(p1[:, 0], p2[:, 0]) and torch.allclose(p1[:, 2], p2[:, 2])


def test_continuous_actor_log_prob_is_consistent():
    from mabl.policy import Actor

    torch.manual_seed(0)
    actor = Actor(6, 2, 16, 1, discrete=False)
    feat = torch.randn(4000, 6)
    raw, act, logp = actor.sample(feat)
    assert (act.abs() <= 1).all()
    lp2, ent = actor.log_prob_entropy(feat, raw)
    assert torch.allclose(logp, lp2, atol=1e-4)
    # density of a = tanh(u) integrates to ~1 over (-1, 1)^2 for a fixed feature
    f = feat[:1].expand(200 * 200, 6)
    g = torch.linspace(-0.995, 0.995, 200)
    a = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    u = torch.atanh(a)
    with torch.no_grad():
        lp, _ = actor.log_prob_entropy(f, u)
    mass = lp.exp().sum() * (g[1] - g[0]) ** 2
    assert 0.9 < float(mass) < 1.05


def test_no_bootstrap_ends_return_at_horizon():
    """ppo.bootstrap=False: V(s_H) does not enter the return; True: it does (γ c V(s_H))."""
    from types import SimpleNamespace

    from mabl.config import PPOConfig
    from mabl.mappo import MAPPO, Imagined

    H, M, N = 3, 2, 2
    reward = torch.ones(H, M, N)
    cont = torch.ones(H, M, N)
    values = torch.zeros(H + 1, M, N)
    values[-1] = 100.0
    traj = Imagined(feat_a=torch.zeros(H + 1, M, N, 1), feat_g=None, raw=torch.zeros(H, M, N, dtype=torch.long),
                    logp=torch.zeros(H, M, N), avail=None, reward=reward, cont=cont)
    g, lam = 0.9, 1.0
    for boot, tail in ((False, 0.0), (True, 100.0)):
        cfg = PPOConfig(gamma=g, gae_lambda=lam, normalize_advantage=False, bootstrap=boot)
        _, ret, _ = MAPPO._advantages(SimpleNamespace(cfg=cfg), traj, values)
        expect = 1 + g + g**2 + g**3 * tail  # λ=1: the discounted sum from step 0
        assert torch.allclose(ret[0], torch.full((M, N), expect))


def test_return_range_scale_against_hand_computation():
    """advantage_norm="return_range": A / max(floor, S), S the EMA of P95 - P5 of the returns; the first
    batch sets S, later ones move it by (1 - decay); small advantages stay small (no standardization)."""
    from types import SimpleNamespace

    from mabl.config import PPOConfig
    from mabl.mappo import MAPPO, Imagined, return_range_ema

    H, M, N = 1, 101, 1
    reward = torch.arange(M, dtype=torch.float32).view(H, M, N) * 0.1  # returns 0.0, 0.1, ..., 10.0
    traj = Imagined(feat_a=torch.zeros(H + 1, M, N, 1), feat_g=None, raw=torch.zeros(H, M, N, dtype=torch.long),
                    logp=torch.zeros(H, M, N), avail=None, reward=reward, cont=torch.ones(H, M, N))
    values = torch.zeros(H + 1, M, N)
    cfg = PPOConfig(advantage_norm="return_range", return_range_decay=0.9, bootstrap=False, team_reward=False)
    ctx = SimpleNamespace(cfg=cfg, return_range=None)
    adv, ret, _ = MAPPO._advantages(ctx, traj, values)
    assert ctx.return_range == pytest.approx(9.0, abs=1e-4)  # P95 - P5 of 0..10 in steps of 0.1
    assert torch.allclose(adv, ret / 9.0, atol=1e-5)
    adv2, _, _ = MAPPO._advantages(ctx, dataclasses.replace(traj, reward=reward * 0.01), values)  # spread 0.09
    assert ctx.return_range == pytest.approx(0.9 * 9.0 + 0.1 * 0.09, abs=1e-4)
    assert return_range_ema(torch.arange(101.0) * 0.001, None, 0.9) == pytest.approx(0.09, abs=1e-5)
    # below the floor the advantages are not scaled up: model noise stays noise-sized
    ctx.return_range = None
    adv3, ret3, _ = MAPPO._advantages(ctx, dataclasses.replace(traj, reward=reward * 0.01), values)
    assert torch.allclose(adv3, ret3) and float(adv3.abs().max()) < 0.11
    # MAPPO's default standardizes the same small batch to unit scale
    adv4, _, _ = MAPPO._advantages(SimpleNamespace(cfg=PPOConfig(bootstrap=False, team_reward=False)), dataclasses.replace(traj, reward=reward * 0.01), values)
    assert float(adv4.std()) == pytest.approx(1.0, abs=1e-3)


def test_return_range_survives_a_checkpoint_and_bad_values_are_rejected():
    from mabl.config import ConfigError
    from mabl.learner import MABLLearner

    cfg = make_config("tiny", "smax:3m", {"ppo": {"advantage_norm": "return_range"}})
    a = MABLLearner(SPEC, cfg)
    a.algo.return_range = 3.25
    b = MABLLearner(SPEC, cfg)
    b.algo.load_state_dict(a.algo.state_dict())
    assert b.algo.return_range == 3.25
    fresh = a.algo.state_dict()
    del fresh["return_range"]  # a checkpoint written before the option
    b.algo.load_state_dict(fresh)
    assert b.algo.return_range is None
    with pytest.raises(ConfigError, match="advantage_norm.*batch_std.*return_range"):
        make_config("tiny", "smax:3m", {"ppo": {"advantage_norm": "percentile"}})
    with pytest.raises(ConfigError, match="return_range_decay"):
        make_config("tiny", "smax:3m", {"ppo": {"return_range_decay": 1.5}})


def test_presets_bootstrap_and_update_schedule():
    """`paper` is Table 3 as written (bootstrapped returns, an update after every episode);
    `fast` ends imagined returns at the horizon and updates every 4 episodes (README, Presets)."""
    paper, fast = make_config("paper", "smax:3m"), make_config("fast", "smax:3m")
    assert paper.ppo.bootstrap and paper.run.train_every == 1 and paper.ppo.updates == 4 and paper.ppo.epochs == 5
    assert not fast.ppo.bootstrap and fast.run.train_every == 4
    # a user override still wins over the preset
    assert make_config("fast", "smax:3m", {"ppo": {"bootstrap": True}, "run": {"train_every": 1}}).ppo.bootstrap


def test_imagination_never_starts_from_a_terminal_state():
    from mabl.learner import MABLLearner

    cfg = make_config("tiny", "smax:3m")
    learner = MABLLearner(SPEC, cfg)
    T, B, n = 5, 2, SPEC.n_agents
    g = torch.Generator().manual_seed(0)
    cont = torch.ones(T, B)
    cont[2, 0] = 0.0  # sequence 0 ends (terminal) at step 2, the next episode starts at step 3
    is_first = torch.zeros(T, B, dtype=torch.bool)
    is_first[0] = True
    is_first[3, 0] = True
    batch = {"obs": torch.randn(T, B, n, SPEC.obs_dim, generator=g), "state": torch.randn(T, B, SPEC.state_dim, generator=g),
             "prev_action": torch.zeros(T, B, n, SPEC.action_dim), "cont": cont, "is_first": is_first}
    torch.manual_seed(1)  # posterior samples: the same draws for both passes
    starts = learner.starts(batch)
    assert starts.h_a.shape[:2] == (T * B - 1, n)
    torch.manual_seed(1)
    with torch.no_grad():
        post, _, _ = learner.model.observe(batch["obs"], batch["state"], batch["prev_action"], batch["is_first"])
    flat = post.h_a.flatten(0, 1)
    terminal = 2 * B + 0  # row of (t=2, b=0) in the time-major flattening
    kept = torch.cat([flat[:terminal], flat[terminal + 1:]])
    assert torch.allclose(starts.h_a.float(), kept.float(), atol=1e-5)
    batch["cont"] = torch.ones(T, B)
    assert learner.starts(batch).h_a.shape[:2] == (T * B, n)


def test_adapt_entropy_coef_by_hand():
    import math

    from mabl.mappo import ENTROPY_COEF_MAX, adapt_entropy_coef

    assert adapt_entropy_coef(0.01, 0.5, 0.0, 0.03, 0.99, 0.01) == pytest.approx(0.0099)  # off: the paper's annealing
    up = adapt_entropy_coef(0.01, 0.02, 0.12, 0.5, 0.99, 0.001)  # too deterministic: the bonus grows
    assert up == pytest.approx(0.01 * math.exp(0.5 * 0.10))
    down = adapt_entropy_coef(0.01, 0.40, 0.12, 0.5, 0.99, 0.001)  # too random: it shrinks
    assert down == pytest.approx(0.01 * math.exp(-0.5 * 0.28))
    assert adapt_entropy_coef(0.011, 1.6, 0.12, 0.5, 0.99, 0.01) == 0.01  # never below the floor (ppo.entropy)
    assert adapt_entropy_coef(0.9, 0.0, 5.0, 10.0, 1.0, 0.01) == ENTROPY_COEF_MAX


@pytest.mark.parametrize("fast", [False, True])
def test_entropy_target_steers_the_coefficient_by_the_weighted_minibatch_entropy(fast):
    """With ppo.entropy_target the coefficient follows the controller, fed the minibatch entropy
    weighted by the reach weights; replayed by hand from the actor's own entropies."""
    import math

    from mabl.fast import Speed

    target, lr = 5.0, 0.5  # above any 5-action entropy (log 5 = 1.61): the coefficient must grow every step
    cfg, model, algo, start = _setup(entropy_target=target, entropy_target_lr=lr, epochs=2)
    if fast:
        model.speed = Speed(fast_critic=True)
    for p in model.parameters():
        p.requires_grad_(False)
    seen = []
    orig = algo._next_entropy_coef

    def spy(ent, w):
        seen.append((float((w * ent.detach().float()).sum() / w.sum()), algo.entropy_coef))
        orig(ent, w)

    algo._next_entropy_coef = spy
    stats = algo.train_round(model, start, contextlib.nullcontext)
    assert len(seen) >= 2
    coef = cfg.ppo.entropy  # the starting coefficient
    for ent, before in seen:
        assert before == pytest.approx(coef)
        assert 0.0 <= ent <= math.log(5) + 1e-5
        coef = min(1.0, coef * math.exp(lr * (target - ent)))
    assert stats["entropy_coef"] == pytest.approx(coef) and coef > cfg.ppo.entropy


def test_entropy_target_config_errors():
    from mabl.errors import ConfigError

    with pytest.raises(ConfigError, match="entropy_target"):
        make_config("tiny", "smax:3m", {"ppo": {"entropy_target": -0.1}})
    with pytest.raises(ConfigError, match="ppo.entropy must be > 0"):
        make_config("tiny", "smax:3m", {"ppo": {"entropy_target": 0.1, "entropy": 0.0}})


def test_explore_from_params_draws_available_actions_and_scores_them_under_the_actor():
    """ppo.imagine_explore: eps=0 keeps the actor's actions, eps=1 replaces every one by a uniform
    draw among the available actions; the log-probability is the actor's, at the drawn action."""
    from mabl.policy import Actor, masked_logits

    torch.manual_seed(0)
    actor = Actor(4, 5, 8, 1, True)
    avail = torch.tensor([True, False, True, True, False]).expand(4000, 5)
    logits = masked_logits(torch.tensor([9.0, 0.0, -3.0, 0.0, 0.0]).expand(4000, 5), avail)  # peaked on action 0
    raw = torch.zeros(4000, dtype=torch.long)
    same, logp0, ex0 = actor.explore_from_params(logits, raw, 0.0)
    assert torch.equal(same, raw) and not ex0.any()
    assert torch.allclose(logp0, logits.log_softmax(-1)[:, 0])
    drawn, logp, ex = actor.explore_from_params(logits, raw, 1.0)
    assert torch.equal(ex, drawn != raw)
    counts = torch.bincount(drawn, minlength=5).float() / 4000
    assert counts[1] == 0 and counts[4] == 0  # never an unavailable action
    assert torch.allclose(counts[[0, 2, 3]], torch.full((3,), 1 / 3), atol=0.04)  # uniform, not the actor's 0-peak
    assert torch.allclose(logp, logits.log_softmax(-1).gather(-1, drawn.unsqueeze(-1)).squeeze(-1))
    half, _, _ = actor.explore_from_params(logits, raw, 0.5)
    changed = float((half != 0).float().mean())  # swapped with p=0.5, and then 2/3 land off action 0
    assert abs(changed - 0.5 * 2 / 3) < 0.04


@pytest.mark.parametrize("fused", [False, True])
def test_imagination_exploration_respects_availability_and_scores_under_the_actor(fused):
    """With ppo.imagine_explore=1 every imagined action is uniform over the predicted-available ones
    (so it no longer follows the actor), and the stored log-probabilities are the actor's."""
    from mabl.fast import Speed

    cfg, model, algo, start = _setup(imagine_explore=1.0)
    model.speed = Speed(fused_heads=fused)
    with torch.no_grad():  # a strongly peaked actor: nearly always action 0 when it may
        algo.actor.net[-1].bias.copy_(torch.tensor([12.0, 0.0, 0.0, 0.0, 0.0]))
    torch.manual_seed(1)
    traj = imagine(model, algo.actor, start, 6, cfg.ppo.imagine_explore)
    chosen = traj.avail.gather(-1, traj.raw.unsqueeze(-1)).squeeze(-1)
    assert (chosen | ~traj.avail.any(-1)).all()
    zero_ok = traj.avail[..., 0]
    assert float((traj.raw[zero_ok] != 0).float().mean()) > 0.3  # the actor alone would pick 0 there
    logp, _ = algo.actor.log_prob_entropy(traj.feat_a[:-1].float(), traj.raw, traj.avail)
    assert torch.allclose(traj.logp, logp, atol=2e-2)
    assert traj.explored.shape == traj.raw.shape and traj.explored[zero_ok & (traj.raw != 0)].all()
    torch.manual_seed(1)
    greedy_like = imagine(model, algo.actor, start, 6)  # explore off: the peaked actor's action 0
    assert greedy_like.explored is None
    assert float((greedy_like.raw[greedy_like.avail[..., 0]] == 0).float().mean()) > 0.99


def test_imagine_explore_config_errors():
    from mabl.errors import ConfigError

    with pytest.raises(ConfigError, match="imagine_explore"):
        make_config("tiny", "smax:3m", {"ppo": {"imagine_explore": 1.5}})
    cfg = make_config("tiny", "smax:3m", {"ppo": {"imagine_explore": 0.1}})
    cont = EnvSpec("test:cont", n_agents=2, obs_dim=5, state_dim=4, action_dim=3, discrete=False)
    with pytest.raises(ConfigError, match="ppo.imagine_explore needs discrete actions"):
        MAPPO(cont, BiLevelWorldModel(cont, cfg.model), cfg.ppo)


def _round_on_both_paths(fast: bool, **ppo):
    """One training round with these ``ppo`` options on the plain or the fast critic path: finite
    statistics, the actor moved. Returns ``(model, algo, start, stats)``."""
    from mabl.fast import Speed

    cfg, model, algo, start = _setup(**ppo)
    if fast:
        model.speed = Speed(fast_critic=True, fused_heads=True)
    for p in model.parameters():
        p.requires_grad_(False)
    before = [p.clone() for p in algo.actor.parameters()]
    stats = algo.train_round(model, start, contextlib.nullcontext)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, algo.actor.parameters()))
    return model, algo, start, stats


@pytest.mark.parametrize("fast", [False, True])
def test_train_round_with_imagination_exploration(fast):
    _round_on_both_paths(fast, imagine_explore=0.2)


def test_explored_actions_get_no_negative_advantage():
    """ppo.imagine_explore: after normalization, an exploration draw's advantage is clipped at 0 from
    below (it may be raised, never lowered); the actor's own actions keep theirs."""
    from mabl.mappo import Imagined

    cfg, model, algo, start = _setup(imagine_explore=0.5)
    torch.manual_seed(3)
    H, M, N = 5, 4, 3
    traj = Imagined(feat_a=torch.zeros(H + 1, M, N, 2), feat_g=None, raw=torch.zeros(H, M, N, dtype=torch.long),
                    logp=torch.zeros(H, M, N), avail=None, reward=torch.randn(H, M, N), cont=torch.ones(H, M, N),
                    explored=torch.rand(H, M, N) < 0.5)
    values = torch.randn(H + 1, M, N)
    adv, ret, _ = algo._advantages(traj, values)
    plain, ret0, _ = algo._advantages(dataclasses.replace(traj, explored=None), values)
    assert torch.equal(ret, ret0)
    assert torch.equal(adv[~traj.explored], plain[~traj.explored])
    assert torch.equal(adv[traj.explored], plain[traj.explored].clamp_min(0))
    assert (plain[traj.explored] < 0).any()  # the case the clip is for occurs here


# ------------------------------------------------------------------------------------------
# ppo.counterfactual_samples: per-agent baselines from one-step model branches

def _toy_counterfactual(N=3, A=4, M=5, H=2, logits=(0.0, 1.0, -1.0, 0.5), avail=None):
    """An actor whose policy is ``softmax(logits)`` everywhere, an imagined trajectory with random
    taken actions, and a toy branch: agent n's reward is 1 if it plays action 0, the next state's
    value V_n is 2 if agent n plays action 1, continuation 1."""
    from mabl.mappo import Imagined
    from mabl.policy import Actor

    actor = Actor(6, A, 8, 2, True, None)
    with torch.no_grad():
        actor.net[-1].weight.zero_()
        actor.net[-1].bias.copy_(torch.tensor(logits))
    raw = torch.randint(0, A, (H, M, N))
    traj = Imagined(feat_a=torch.randn(H + 1, M, N, 6), feat_g=None, raw=raw, logp=torch.zeros(H, M, N), avail=avail,
                    reward=torch.zeros(H, M, N), cont=torch.ones(H, M, N))

    def branch(t, act):
        assert act.shape == (act.shape[0], N, M, N, A)
        return act[..., 0], torch.ones(act.shape[:-1]), 2.0 * act[..., 1]

    return actor, traj, branch


def test_counterfactual_baseline_by_hand():
    """b_j = E_{a'_j ~ π_j}[r(a'_j, a_-j) + γ V_j]: with the toy branch, for the team reward
    (mean_n≠j 1{a_n = 0} + π_j(0)) / N + 2γ π_j(1); for agent j's own reward π_j(0) + 2γ π_j(1);
    without bootstrap the last step has no value term. Predicted availability masks the draws."""
    from mabl.mappo import counterfactual_baseline

    torch.manual_seed(0)
    N, g = 3, 0.9
    actor, traj, branch = _toy_counterfactual(N=N)
    pi = torch.softmax(torch.tensor([0.0, 1.0, -1.0, 0.5]), 0)
    K = 4000
    team = counterfactual_baseline(branch, actor, traj, K, g, True, True)
    zero = (traj.raw == 0).float()  # [H, M, N]
    others = zero.sum(-1, keepdim=True) - zero
    assert team.shape == traj.raw.shape
    assert torch.allclose(team, (others + pi[0]) / N + 2 * g * pi[1], atol=0.05)
    own = counterfactual_baseline(branch, actor, traj, K, g, True, False)
    assert torch.allclose(own, (pi[0] + 2 * g * pi[1]).expand_as(own), atol=0.06)
    no_boot = counterfactual_baseline(branch, actor, traj, K, g, False, False)
    assert torch.allclose(no_boot[:-1], own[:-1], atol=0.08)
    assert torch.allclose(no_boot[-1], pi[0].expand_as(no_boot[-1]), atol=0.04)
    # action 1 unavailable: its value never enters, π renormalizes over the rest
    avail = torch.ones(2, 5, N, 4, dtype=torch.bool)
    avail[..., 1] = False
    actor, traj, branch = _toy_counterfactual(N=N, avail=avail)
    masked = counterfactual_baseline(branch, actor, traj, K, g, True, False)
    pi_m = torch.softmax(torch.tensor([0.0, -1.0, 0.5]), 0)
    assert torch.allclose(masked, pi_m[0].expand_as(masked), atol=0.04)


def test_counterfactual_baseline_ignores_the_agents_own_action():
    """A valid baseline: agent j's own imagined action never enters b_j (same draws, other result
    only for the agents that saw j's action among the others')."""
    from mabl.mappo import counterfactual_baseline

    torch.manual_seed(1)
    actor, traj, branch = _toy_counterfactual()
    torch.manual_seed(2)
    b = counterfactual_baseline(branch, actor, traj, 3, 0.9, True, True)
    traj.raw[..., 0] = (traj.raw[..., 0] + 1) % 4  # agent 0 acts otherwise everywhere
    torch.manual_seed(2)
    b2 = counterfactual_baseline(branch, actor, traj, 3, 0.9, True, True)
    assert torch.equal(b[..., 0], b2[..., 0])
    assert not torch.equal(b[..., 1:], b2[..., 1:])


@pytest.mark.parametrize("ablation", [{}, {"single_global": True}, {"bilevel": False}])
def test_imagined_state_reads_the_carry_back(ablation):
    """The carry rebuilt from the trajectory's features steps, under the taken actions, to the
    trajectory's next deterministic states (h^a, h^g) exactly."""
    from mabl.mappo import imagined_state

    cfg = make_config("tiny", "smax:3m", {"model": ablation} if ablation else None)
    torch.manual_seed(0)
    model = BiLevelWorldModel(SPEC, cfg.model)
    algo = MAPPO(SPEC, model, cfg.ppo)
    traj = imagine(model, algo.actor, model.initial((4,)), horizon=3)
    S = model.stoch
    from mabl.fast import PLAIN, Speed

    for t in range(3):
        st = imagined_state(model, traj, t)
        act = algo.actor.env_to_model_action(traj.raw[t])
        nxt = model.imagine_step(st, act)
        assert torch.allclose(nxt.h_a, traj.feat_a[t + 1][..., S:], atol=1e-6)
        if model.bilevel:
            assert st.h_g.shape[-2] == model.n_global
            assert torch.allclose(model._expand_g(nxt.h_g), traj.feat_g[t + 1][..., S:], atol=1e-6)
        # imagination with forced actions (the branches' path), plain and fused: the same next carry
        for speed in (PLAIN, Speed(fused_heads=True)):
            model.speed = speed
            one = imagine(model, algo.actor, st, 1, actions=act.unsqueeze(0))
            assert torch.equal(one.raw[0], act) and one.avail is None and not one.logp.any()
            assert torch.allclose(one.feat_a[1][..., S:].float(), traj.feat_a[t + 1][..., S:], atol=1e-5)
            if model.bilevel:
                assert torch.allclose(one.feat_g[1][..., S:].float(), traj.feat_g[t + 1][..., S:], atol=1e-5)
        model.speed = PLAIN


@pytest.mark.parametrize("fast", [False, True])
def test_train_round_with_counterfactual_baseline(fast):
    """Both critic paths train with the model-branch baselines; the baselines move the advantages,
    not the critic's targets."""
    model, algo, start, stats = _round_on_both_paths(fast, counterfactual_samples=2)
    assert stats["cf_gap"] > 0
    traj = imagine(model, algo.actor, start, horizon=4)
    values = torch.randn(5, *traj.raw.shape[1:])
    baseline = torch.randn(traj.raw.shape)
    algo.cfg = dataclasses.replace(algo.cfg, normalize_advantage=False)
    adv, ret, _ = algo._advantages(traj, values, baseline)
    adv0, ret0, _ = algo._advantages(traj, values)
    assert torch.equal(ret, ret0)
    assert torch.allclose(adv, adv0 + values[:-1] - baseline)
    with pytest.raises(Exception, match="counterfactual_samples"):
        make_config("tiny", "smax:3m", {"ppo": {"counterfactual_samples": -1}})


def _continuous_setup(**ppo):
    """A tiny model (frozen) and MAPPO on a two-agent continuous-action spec, with these ``ppo`` options."""
    cfg = make_config("tiny", "smax:3m", {"ppo": ppo})
    cont = EnvSpec("test:cont", n_agents=2, obs_dim=5, state_dim=4, action_dim=3, discrete=False)
    torch.manual_seed(0)
    model = BiLevelWorldModel(cont, cfg.model)
    algo = MAPPO(cont, model, cfg.ppo)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, algo


def test_counterfactual_baseline_with_continuous_actions():
    model, algo = _continuous_setup(counterfactual_samples=2)
    stats = algo.train_round(model, model.initial((6,)), contextlib.nullcontext)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values()) and stats["cf_gap"] > 0


# -- ppo.self_imitation ----------------------------------------------------------------------

def test_real_returns_by_hand():
    """Two sequences of 5 steps: one with a terminal step 2 and a new episode at 3, one cut at the end."""
    from mabl.mappo import real_returns

    g = 0.5
    r = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]]).unsqueeze(-1)  # [T, B, 1]
    v = torch.tensor([[10.0, 10.0], [20.0, 20.0], [30.0, 30.0], [40.0, 40.0], [50.0, 50.0]]).unsqueeze(-1)
    cont = torch.ones(5, 2)
    cont[2, 0] = 0.0
    first = torch.zeros(5, 2, dtype=torch.bool)
    first[0] = True
    first[3, 0] = True
    G, acted = real_returns(r, cont, first, v, g)
    # sequence 0: step 4 cut -> V=50; step 3 acts: r4 + g*50 = 29; step 2 terminal -> 0 (no action);
    # step 1: r2 + g*c2*G2 = 2; step 0: r1 + g*2 = 2
    assert torch.allclose(G[:, 0, 0], torch.tensor([2.0, 2.0, 0.0, 29.0, 50.0]))
    # sequence 1: G4 = 50, G3 = 4 + 25 = 29, G2 = 3 + 14.5, G1 = 2 + 8.75, G0 = 1 + 5.375
    assert torch.allclose(G[:, 1, 0], torch.tensor([6.375, 10.75, 17.5, 29.0, 50.0]))
    assert acted[:, 0].tolist() == [True, True, False, True, False]
    assert acted[:, 1].tolist() == [True, True, True, True, False]
    # a time-limit truncation (new episode after a non-terminal step) is cut with the step's value
    cont[2, 0] = 1.0
    G, acted = real_returns(r, cont, first, v, g)
    assert float(G[2, 0, 0]) == 30.0 and not bool(acted[2, 0])


def test_self_imitation_losses_only_pull_toward_better_than_expected():
    from mabl.mappo import self_imitation_losses

    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    values = torch.tensor([1.0, 3.0, 0.0], requires_grad=True)
    returns = torch.tensor([2.0, 1.0, 4.0])
    actor, critic = self_imitation_losses(logp, values, returns, scale=2.0)
    assert torch.allclose(actor, torch.tensor([0.5, 0.0, 1.0]))  # -logp * (G - V)+ / 2
    assert torch.allclose(critic, torch.tensor([0.5, 0.0, 8.0]))
    (actor.sum() + critic.sum()).backward()
    assert torch.allclose(logp.grad, torch.tensor([-0.5, 0.0, -2.0]))  # raise log pi where G > V
    assert torch.allclose(values.grad, torch.tensor([-1.0, 0.0, -4.0]))  # the weight is not a path to V


def _real_batch(T=6, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, A = SPEC.n_agents, SPEC.action_dim
    act = torch.nn.functional.one_hot(torch.randint(0, A, (T, B, n), generator=g), A).float()
    act[0] = 0
    avail = torch.rand(T, B, n, A, generator=g) > 0.3
    avail[:-1] |= act[1:].bool()  # the action taken at t (stored at t+1) was available at t
    is_first = torch.zeros(T, B, dtype=torch.bool)
    is_first[0] = True
    return {"obs": torch.randn(T, B, n, SPEC.obs_dim, generator=g), "state": torch.randn(T, B, SPEC.state_dim, generator=g),
            "prev_action": act, "reward": torch.rand(T, B, n, generator=g) * 5, "cont": torch.ones(T, B),
            "avail": avail, "is_first": is_first}


def _frozen_real_steps(model, algo):
    """Freeze the world model; a replayed batch, its posterior and the round's RealSteps."""
    for p in model.parameters():
        p.requires_grad_(False)
    batch = _real_batch()
    with torch.no_grad():
        post, _, _ = model.observe(batch["obs"], batch["state"], batch["prev_action"], batch["is_first"])
    return post, batch, algo._real_steps(model, (post, batch), contextlib.nullcontext)


@pytest.mark.parametrize("fast", [False, True])
def test_train_round_with_self_imitation(fast):
    """A round with the replayed sequences: the self-imitation steps run on both critic paths and raise
    the actor's log-probability of the replayed actions that beat the critic."""
    from mabl.fast import Speed

    cfg, model, algo, start = _setup(self_imitation=50.0, self_imitation_value=1.0, actor_lr=1e-3)
    if fast:
        model.speed = Speed(fast_critic=True, fused_heads=True)
    post, batch, sil = _frozen_real_steps(model, algo)
    assert sil.raw.shape == (5 * 3, SPEC.n_agents)  # every step but the last acted
    assert torch.equal(sil.raw, batch["prev_action"][1:].argmax(-1).flatten(0, 1))

    def better_logp():
        with torch.no_grad():
            v = algo.critic(algo.critic_features(sil.feat_a, sil.feat_g))
            logp, _ = algo.actor.log_prob_entropy(sil.feat_a, sil.raw, sil.avail)
        return logp, (sil.returns - v) > 0

    logp0, better = better_logp()
    assert better.any()
    algo.adv_scale = 1.0
    for _ in range(5):
        algo._self_imitation_step(sil, contextlib.nullcontext, None, {})
    logp1, _ = better_logp()
    assert float((logp1 - logp0)[better].mean()) > 0
    stats = algo.train_round(model, start, contextlib.nullcontext, real=(post, batch))
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert stats["sil_gap"] >= 0 and 0 <= stats["sil_active"] <= 1
    with pytest.raises(Exception, match="self_imitation"):
        make_config("tiny", "smax:3m", {"ppo": {"self_imitation": -1.0}})


def test_learner_passes_the_replayed_sequences_only_when_self_imitation_or_real_value_is_on():
    import numpy as np

    from mabl.buffer import ReplayBuffer
    from mabl.learner import MABLLearner

    for ppo, metric in (({"self_imitation": 0.0}, None), ({"self_imitation": 1.0}, "policy/sil_gap"),
                        ({"real_value": 1.0}, "policy/real_value_err")):
        cfg = make_config("tiny", "smax:3m", {"ppo": ppo})
        learner = MABLLearner(SPEC, cfg)
        buf = ReplayBuffer(SPEC, 1000)
        b = _real_batch(T=40, B=1)
        ep = {k: v[:, 0].numpy() for k, v in b.items()}
        ep["cont"][-1] = 0.0
        buf.add_episode(ep)
        m = learner.update(buf, np.random.default_rng(0))
        assert ("policy/sil_gap" in m) == (metric is not None)
        if metric is not None:
            assert metric in m


def test_real_value_loss_against_a_hand_computation():
    from mabl.mappo import real_value_loss

    v = torch.tensor([1.0, 3.0, 2.0])
    g = torch.tensor([2.0, 1.0, 2.0])
    assert torch.allclose(real_value_loss(v, g), torch.tensor([0.5, 2.0, 0.0]))  # both directions


@pytest.mark.parametrize("sil", [0.0, 1.0])
def test_real_value_moves_the_critic_toward_real_returns_in_both_directions(sil):
    """ppo.real_value: the critic's values on the replayed steps approach the observed returns, those
    it over-predicts coming down too (self_imitation_value alone only pulls up); the actor is left
    alone without self-imitation."""
    cfg, model, algo, start = _setup(real_value=1.0, self_imitation=sil, self_imitation_value=0.0, critic_lr=1e-3)
    post, batch, sil_steps = _frozen_real_steps(model, algo)
    assert sil_steps is not None

    def values():
        with torch.no_grad():
            return algo.critic(algo.critic_features(sil_steps.feat_a, sil_steps.feat_g))

    # shift the returns so that some sit below the critic's values and some above
    v0 = values()
    sil_steps.returns = v0 + torch.linspace(-2.0, 2.0, v0.numel()).view_as(v0)
    actor0 = [p.detach().clone() for p in algo.actor.parameters()]
    err0 = float((sil_steps.returns - v0).abs().mean())
    below = sil_steps.returns < v0
    stats = {}
    for _ in range(20):
        algo._self_imitation_step(sil_steps, contextlib.nullcontext, None, stats)
    v1 = values()
    assert float((sil_steps.returns - v1).abs().mean()) < 0.7 * err0
    assert float((v1 - v0)[below].mean()) < 0  # pulled down where it over-predicted
    assert "real_value_err" in stats
    unchanged = all(torch.equal(a, b) for a, b in zip(actor0, algo.actor.parameters()))
    assert unchanged == (sil == 0.0)
    out = algo.train_round(model, start, contextlib.nullcontext, real=(post, batch))
    assert "real_value_err" in out and all(torch.isfinite(torch.tensor(x)) for x in out.values())
    with pytest.raises(Exception, match="real_value"):
        make_config("tiny", "smax:3m", {"ppo": {"real_value": -1.0}})


def test_self_imitation_with_continuous_actions():
    """Continuous actions: the replayed action is the pre-squash u = atanh(a) the actor scores."""
    model, algo = _continuous_setup(self_imitation=1.0)
    T, B = 5, 2
    act = torch.rand(T, B, 2, 3) * 1.8 - 0.9
    act[0] = 0
    first = torch.zeros(T, B, dtype=torch.bool)
    first[0] = True
    batch = {"obs": torch.randn(T, B, 2, 5), "state": torch.randn(T, B, 4), "prev_action": act,
             "reward": torch.rand(T, B, 2), "cont": torch.ones(T, B), "is_first": first}
    with torch.no_grad():
        post, _, _ = model.observe(batch["obs"], batch["state"], batch["prev_action"], batch["is_first"])
    sil = algo._real_steps(model, (post, batch), contextlib.nullcontext)
    assert sil.avail is None and torch.allclose(torch.tanh(sil.raw), act[1:].flatten(0, 1), atol=1e-5)
    stats = algo.train_round(model, model.initial((4,)), contextlib.nullcontext, real=(post, batch))
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values()) and "sil_gap" in stats


@pytest.mark.parametrize("fast", [False, True])
def test_disagreement_penalty_lowers_imagined_rewards_by_the_ensemble_variance(fast):
    """``ppo.disagreement`` (extension): a round's imagined rewards are r - coef * u, u the model's ensemble
    variance on each imagined state and action; the round trains on both critic paths and reports u."""
    from mabl.fast import Speed

    cfg = make_config("tiny", "smax:3m", {"ppo": {"disagreement": 2.0}, "model": {"ensemble": 3}})
    torch.manual_seed(0)
    model = BiLevelWorldModel(SPEC, cfg.model)
    if fast:
        model.speed = Speed(fast_critic=True, fused_heads=True)
    algo = MAPPO(SPEC, model, cfg.ppo)
    start = model.initial((7,))
    start.z_a.copy_(torch.nn.functional.one_hot(torch.randint(0, 4, (7, 3, 4)), 4).flatten(-2).float())
    traj = imagine(model, algo.actor, start, horizon=5)
    pen = algo._pessimism(model, traj)
    u = model.disagreement(traj.feat_a[:-1], traj.feat_g[:-1], algo.actor.env_to_model_action(traj.raw))
    assert u.shape == traj.reward.shape and (u > 0).all()
    assert torch.allclose(pen.reward, traj.reward - 2.0 * u)
    assert torch.equal(pen.raw, traj.raw) and torch.equal(pen.cont, traj.cont)
    assert algo.last_disagreement == pytest.approx(float(u.mean()))
    stats = algo.train_round(model, start, contextlib.nullcontext)
    assert stats["disagreement"] > 0 and all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    # off (the paper): the trajectory is returned as it is
    algo0 = MAPPO(SPEC, model, dataclasses.replace(cfg.ppo, disagreement=0.0))
    assert algo0._pessimism(model, traj) is traj and "disagreement" not in algo0.train_round(model, start, contextlib.nullcontext)


def test_critic_time_needs_truncated_returns():
    with pytest.raises(ConfigError, match="critic_time"):
        make_config("tiny", "smax:3m", {"ppo": {"critic_time": True}})  # bootstrap is on by default
    cfg = make_config("tiny", "smax:3m", {"ppo": {"critic_time": True, "bootstrap": False}})
    assert cfg.ppo.critic_time and not cfg.ppo.bootstrap


def test_critic_time_indices_and_that_both_critics_insist_on_their_kind():
    cfg, model, algo, start = _setup(critic_time=True, bootstrap=False)
    H = cfg.ppo.horizon
    idx = algo.trajectory_time_index((H + 1, 7))
    assert idx.shape == (H + 1, 7) and idx[:, 0].tolist() == list(range(H, -1, -1))
    assert (algo.time_index((4, 3)) == H + 1).all()  # a replayed real step: its return is not cut
    assert (algo.time_index((4,), 2) == H - 2).all()
    assert algo.critic.time_embed.num_embeddings == H + 2
    x = torch.randn(5, SPEC.n_agents, algo.critic.embed.in_features)
    with pytest.raises(ValueError, match="steps left"):
        algo.critic(x)
    _, _, plain, _ = _setup(bootstrap=False)
    assert plain.time_index((4, 3)) is None and plain.trajectory_time_index((3, 2)) is None
    with pytest.raises(ValueError, match="critic_time"):
        plain.critic(x, torch.zeros(5, dtype=torch.long))


def test_critic_time_starts_as_the_plain_critic_and_split_path_agrees():
    """The time rows start at zero (the paper's critic until it learns otherwise); the fast path's
    forward_split adds them exactly like forward."""
    _, _, timed, _ = _setup(critic_time=True, bootstrap=False)
    _, _, plain, _ = _setup(bootstrap=False)
    x = torch.randn(6, SPEC.n_agents, timed.critic.embed.in_features)
    steps = torch.arange(6) % (timed.cfg.horizon + 2)
    with torch.no_grad():
        assert torch.allclose(timed.critic(x, steps), plain.critic(x), atol=1e-6)
        timed.critic.time_embed.weight.normal_()
        v = timed.critic(x, steps)
        assert not torch.allclose(v, plain.critic(x), atol=1e-3)
        d = x.shape[-1] // 2
        split = timed.critic.forward_split([x[..., :d], x[..., d:]], torch.float32, None, steps)
    assert torch.allclose(split, v, atol=1e-5)


def test_critic_time_lets_the_critic_fit_a_return_that_depends_only_on_the_steps_left():
    """The same joint state with different steps left has different truncated returns: the time-aware
    critic can fit them, the plain one only their mean."""
    errs = {}
    for timed in (True, False):
        cfg, model, algo, _ = _setup(critic_time=timed, bootstrap=False, critic_lr=3e-3)
        H = cfg.ppo.horizon
        x = torch.randn(1, SPEC.n_agents, algo.critic.embed.in_features).expand(H + 1, -1, -1)
        left = torch.arange(H, -1, -1)
        target = left.float().unsqueeze(-1).expand(H + 1, SPEC.n_agents)
        steps = left if timed else None
        for _ in range(300):
            loss = 0.5 * ((algo.critic(x, steps) - target) ** 2).mean()
            algo.critic_opt.zero_grad()
            loss.backward()
            algo.critic_opt.step()
        errs[timed] = float(loss.detach())
    assert errs[True] < 0.05 * errs[False] and errs[False] > 0.5  # var of 0..H is (H+1)^2/12 - 1/12 = 2


@pytest.mark.parametrize("fast", [False, True])
def test_train_round_with_critic_time_and_self_imitation(fast):
    """A whole round with the time-aware critic, replayed real steps and counterfactual branches, on both
    critic paths: the time rows are learned and the values of one state now depend on the steps left."""
    from mabl.fast import Speed

    cfg, model, algo, start = _setup(critic_time=True, bootstrap=False, self_imitation=1.0, real_value=1.0,
                                     counterfactual_samples=1, critic_lr=1e-3)
    if fast:
        model.speed = Speed(fast_critic=True, fused_heads=True)
    post, batch, sil = _frozen_real_steps(model, algo)
    assert sil is not None
    out = algo.train_round(model, start, contextlib.nullcontext, real=(post, batch))
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values())
    w = algo.critic.time_embed.weight
    H = cfg.ppo.horizon
    assert w[1:H + 1].abs().sum() > 0 and w[H + 1].abs().sum() > 0  # imagined and real rows both trained
    x = torch.randn(1, SPEC.n_agents, algo.critic.embed.in_features).expand(3, -1, -1)
    with torch.no_grad():
        v = algo.critic(x, torch.tensor([1, H, H + 1]))
    assert not torch.allclose(v[0], v[1]) and not torch.allclose(v[1], v[2])


def test_critic_time_makes_the_self_imitation_value_term_two_sided():
    """With ppo.critic_time the real steps' index is trained by nothing but the real returns, so
    self_imitation_value regresses it both ways (one-sided it would rise to an upper envelope and
    switch self-imitation off); without critic_time the term still only pulls up."""
    for timed in (True, False):
        extra = {"critic_time": True, "bootstrap": False} if timed else {}
        cfg, model, algo, start = _setup(self_imitation=1.0, self_imitation_value=1.0, critic_lr=1e-3, **extra)
        post, batch, sil_steps = _frozen_real_steps(model, algo)

        def values():
            with torch.no_grad():
                fa, fg = sil_steps.feat_a, sil_steps.feat_g
                return algo.critic(algo.critic_features(fa, fg), algo.time_index(fa.shape[:-2], None))

        v0 = values()
        sil_steps.returns = v0 - 2.0  # the critic over-predicts every real return
        for _ in range(10):
            algo._self_imitation_step(sil_steps, contextlib.nullcontext, None, {})
        drop = float((v0 - values()).mean())
        if timed:
            assert drop > 0.2
        else:
            assert abs(drop) < 1e-6  # no gradient: every gap is clamped at 0 (and the actor step leaves V alone)
