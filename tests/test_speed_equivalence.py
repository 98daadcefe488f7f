"""The speed switches (mabl.fast, RunConfig) change how the learner update runs, not what it computes.

(a) unit checks: each fused path equals the plain path numerically in fp32 (same parameters,
    same random stream where the sampling procedure is unchanged);
(b) a short deterministic training with every optimization on vs off gives world-model losses
    that agree within a stated tolerance (bf16 and another sampling stream make them differ a bit).
No test needs torch.compile.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mabl.fast as fast_mod
from mabl.buffer import ReplayBuffer
from mabl.config import make_config
from mabl.envs.base import EnvSpec
from mabl.fast import (PLAIN, FusedLinears, LoopLinear, Speed, agent_attention, kl_balanced_fused, sample_st,
                       softmax_lastdim)
from mabl.learner import MABLLearner
from mabl.mappo import MAPPO, imagine
from mabl.nets import sample_onehot
from mabl.world_model import BiLevelWorldModel, kl_balanced

SPEC = EnvSpec("test:toy", n_agents=3, obs_dim=11, state_dim=7, action_dim=5, discrete=True, has_action_mask=True)
CONT = EnvSpec("test:cont", n_agents=2, obs_dim=9, state_dim=6, action_dim=3, discrete=False, has_action_mask=False)
VARIANTS = [dict(), dict(bilevel=False), dict(single_global=True)]
UNIMIX = [dict(unimix=0.01), dict(unimix=0.3, single_global=True)]  # the extension model.unimix, in every fused path
PRIOR_HEADS = [dict(prior_heads=0.5, reward_input="agent+global"), dict(prior_heads=1.0, single_global=True),
               dict(prior_heads=1.0, bilevel=False)]  # the extension model.prior_heads
PRIOR_H_G = [dict(agent_prior_input="zhat_g+h_g"), dict(agent_prior_input="zhat_g+h_g", single_global=True, prior_heads=0.5)]
IMAGINE_MODE = [dict(imagine_latent="mode", agent_prior_input="zhat_g+h_g", unimix=0.01),
                dict(imagine_latent="mode", bilevel=False),  # the extension model.imagine_latent
                dict(imagine_temperature=0.5, agent_prior_input="zhat_g+h_g", unimix=0.01)]  # and model.imagine_temperature
ENSEMBLE = [dict(ensemble=3, prior_heads=0.5), dict(ensemble=2, bilevel=False)]  # the extension model.ensemble


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one thread is faster and immune to a busy second core (and deterministic)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _batch(T=8, B=4, seed=0, spec=SPEC):
    g = torch.Generator().manual_seed(seed)
    n, a = spec.n_agents, spec.action_dim
    if spec.discrete:
        act = F.one_hot(torch.randint(0, a, (T, B, n), generator=g), a).float()
    else:
        act = torch.rand(T, B, n, a, generator=g) * 2 - 1
    is_first = torch.zeros(T, B, dtype=torch.bool)
    is_first[0] = True
    is_first[T // 2, 1] = True  # a reset in the middle of one sequence
    act[0] = 0
    act[T // 2, 1] = 0
    return {"obs": torch.randn(T, B, n, spec.obs_dim, generator=g), "state": torch.randn(T, B, spec.state_dim, generator=g),
            "prev_action": act, "reward": torch.randn(T, B, n, generator=g), "cont": torch.ones(T, B),
            "avail": torch.rand(T, B, n, a, generator=g) > 0.3, "is_first": is_first}


def _model(spec=SPEC, ppo=None, **variant):
    over = {"model": variant} if variant else {}
    if ppo:
        over["ppo"] = ppo
    cfg = make_config("tiny", "smax:3m", over or None)
    torch.manual_seed(0)
    return BiLevelWorldModel(spec, cfg.model), cfg


def _loss_and_grads(model, batch, speed, seed=1):
    model.speed = speed
    torch.manual_seed(seed)
    loss, metrics, _ = model.loss(batch)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss.detach(), metrics, grads


def _max_rel(a_list, b_list):
    return max(float((a - b).abs().max() / (a.abs().max() + 1e-8)) for a, b in zip(a_list, b_list))


# ------------------------------------------------------------------------------------------
# (a) fused paths == plain paths in fp32

@pytest.mark.parametrize("variant", VARIANTS + UNIMIX + PRIOR_HEADS + PRIOR_H_G + ENSEMBLE,
                         ids=["bilevel", "no-global", "single-global", "unimix", "unimix-single-global", "prior-heads",
                              "prior-heads-single-global", "prior-heads-no-global", "prior-h_g", "prior-h_g-single-global",
                              "ensemble", "ensemble-no-global"])
@pytest.mark.parametrize("flags", [dict(fused_recurrence=True), dict(fused_heads=True), dict(fused_kl=True),
                                   dict(fused_recurrence=True, fused_heads=True, fused_kl=True),
                                   dict(fused_recurrence=True, fused_heads=True, fused_kl=True, gather_onehot=True)],
                         ids=["recurrence", "heads", "kl", "all", "all+gather"])
def test_world_model_loss_and_gradients_match_plain_fp32(variant, flags):
    """Same weights, same Gumbel noise (fast_sampling off): identical loss terms and gradients."""
    model, _ = _model(**variant)
    b = _batch()
    l0, m0, g0 = _loss_and_grads(model, b, PLAIN)
    l1, m1, g1 = _loss_and_grads(model, b, Speed(**flags))
    assert torch.allclose(l0, l1, rtol=1e-5, atol=1e-6)
    assert m0.keys() == m1.keys()
    for k in m0:
        assert torch.allclose(m0[k], m1[k], rtol=1e-5, atol=1e-6), k
    assert _max_rel(g0, g1) < 1e-4


@pytest.mark.parametrize("variant", [dict(state_decoder=True), dict(state_decoder=True, single_global=True),
                                     dict(state_decoder=True, obs_loss="smooth_l1", reward_loss="smooth_l1", state_scale=0.05),
                                     dict(state_decoder=True, reward_input="agent+global"),
                                     dict(state_decoder=True, single_global=True, reward_input="agent+global")],
                         ids=["bilevel", "single-global", "smooth-l1-scaled", "reward-global", "reward-single-global"])
@pytest.mark.parametrize("flags", [dict(fused_heads=True), dict(fused_recurrence=True, fused_heads=True, fused_kl=True, gather_onehot=True)],
                         ids=["heads", "all+gather"])
def test_state_decoder_loss_and_gradients_match_plain_fp32(variant, flags):
    """The optional state decoder (an extension) in the fused heads: same term, same gradients."""
    model, _ = _model(**variant)
    b = _batch()
    l0, m0, g0 = _loss_and_grads(model, b, PLAIN)
    l1, m1, g1 = _loss_and_grads(model, b, Speed(**flags))
    assert "state" in m0 and m0.keys() == m1.keys()
    assert torch.allclose(l0, l1, rtol=1e-5, atol=1e-6)
    for k in m0:
        assert torch.allclose(m0[k], m1[k], rtol=1e-5, atol=1e-6), k
    assert _max_rel(g0, g1) < 1e-4


@pytest.mark.parametrize("variant", VARIANTS + UNIMIX + PRIOR_H_G, ids=["bilevel", "no-global", "single-global", "unimix",
                                                                   "unimix-single-global", "prior-h_g", "prior-h_g-single-global"])
def test_fused_observe_matches_plain_posteriors_and_carry(variant):
    model, _ = _model(**variant)
    b = _batch()
    with torch.no_grad():
        model.speed = PLAIN
        post0, lg0, last0 = model.observe(b["obs"], b["state"], b["prev_action"], b["is_first"], sample=False)
        model.speed = Speed(fused_recurrence=True)
        post1, lg1, last1 = model.observe(b["obs"], b["state"], b["prev_action"], b["is_first"], sample=False)
    for k in lg0:
        assert torch.allclose(lg0[k], lg1[k], atol=1e-5), k
    for a, c in ((post0, post1), (last0, last1)):
        for name in ("h_a", "z_a", "h_g", "z_g"):
            x, y = getattr(a, name), getattr(c, name)
            assert (x is None) == (y is None)
            if x is not None:
                assert torch.allclose(x, y, atol=1e-5), name


@pytest.mark.parametrize("gather", [False, True], ids=["matmul", "gather"])
@pytest.mark.parametrize("variant", VARIANTS + [dict(reward_input="agent+global")] + UNIMIX + PRIOR_H_G + IMAGINE_MODE,
                         ids=["bilevel", "no-global", "single-global", "reward-global", "unimix", "unimix-single-global",
                              "prior-h_g", "prior-h_g-single-global", "mode", "mode-no-global", "temperature"])
def test_fused_imagination_matches_plain(variant, gather):
    """Fused first layers + availability reused: the same trajectory from the same random stream."""
    model, cfg = _model(**variant)
    algo = MAPPO(SPEC, model, cfg.ppo)
    start = model.initial((7,))
    start.z_a.copy_(F.one_hot(torch.randint(0, 4, (7, 3, 4)), 4).flatten(-2).float())
    for p in model.parameters():
        p.requires_grad_(False)
    model.speed = PLAIN
    torch.manual_seed(3)
    t0 = imagine(model, algo.actor, start, 6)
    model.speed = Speed(fused_heads=True, gather_onehot=gather)
    torch.manual_seed(3)
    t1 = imagine(model, algo.actor, start, 6)
    assert torch.equal(t0.raw, t1.raw) and torch.equal(t0.avail, t1.avail)
    for k in ("feat_a", "feat_g", "logp", "reward", "cont"):
        x, y = getattr(t0, k), getattr(t1, k)
        if x is not None:
            assert torch.allclose(x.float(), y.float(), atol=1e-5), k


def test_continuous_actions_and_global_critic_match_plain():
    """Continuous actions (MaMuJoCo-like, no masks) and the 'global' critic input (Flatland)."""
    model, cfg = _model(CONT, ppo=dict(critic_input="global"))
    b = _batch(spec=CONT)
    l0, _, g0 = _loss_and_grads(model, b, PLAIN)
    l1, _, g1 = _loss_and_grads(model, b, Speed(fused_recurrence=True, fused_heads=True, fused_kl=True))
    assert torch.allclose(l0, l1, rtol=1e-5) and _max_rel(g0, g1) < 1e-4
    algo = MAPPO(CONT, model, cfg.ppo)
    start = model.initial((5,))
    for p in model.parameters():
        p.requires_grad_(False)
    trajs = []
    for speed in (PLAIN, Speed(fused_heads=True)):
        model.speed = speed
        torch.manual_seed(4)
        trajs.append(imagine(model, algo.actor, start, 4))
    for k in ("feat_a", "feat_g", "raw", "logp", "reward", "cont"):
        assert torch.allclose(getattr(trajs[0], k).float(), getattr(trajs[1], k).float(), atol=1e-5), k
    assert trajs[1].avail is None
    fa, fg = trajs[0].feat_a, trajs[0].feat_g
    assert torch.allclose(algo.critic(fg), algo.critic.forward_split([fg], torch.float32), atol=1e-5)
    model.speed = Speed.all_on(bf16=True)
    stats = algo.train_round(model, start, contextlib.nullcontext)
    assert all(np.isfinite(v) for v in stats.values())


def test_fused_critic_equals_multihead_attention_critic():
    model, cfg = _model()
    algo = MAPPO(SPEC, model, cfg.ppo)
    torch.manual_seed(0)
    fa, fg = torch.randn(9, 3, model.feat_a), torch.randn(9, 3, model.feat_g)
    ref = algo.critic(torch.cat([fa, fg], -1))
    ours = algo.critic.forward_split([fa, fg], torch.float32)
    assert torch.allclose(ref, ours, atol=1e-5)
    g_ref = torch.autograd.grad(ref.sum(), list(algo.critic.parameters()))
    g_ours = torch.autograd.grad(algo.critic.forward_split([fa, fg], torch.float32).sum(), list(algo.critic.parameters()))
    assert _max_rel(g_ref, g_ours) < 1e-4


@pytest.mark.parametrize("n", [1, 3, 8, 27])
def test_agent_attention_equals_multihead_attention_math(n):
    torch.manual_seed(n)
    E, heads = 32, 4
    mha = torch.nn.MultiheadAttention(E, heads, batch_first=True)
    x = torch.randn(5, n, E)
    ref, _ = mha(x, x, x, need_weights=False)
    w, b = mha.in_proj_weight, mha.in_proj_bias
    q, k, v = (F.linear(x, w[i * E:(i + 1) * E], b[i * E:(i + 1) * E]) for i in range(3))
    ours = F.linear(agent_attention(q, k, v, heads), mha.out_proj.weight, mha.out_proj.bias)
    assert torch.allclose(ref, ours, atol=1e-5)


def test_softmax_lastdim():
    x = torch.randn(4, 5, 3) * 10
    assert torch.allclose(softmax_lastdim(x), torch.softmax(x, -1), atol=1e-6)


def test_fused_linears_equal_separate_layers():
    torch.manual_seed(0)
    l1, l2, l3 = torch.nn.Linear(7, 4), torch.nn.Linear(7 + 5, 3), torch.nn.Linear(5, 2, bias=False)
    a, c = torch.randn(6, 7), torch.randn(6, 5)
    fl = FusedLinears(torch.float32)
    fl.add("l1", l1.bias, {"a": l1.weight})
    fl.add("l2", l2.bias, {"a": l2.weight[:, :7], "c": l2.weight[:, 7:]})
    fl.add("l3", None, {"c": l3.weight})
    fl.build()
    pa, pc = fl.project("a", a), fl.project("c", c)
    assert torch.allclose(fl.out("l1", pa, pc), l1(a), atol=1e-6)
    assert torch.allclose(fl.out("l2", pa, pc), l2(torch.cat([a, c], -1)), atol=1e-6)
    assert torch.allclose(fl.out("l3", pa, pc), l3(c), atol=1e-6)


def test_loop_linear_gradient_equals_autograd():
    """The weight gradient accumulated once for all steps equals the per-step autograd one."""
    torch.manual_seed(0)
    w = torch.randn(6, 4, requires_grad=True)
    x0 = torch.randn(3, 4, requires_grad=True)

    def run(linear):
        h, out = x0, 0.0
        for _ in range(5):
            h = torch.tanh(linear(h)[:, :4])
            out = out + h.pow(2).sum()
        return out

    ref = torch.autograd.grad(run(lambda h: F.linear(h, w)), [w, x0])
    ll = LoopLinear(w)
    ours = torch.autograd.grad(run(lambda h: ll(h)), [w, x0])
    assert torch.allclose(ref[0], ours[0], atol=1e-5) and torch.allclose(ref[1], ours[1], atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS, ids=["bilevel", "no-global", "single-global"])
def test_ppo_round_with_gathered_onehots_matches_matmuls(variant):
    """Speed.gather_onehot in the PPO round (imagination, values, actor and critic minibatches):
    from the same random stream the same statistics and the same trained weights as matmuls."""
    results = []
    for gather in (False, True):
        model, cfg = _model(**variant)
        torch.manual_seed(5)
        algo = MAPPO(SPEC, model, cfg.ppo)
        start = model.initial((9,))
        start.z_a.copy_(F.one_hot(torch.randint(0, 4, (9, 3, 4)), 4).flatten(-2).float())
        for p in model.parameters():
            p.requires_grad_(False)
        model.speed = Speed(fused_heads=True, fast_critic=True, gather_onehot=gather)
        torch.manual_seed(6)
        stats = algo.train_round(model, start, contextlib.nullcontext)
        results.append((stats, [p.detach().clone() for p in algo.parameters()]))
    (s0, w0), (s1, w1) = results
    for k in s0:
        assert math.isclose(s0[k], s1[k], rel_tol=1e-4, abs_tol=1e-5), (k, s0[k], s1[k])
    # Adam turns summation-order differences of near-zero gradients into ~lr-sized steps: 1e-3
    assert _max_rel(w0, w1) < 1e-3


def test_onehot_linear_value_and_gradients():
    """The gather-based product of a one-hot latent and a weight: value and both gradients of the matmul."""
    from mabl.fast import onehot_indices, onehot_linear, onehot_weight
    torch.manual_seed(0)
    C, K, out = 6, 8, 5
    idx = torch.randint(0, K, (4, 3, C))
    z = F.one_hot(idx, K).float().flatten(-2)
    z[0, 0] = 0.0  # an all-zero latent (the initial carry) selects nothing
    z.requires_grad_(True)
    flat_idx = onehot_indices(z, K)
    assert torch.equal(flat_idx[1:], (idx + torch.arange(C) * K + 1)[1:]) and (flat_idx[0, 0] == 0).all()
    w = torch.randn(out, C * K, requires_grad=True)
    wt = onehot_weight(w)
    g = torch.randn(4, 3, out)
    ref = F.linear(z, w)
    ours = onehot_linear(z, flat_idx, wt)
    assert torch.allclose(ref, ours, atol=1e-5)
    gr = torch.autograd.grad((ref * g).sum(), [z, w])
    go = torch.autograd.grad((ours * g).sum(), [z, w])
    for a, b in zip(gr, go):
        assert torch.allclose(a, b, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(onehot_linear(z, flat_idx, wt), ref, atol=1e-5)


def test_onehot_projection_is_a_gather():
    """One-hot latents times a weight = the sum of the selected columns (the structure all fused
    paths rely on; on CPUs without bf16 matmul units this gather is the faster way)."""
    torch.manual_seed(0)
    C, K, H = 4, 5, 6
    w = torch.randn(H, C * K)
    idx = torch.randint(0, K, (7, C))
    z = F.one_hot(idx, K).float().flatten(-2)
    gathered = F.embedding_bag(idx + torch.arange(C) * K, w.t(), mode="sum")
    assert torch.allclose(z @ w.t(), gathered, atol=1e-6)


def test_kl_fused_value_and_gradient_split():
    torch.manual_seed(1)
    post = torch.randn(3, 2, 8, requires_grad=True)
    prior = torch.randn(3, 2, 8, requires_grad=True)
    ref = kl_balanced(post, prior, 2, 0.8)
    ours = kl_balanced_fused(post, prior, 2, 0.8)
    assert torch.allclose(ref, ours, atol=1e-6)
    w = torch.randn(3, 2)
    g_ref = torch.autograd.grad((ref * w).sum(), [post, prior])
    g_ours = torch.autograd.grad((kl_balanced_fused(post, prior, 2, 0.8) * w).sum(), [post, prior])
    for a, b in zip(g_ref, g_ours):
        assert torch.allclose(a, b, atol=1e-6)


def test_fast_sampler_distribution_and_straight_through_gradient():
    """Inverse-CDF samples: exact one-hots with the categorical's frequencies; backward = softmax's."""
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 0.5, -1.0, 0.0, 1.0]).repeat(20000, 2)  # 2 categoricals x 5 classes per row
    z = sample_st(logits, 5, torch.float32).view(-1, 2, 5)
    assert torch.equal(z.sum(-1), torch.ones(20000, 2)) and ((z == 0) | (z == 1)).all()
    freq = z.mean(0)
    probs = torch.softmax(logits[0, :5], -1)
    assert torch.allclose(freq, probs.expand(2, 5), atol=0.012)  # ~4 standard errors
    # never samples a class of probability 0
    masked = torch.tensor([0.0, -1e9, 0.0, -1e9]).repeat(5000, 1)
    zs = sample_st(masked, 4, torch.float32)
    assert zs[:, 1].sum() == 0 and zs[:, 3].sum() == 0
    # straight-through: gradient of <g, z> wrt logits is that of <g, softmax(logits)>, like the plain sampler
    x = torch.randn(6, 10, requires_grad=True)
    g = torch.randn(6, 10)
    ours = torch.autograd.grad((sample_st(x, 5, torch.float32) * g).sum(), x)[0]
    plain = torch.autograd.grad((sample_onehot(x.view(6, 2, 5)).view(6, 10) * g).sum(), x)[0]
    assert torch.allclose(ours, plain, atol=1e-6)


def test_fast_sampler_in_bf16_is_exactly_one_hot():
    logits = torch.randn(50, 4 * 8).bfloat16()
    z = sample_st(logits, 8, torch.bfloat16).float().view(50, 4, 8)
    assert torch.equal(z.sum(-1), torch.ones(50, 4))


# ------------------------------------------------------------------------------------------
# (b) short deterministic training: optimizations on vs off

def _synthetic_buffer(spec, seed=0):
    rng = np.random.default_rng(seed)
    buf = ReplayBuffer(spec, 2000)
    n, a = spec.n_agents, spec.action_dim
    for _ in range(12):
        T = 30
        act = np.eye(a, dtype=np.float32)[rng.integers(0, a, (T, n))]
        act[0] = 0
        # a learnable signal: observation and reward depend on the previous action
        obs = rng.standard_normal((T, n, spec.obs_dim)).astype(np.float32) * 0.1
        obs[..., :a] += act
        cont = np.ones(T, np.float32)
        cont[-1] = 0
        buf.add_episode({"obs": obs, "state": rng.standard_normal((T, spec.state_dim)).astype(np.float32),
                         "prev_action": act, "reward": act[..., 0].copy(), "cont": cont,
                         "avail": rng.random((T, n, a)) > 0.2, "is_first": np.arange(T) == 0})
    return buf


def _train(optimized: bool, steps: int = 30):
    flags = {f: optimized for f in ("fused_recurrence", "fused_heads", "fast_sampling", "fused_kl", "fast_critic", "fused_adam")}
    cfg = make_config("tiny", "smax:3m", {
        "model": dict(hidden=32, deter=32, embed=32, n_categoricals=4, n_classes=8, batch_size=8, seq_len=10, lr=3e-3),
        # tune_malloc off: it changes no math and is process-wide (the test process stays as it was)
        "run": dict(bf16=optimized, compile=False, tune_malloc=False, **flags),
    })
    torch.manual_seed(0)
    learner = MABLLearner(SPEC, cfg)
    buf = _synthetic_buffer(SPEC)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        batch = buf.sample(cfg.model.batch_size, cfg.model.seq_len, rng)
        losses.append(learner.train_model_step(batch))
    return learner, losses


@pytest.mark.parametrize("bf16_native", [True, False], ids=["bf16", "fp32-fallback"])
def test_short_training_optimized_matches_plain_fp32(monkeypatch, bf16_native):
    """30 world-model steps from the same init on the same batches: every loss term agrees within
    5% relative (+0.02 absolute for terms near 0) at the start and after training, and both runs
    learn. Differences come from bf16 matmuls and the other sampling random stream only.
    Both precisions of the optimized path are checked whatever this CPU has: bf16 (as on a CPU
    with AMX) and the fp32 fallback of a CPU without native bf16."""
    monkeypatch.setattr(fast_mod, "native_bf16", lambda device="cpu": bf16_native)
    learner, fast = _train(True)
    assert learner.speed.bf16 is bf16_native
    _, plain = _train(False)
    for step in (0, len(fast) - 1):
        for key in ("model/loss", "model/obs", "model/reward", "model/cont", "model/action", "model/avail"):
            a, b = fast[step][key], plain[step][key]
            assert abs(a - b) <= 0.05 * abs(b) + 0.02, (step, key, a, b)
    # the KL terms depend on the random latents more than the others: 10%
    for key in ("model/kl_a", "model/kl_g"):
        a, b = fast[-1][key], plain[-1][key]
        assert abs(a - b) <= 0.10 * abs(b) + 0.02, (key, a, b)
    assert fast[-1]["model/loss"] < 0.8 * fast[0]["model/loss"]
    assert plain[-1]["model/loss"] < 0.8 * plain[0]["model/loss"]


def test_full_update_runs_with_optimizations_and_reports_timings():
    learner, _ = _train(True, steps=1)
    buf = _synthetic_buffer(SPEC, seed=1)
    m = learner.update(buf, np.random.default_rng(0))
    for k in ("time/model_s", "time/imagine_s", "time/policy_s", "time/update_s"):
        assert k in m and m[k] >= 0.0
    assert math.isclose(m["time/update_s"], m["time/model_s"] + m["time/imagine_s"] + m["time/policy_s"], rel_tol=1e-6)
    assert all(np.isfinite(v) for k, v in m.items() if isinstance(v, float))
    # checkpoint round trip with the fused optimizers
    state = learner.state_dict()
    learner.load_state_dict(state)


def test_plain_train_round_still_works_with_nullcontext():
    model, cfg = _model()
    algo = MAPPO(SPEC, model, cfg.ppo)
    start = model.initial((5,))
    for p in model.parameters():
        p.requires_grad_(False)
    model.speed = Speed.all_on(bf16=False)
    stats = algo.train_round(model, start, contextlib.nullcontext)
    assert all(np.isfinite(v) for v in stats.values())


def test_bf16_falls_back_to_fp32_where_it_is_not_native(monkeypatch):
    """run.bf16 keeps bf16 only on a device that multiplies it in hardware (emulated bf16 on an
    AVX2-only CPU runs ~100x slower than fp32); the other switches are untouched."""
    run = make_config("tiny", "smax:3m", {"run": dict(bf16=True, fused_kl=True)}).run
    for name, native in (("_is_amx_tile_supported", False), ("_is_avx512_bf16_supported", False)):
        monkeypatch.setattr(torch.cpu, name, lambda native=native: native, raising=False)
    assert fast_mod.native_bf16("cpu") is False
    sp = Speed.from_run(run, "cpu")
    assert sp.bf16 is False and sp.fused_kl is True
    assert Speed.from_run(run).bf16 is True  # no device given: the flag as configured
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert fast_mod.native_bf16("cpu") is True and Speed.from_run(run, "cpu").bf16 is True
    off = make_config("tiny", "smax:3m", {"run": dict(bf16=False)}).run
    assert Speed.from_run(off, "cpu").bf16 is False
