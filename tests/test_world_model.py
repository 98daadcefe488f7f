"""The bi-level world model: shapes, the paper's conditioning structure, losses by hand."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from mabl.config import make_config, replace
from mabl.envs.base import EnvSpec
from mabl.errors import ConfigError
from mabl.nets import sample_onehot
from mabl.world_model import BiLevelWorldModel, categorical_kl, kl_balanced, unimix_logits

SPEC = EnvSpec("test:toy", n_agents=3, obs_dim=11, state_dim=7, action_dim=5, discrete=True, has_action_mask=True)


def tiny(**model):
    cfg = make_config("tiny", "smax:3m")
    return replace(cfg, model=model) if model else cfg


def batch(T=6, B=2, spec=SPEC, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, a = spec.n_agents, spec.action_dim
    act = torch.nn.functional.one_hot(torch.randint(0, a, (T, B, n), generator=g), a).float()
    is_first = torch.zeros(T, B, dtype=torch.bool)
    is_first[0] = True
    act[0] = 0
    return {
        "obs": torch.randn(T, B, n, spec.obs_dim, generator=g), "state": torch.randn(T, B, spec.state_dim, generator=g),
        "prev_action": act, "reward": torch.randn(T, B, n, generator=g), "cont": torch.ones(T, B),
        "avail": torch.rand(T, B, n, a, generator=g) > 0.3, "is_first": is_first,
    }


def test_observe_imagine_heads_shapes():
    cfg = tiny().model
    m = BiLevelWorldModel(SPEC, cfg)
    b = batch()
    post, logits, last = m.observe(b["obs"], b["state"], b["prev_action"], b["is_first"])
    S = cfg.n_categoricals * cfg.n_classes
    assert post.h_a.shape == (6, 2, 3, cfg.deter) and post.z_a.shape == (6, 2, 3, S)
    assert post.h_g.shape == (6, 2, 3, cfg.deter) and post.z_g.shape == (6, 2, 3, S)
    for k in ("post_a", "prior_a", "post_g", "prior_g"):
        assert logits[k].shape == (6, 2, 3, S), k
    # latents are exact one-hots: one class per categorical
    z = post.z_a.detach().unflatten(-1, (cfg.n_categoricals, cfg.n_classes))
    assert torch.allclose(z.sum(-1), torch.ones_like(z.sum(-1)), atol=1e-6)
    assert ((z > 0.5).sum(-1) == 1).all()
    start = post.map(lambda x: x[-1].detach())
    nxt = m.imagine_step(start, torch.nn.functional.one_hot(torch.randint(0, 5, (2, 3)), 5).float())
    assert nxt.h_a.shape == start.h_a.shape and nxt.z_g.shape == start.z_g.shape
    heads = m.heads(nxt)
    assert heads["reward"].shape == (2, 3) and heads["cont"].shape == (2, 3) and heads["avail"].shape == (2, 3, 5)


def test_loss_is_finite_and_trains_every_parameter():
    m = BiLevelWorldModel(SPEC, tiny().model)
    total, metrics, _ = m.loss(batch())
    assert torch.isfinite(total)
    assert {"obs", "kl_a", "kl_g", "reward", "cont", "avail", "action"} <= set(metrics)
    total.backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without gradient: {no_grad}"


def test_world_model_learns_a_fixed_batch():
    torch.manual_seed(0)
    m = BiLevelWorldModel(SPEC, tiny().model)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    b = batch(T=8, B=4)
    first = None
    for _ in range(150):
        loss, _, _ = m.loss(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    assert float(loss.detach()) < 0.6 * first


def test_agent_posterior_ignores_state_and_others_global_posterior_does_not():
    """q(z^a | o^i, h^a) never sees s_t; q(z^g | s_t, z^a, h^g) does (paper Eq. 2)."""
    m = BiLevelWorldModel(SPEC, tiny().model)
    b = batch()
    b2 = dict(b, state=torch.randn_like(b["state"]) * 5)
    with torch.no_grad():
        _, l1, _ = m.observe(b["obs"], b["state"], b["prev_action"], b["is_first"], sample=False)
        _, l2, _ = m.observe(b2["obs"], b2["state"], b2["prev_action"], b2["is_first"], sample=False)
    assert torch.allclose(l1["post_a"], l2["post_a"])
    assert not torch.allclose(l1["post_g"], l2["post_g"])
    # agent 0's posterior does not depend on agent 1's observation
    b3 = dict(b, obs=b["obs"].clone())
    b3["obs"][:, :, 1] += 3.0
    with torch.no_grad():
        _, l3, _ = m.observe(b3["obs"], b3["state"], b3["prev_action"], b3["is_first"], sample=False)
    assert torch.allclose(l1["post_a"][:, :, 0], l3["post_a"][:, :, 0])
    assert not torch.allclose(l1["post_a"][:, :, 1], l3["post_a"][:, :, 1])


def test_is_first_resets_the_carry():
    m = BiLevelWorldModel(SPEC, tiny().model)
    b = batch(T=6)
    b["is_first"][3] = True
    with torch.no_grad():
        _, full, _ = m.observe(b["obs"], b["state"], b["prev_action"], b["is_first"], sample=False)
        tail = {k: v[3:] for k, v in b.items()}
        _, part, _ = m.observe(tail["obs"], tail["state"], tail["prev_action"], tail["is_first"], sample=False)
    assert torch.allclose(full["post_a"][3:], part["post_a"], atol=1e-5)
    assert torch.allclose(full["post_g"][3:], part["post_g"], atol=1e-5)


@pytest.mark.parametrize("variant", [dict(bilevel=False), dict(single_global=True)])
def test_ablations_are_flags(variant):
    cfg = tiny(**variant).model
    m = BiLevelWorldModel(SPEC, cfg)
    total, metrics, post = m.loss(batch())
    total.backward()
    if not cfg.bilevel:
        assert post.h_g is None and "kl_g" not in metrics and not hasattr(m, "global_gru")
    else:
        assert post.h_g.shape[-2] == 1  # one global latent shared by all agents
        fa, fg = m.features(post)
        assert fg.shape[:-1] == fa.shape[:-1]


def test_state_decoder_trains_the_global_level_to_carry_the_state():
    """The optional state decoder: off by default (the paper's model); on, it adds a reconstruction
    of s_t from each agent's (z^g, h^g) whose gradient reaches the global posterior and the state
    encoder but no agent-level head; without the global level it is a config error."""
    torch.manual_seed(3)
    plain = BiLevelWorldModel(SPEC, tiny().model)
    assert plain.state_decoder is None
    torch.manual_seed(3)
    m = BiLevelWorldModel(SPEC, tiny(state_decoder=True).model)
    shared = plain.state_dict()  # the flag adds a module without changing the others' initial weights
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in shared.items())
    b = batch()
    _, metrics, _ = m.loss(b)
    assert float(metrics["state"]) > 0
    m2 = BiLevelWorldModel(SPEC, tiny(state_decoder=True, state_scale=0.25).model)
    m2.load_state_dict(m.state_dict())
    torch.manual_seed(0)
    _, m_a, _ = m.loss(b)
    torch.manual_seed(0)
    _, m_b, _ = m2.loss(b)
    assert torch.allclose(m_b["state"], 0.25 * m_a["state"], rtol=1e-5)
    post, _, _ = m.observe(b["obs"], b["state"], b["prev_action"], b["is_first"])
    _, fg = m.features(post)
    pred = m.state_decoder(fg)
    assert pred.shape == (*fg.shape[:-1], SPEC.state_dim)
    m._recon(pred, b["state"].unsqueeze(-2)).backward()
    assert m.state_encoder[0].weight.grad.abs().sum() > 0
    assert m.global_post[-1].weight.grad.abs().sum() > 0
    assert m.obs_decoder[0].weight.grad is None and m.reward_head[0].weight.grad is None
    with pytest.raises(ConfigError, match="state_decoder"):
        tiny(state_decoder=True, bilevel=False)


def test_reward_input_agent_global_reads_the_global_level():
    """``model.reward_input``: "agent" (the paper) predicts r from (z^a, h^a) only; "agent+global" also
    from (z^g, h^g), with the agent columns and every other module initialised as without it; the
    reward loss then trains the global level; without a global level it is a config error."""
    torch.manual_seed(4)
    plain = BiLevelWorldModel(SPEC, tiny().model)
    torch.manual_seed(4)
    m = BiLevelWorldModel(SPEC, tiny(reward_input="agent+global").model)
    sd, sd_plain = m.state_dict(), plain.state_dict()
    assert sd.keys() == sd_plain.keys()
    for k, v in sd_plain.items():
        if k == "reward_head.0.weight":
            assert v.shape[1] == m.feat_a and sd[k].shape[1] == m.feat_a + m.feat_g
            assert torch.equal(sd[k][:, : m.feat_a], v)
        else:
            assert torch.equal(sd[k], v), k
    b = batch()
    with torch.no_grad():
        post, _, _ = m.observe(b["obs"], b["state"], b["prev_action"], b["is_first"])
        r0 = m.heads(post)["reward"]
        r_plain = plain.heads(post)["reward"]
        changed = replace_latent(post, z_g=torch.roll(post.z_g, 1, dims=-1))
        assert not torch.allclose(m.heads(changed)["reward"], r0)  # reads z^g
        assert torch.allclose(plain.heads(changed)["reward"], r_plain)  # the paper's head does not
    post = m.observe(b["obs"], b["state"], b["prev_action"], b["is_first"])[0]  # with gradients
    fa, fg = m.features(post)
    m._reward_loss(m.reward_head(torch.cat([fa, fg], -1)).squeeze(-1), b["reward"]).backward()
    assert m.global_post[-1].weight.grad.abs().sum() > 0 and m.state_encoder[0].weight.grad.abs().sum() > 0
    fa, _ = plain.features(plain.observe(b["obs"], b["state"], b["prev_action"], b["is_first"])[0])
    plain._reward_loss(plain.reward_head(fa).squeeze(-1), b["reward"]).backward()
    assert plain.global_post[-1].weight.grad is None
    with pytest.raises(ConfigError, match="reward_input"):
        tiny(reward_input="agent+global", bilevel=False)
    with pytest.raises(ConfigError, match="reward_input"):
        tiny(reward_input="global")


def test_agent_prior_input_h_g_lets_teammates_actions_reach_the_agent_prior():
    """``model.agent_prior_input``: with "zhat_g" (the paper) and the sample ẑ^g held fixed, agent i's prior
    p(ẑ^a | h^a, ẑ^g) after an imagined step does not depend on its teammates' actions (they reach it only
    through ẑ^g); with "zhat_g+h_g" it does, through h^g, which saw the joint action. Other modules start
    from the same weights either way; the posterior is unchanged; without a global level it is an error."""
    torch.manual_seed(5)
    plain = BiLevelWorldModel(SPEC, tiny().model)
    torch.manual_seed(5)
    m = BiLevelWorldModel(SPEC, tiny(agent_prior_input="zhat_g+h_g").model)
    sd, sd_plain = m.state_dict(), plain.state_dict()
    assert set(sd) - set(sd_plain) == {"agent_prior.0.parts.2.weight"}
    for k, v in sd_plain.items():
        assert torch.equal(sd[k], v), k
    b = batch()
    with torch.no_grad():
        post, _, _ = m.observe(b["obs"], b["state"], b["prev_action"], b["is_first"])
        post_plain, _, _ = plain.observe(b["obs"], b["state"], b["prev_action"], b["is_first"])
        torch.manual_seed(0)
        ref = plain.observe(b["obs"], b["state"], b["prev_action"], b["is_first"], sample=False)[1]["post_a"]
        torch.manual_seed(0)
        assert torch.equal(m.observe(b["obs"], b["state"], b["prev_action"], b["is_first"], sample=False)[1]["post_a"], ref)
        st = post.map(lambda x: x[-1])  # [B, N, ...]
        a1 = torch.nn.functional.one_hot(torch.tensor([0, 1, 2]), SPEC.action_dim).float().expand(2, -1, -1)
        a2 = a1.clone()
        a2[:, 1:] = torch.nn.functional.one_hot(torch.tensor([4, 4]), SPEC.action_dim).float()  # teammates differ
        for model, follows in ((plain, False), (m, True)):
            h_a = model.agent_gru(torch.relu(model.agent_in(st.z_a, a1)), st.h_a)
            hg = [model.global_gru(torch.relu(model.global_in(st.z_g, model.joint_action(a))), st.h_g) for a in (a1, a2)]
            h_a2 = model.agent_gru(torch.relu(model.agent_in(st.z_a, a2)), st.h_a)
            assert torch.equal(h_a[:, 0], h_a2[:, 0])  # agent 0's h^a: its own action only
            zg = st.z_g  # the same ẑ^g sample in both cases
            p1, p2 = (model._agent_prior(h_a[:, :1], zg[:, :1], h[:, :1]) for h in hg)
            assert torch.allclose(p1, p2) != follows
    with pytest.raises(ConfigError, match="agent_prior_input"):
        tiny(agent_prior_input="zhat_g+h_g", bilevel=False)
    with pytest.raises(ConfigError, match="agent_prior_input"):
        tiny(agent_prior_input="h_g")


def test_unimix_mixes_every_latent_distribution():
    """``model.unimix`` (extension): each categorical is (1-u) softmax + u/K, by hand; u = 0 leaves the logits
    untouched; the model's posteriors and priors of both levels, and the decentralized policy's posterior,
    use the mixture, so every class keeps probability >= u/K; u outside [0, 1) is a config error."""
    torch.manual_seed(0)
    x = torch.randn(5, 2 * 4)
    assert unimix_logits(x, 4, 0.0) is x
    mixed = unimix_logits(x, 4, 0.1).exp().unflatten(-1, (2, 4))
    by_hand = 0.9 * torch.softmax(x.unflatten(-1, (2, 4)), -1) + 0.1 / 4
    assert torch.allclose(mixed, by_hand, atol=1e-6) and torch.allclose(mixed.sum(-1), torch.ones(5, 2), atol=1e-6)
    u = 0.2
    cfg = tiny(unimix=u)
    K = cfg.model.n_classes
    b = batch()
    torch.manual_seed(1)
    m = BiLevelWorldModel(SPEC, cfg.model)
    torch.manual_seed(1)
    ref = BiLevelWorldModel(SPEC, tiny().model)  # same weights, no mixing
    with torch.no_grad():
        _, logits, _ = m.observe(b["obs"], b["state"], b["prev_action"], b["is_first"], sample=False)
        _, ref_logits, _ = ref.observe(b["obs"], b["state"], b["prev_action"], b["is_first"], sample=False)
    for k in ("post_a", "post_g", "prior_g"):
        p = logits[k].exp().unflatten(-1, (-1, K))
        assert torch.allclose(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-5), k
        assert p.min() >= u / K - 1e-6, k
        assert torch.allclose(logits[k], unimix_logits(ref_logits[k], K, u), atol=1e-5), k
    assert logits["prior_a"].exp().min() >= u / K - 1e-6
    from mabl.agent import DecentralizedPolicy
    from mabl.policy import Actor
    actor = Actor(m.feat_a, SPEC.action_dim, 8, 1, True)
    pol = DecentralizedPolicy(m, actor)
    with torch.no_grad():
        m.agent_post[2].weight.mul_(30)  # peaked posteriors, so that the mixture differs from them
        _, logits, _ = m.observe(b["obs"], b["state"], b["prev_action"], b["is_first"], sample=False)
        carry = pol.initial(SPEC.n_agents)
        _, _, new, _ = pol.step(b["obs"][0, 0], None, carry, generator=torch.Generator().manual_seed(5))
        h = m.agent_gru(torch.relu(m.agent_in(carry.z_a, carry.prev_action)), carry.h_a)
        raw = m.agent_post[2](torch.relu(m.agent_post[0](h, m.obs_encoder(b["obs"][0, 0]))))
        post = unimix_logits(raw, K, u)
        assert torch.allclose(logits["post_a"][0, 0], post, atol=1e-5)  # observe's first step
        # the acting agent samples its latent from the same mixture: 20,000 rows of agent 0's first step
        rows = 20_000
        _, _, many, _ = pol.step(b["obs"][0, 0, :1].expand(rows, -1), None, pol.initial(rows),
                                 generator=torch.Generator().manual_seed(5))
        freq = many.z_a.unflatten(-1, (-1, K)).mean(0)
        mixed, unmixed = (x[0].unflatten(-1, (-1, K)).softmax(-1) for x in (post, raw))
        assert (freq - mixed).abs().max() < 0.02 < (freq - unmixed).abs().max()
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="unimix"):
            tiny(unimix=bad)


@pytest.mark.parametrize("variant", [dict(), dict(agent_prior_input="zhat_g+h_g", unimix=0.01), dict(bilevel=False)],
                         ids=["bilevel", "prior-h_g-unimix", "no-global"])
def test_imagine_latent_mode_takes_each_categoricals_most_likely_class(variant):
    """``model.imagine_latent="mode"`` (extension): imagination's prior latents are the argmax class of
    every categorical (ẑ^g from p(ẑ^g | h^g), then ẑ^a from the agent prior given that ẑ^g), so a step
    is deterministic; "sample" (the paper) draws them; an unknown value is a config error."""
    b = batch()
    torch.manual_seed(2)
    m = BiLevelWorldModel(SPEC, tiny(imagine_latent="mode", **variant).model)
    K = m.cfg.n_classes
    with torch.no_grad():
        post, _, _ = m.observe(b["obs"], b["state"], b["prev_action"], b["is_first"])
        start = post.map(lambda x: x[-1])
        act = torch.nn.functional.one_hot(torch.randint(0, 5, (2, 3)), 5).float()
        one, two = m.imagine_step(start, act), m.imagine_step(start, act)
        for name in ("z_a", "z_g"):
            x, y = getattr(one, name), getattr(two, name)
            assert (x is None) == (y is None) == (name == "z_g" and not m.bilevel)
            if x is not None:
                assert torch.equal(x, y), name
        h_a = m.agent_gru(torch.relu(m.agent_in(start.z_a, act)), start.h_a)
        assert torch.allclose(one.h_a, h_a, atol=1e-6)
        mode = lambda logits: torch.nn.functional.one_hot(logits.unflatten(-1, (-1, K)).argmax(-1), K).flatten(-2).float()  # noqa: E731
        if m.bilevel:
            assert torch.equal(one.z_g, mode(m.global_prior(one.h_g)))
            assert torch.equal(one.z_a, mode(m._agent_prior(one.h_a, m._expand_g(one.z_g), m._expand_g(one.h_g))))
        else:
            assert torch.equal(one.z_a, mode(m.agent_prior(one.h_a)))
        # the paper's sampling draws other classes from the same state
        m.cfg = tiny(imagine_latent="sample", **variant).model
        torch.manual_seed(3)
        assert not torch.equal(m.imagine_step(start, act).z_a, one.z_a)
    with pytest.raises(ConfigError, match="imagine_latent: 'argmax'; accepted: sample, mode"):
        tiny(imagine_latent="argmax")


def test_imagine_temperature_samples_softmax_of_logits_over_temperature():
    """``model.imagine_temperature`` (extension): imagination samples each prior categorical from
    softmax(logits / T). Class frequencies over many draws match that distribution (and not the T=1 one);
    a tiny T gives the mode; T=1 is the paper's draw; T <= 0 is a config error."""
    torch.manual_seed(0)
    m = BiLevelWorldModel(SPEC, tiny(imagine_temperature=0.5).model)
    K = m.cfg.n_classes
    logits = torch.randn(1, m.stoch)
    many = logits.expand(20_000, -1)
    with torch.no_grad():
        freq = m.imagine_draw(many).unflatten(-1, (-1, K)).mean(0)
        sharp = torch.softmax(logits.unflatten(-1, (-1, K)) / 0.5, -1)[0]
        plain = torch.softmax(logits.unflatten(-1, (-1, K)), -1)[0]
        assert (freq - sharp).abs().max() < 0.02 < (freq - plain).abs().max()
        m.cfg = tiny(imagine_temperature=1e-4).model
        mode = torch.nn.functional.one_hot(logits.unflatten(-1, (-1, K)).argmax(-1), K).flatten(-2).float()
        assert torch.equal(m.imagine_draw(logits), mode)
        m.cfg = tiny(imagine_latent="mode", imagine_temperature=3.0).model  # the mode ignores the temperature
        assert torch.equal(m.imagine_draw(logits), mode)
    for bad in (0.0, -1.0):
        with pytest.raises(ConfigError, match="imagine_temperature must be > 0"):
            tiny(imagine_temperature=bad)


@pytest.mark.parametrize("variant", [dict(), dict(bilevel=False)], ids=["bilevel", "no-global"])
def test_ensemble_learns_the_next_agent_latent_and_its_disagreement(variant):
    """``model.ensemble`` (extension): one loss term, by hand: every member's squared error on q(z^a_{t+1})
    (the posterior's class probabilities, recomputed from h^a and o^i) from the detached (z^a_t, h^a_t[, z^g_t, h^g_t]) and a^i_t, within episodes; its gradient reaches
    only the ensemble. :meth:`disagreement` is the members' variance (zero when they are identical)."""
    b = batch()
    b["is_first"][3, 1] = True  # a reset inside one sequence: that transition is not a target
    torch.manual_seed(0)
    m = BiLevelWorldModel(SPEC, tiny(ensemble=3, **variant).model)
    total, terms, post = m.loss(b)
    fa, fg = m.features(post)
    x = torch.cat([fa[:-1]] + ([] if fg is None else [fg[:-1]]) + [b["prev_action"][1:]], -1)
    errs = []
    for k in range(3):
        pred = torch.relu(x @ m.ensemble.w1[k] + m.ensemble.b1[k]) @ m.ensemble.w2[k] + m.ensemble.b2[k]
        probs = torch.softmax(m._mix(m.agent_post[2](torch.relu(m.agent_post[0](post.h_a, m.obs_encoder(m.norm_obs(b["obs"])))))).unflatten(-1, (m.n_cat, -1)), -1)
        errs.append((pred - probs[1:].flatten(-2)).pow(2).sum(-1) / m.n_cat)
    valid = ~b["is_first"][1:]
    want = torch.stack(errs)[:, valid].mean()
    assert torch.allclose(terms["ensemble"], want, rtol=1e-5)
    m.zero_grad()
    post2, logits2, _ = m.observe(b["obs"], b["state"], b["prev_action"], b["is_first"])
    term = m._ensemble_terms(b, *m.features(post2), logits2)["ensemble"]
    term.backward()
    assert m.ensemble.w1.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for n, p in m.named_parameters() if not n.startswith("ensemble."))
    # disagreement: shape [..., N], positive for independent members, zero for identical ones
    u = m.disagreement(fa[:-1], None if fg is None else fg[:-1], b["prev_action"][1:])
    assert u.shape == (fa.shape[0] - 1, *fa.shape[1:-1])  # [T-1, B, N]
    assert (u > 0).all()
    with torch.no_grad():
        for w in (m.ensemble.w1, m.ensemble.b1, m.ensemble.w2, m.ensemble.b2):
            w[1:] = w[0]
    assert m.disagreement(fa[:-1], None if fg is None else fg[:-1], b["prev_action"][1:]).abs().max() < 1e-10
    assert "ensemble" not in BiLevelWorldModel(SPEC, tiny(**variant).model).loss(b)[1]


def test_disagreement_needs_an_ensemble():
    with pytest.raises(ConfigError, match="ppo.disagreement=0.5 needs model.ensemble >= 2"):
        make_config("tiny", "smax:3m", {"ppo": {"disagreement": 0.5}, "model": {"ensemble": 1}})
    with pytest.raises(ConfigError, match="model.ensemble must be >= 0"):
        tiny(ensemble=-1)


def test_prior_heads_train_the_heads_on_one_step_prior_samples():
    """``model.prior_heads`` (extension): two extra terms, the reward and termination losses of the heads on
    (ẑ^a ~ p(ẑ^a | h^a, ẑ^g), h^a, ẑ^g, h^g) with the posterior rollout's h and the ẑ^g the agent prior was
    conditioned on, times the weight; by hand with the same samples; their gradients reach both priors;
    0 leaves the loss as it was; a negative weight is a config error."""
    b = batch()
    torch.manual_seed(2)
    ref = BiLevelWorldModel(SPEC, tiny().model)
    torch.manual_seed(2)
    m = BiLevelWorldModel(SPEC, tiny(prior_heads=0.5, reward_input="agent+global").model)
    torch.manual_seed(3)
    _, m0, _ = ref.loss(b)
    assert "reward_prior" not in m0 and "cont_prior" not in m0
    torch.manual_seed(3)
    total, m1, _ = m.loss(b)
    assert set(m1) - set(m0) == {"reward_prior", "cont_prior"}
    # by hand, replaying the random stream: the posterior rollout, the ẑ^g sample, then the ẑ^a sample
    torch.manual_seed(3)
    post, logits, _ = m.observe(b["obs"], b["state"], b["prev_action"], b["is_first"])
    za = m._sample(logits["prior_a"], True)
    both = torch.cat([za, post.h_a, logits["zhat_g"], post.h_g], -1)
    r_hand = 0.5 * m._reward_loss(m.reward_head(both).squeeze(-1), b["reward"])
    cont_t = b["cont"].unsqueeze(-1).expand(*b["cont"].shape, 3)
    c_hand = 0.5 * torch.nn.functional.binary_cross_entropy_with_logits(m.cont_head(both).squeeze(-1), cont_t)
    assert torch.allclose(m1["reward_prior"], r_hand.detach(), atol=1e-5)
    assert torch.allclose(m1["cont_prior"], c_hand.detach(), atol=1e-5)
    m.zero_grad()
    (r_hand + c_hand).backward()
    for net in (m.agent_prior, m.global_prior):
        assert net[-1].weight.grad is not None and net[-1].weight.grad.abs().sum() > 0
    assert m.obs_decoder[0].weight.grad is None  # only the heads' terms were back-propagated
    with pytest.raises(ConfigError, match="prior_heads"):
        tiny(prior_heads=-1.0)


def replace_latent(st, **kw):
    return dataclasses.replace(st, **kw)


def test_categorical_kl_matches_torch_distributions():
    torch.manual_seed(0)
    p, q = torch.randn(5, 4 * 6), torch.randn(5, 4 * 6)
    ours = categorical_kl(p, q, 4)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=p.view(5, 4, 6)), torch.distributions.Categorical(logits=q.view(5, 4, 6))
    ).sum(-1)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_kl_balancing_value_and_gradient_split():
    torch.manual_seed(1)
    post = torch.randn(3, 8, requires_grad=True)
    prior = torch.randn(3, 8, requires_grad=True)
    val = kl_balanced(post, prior, 2, 0.8)
    assert torch.allclose(val, categorical_kl(post, prior, 2), atol=1e-6)  # the value is the plain KL
    val.sum().backward()
    g_post, g_prior = post.grad.clone(), prior.grad.clone()
    post.grad = prior.grad = None
    categorical_kl(post, prior, 2).sum().backward()
    assert torch.allclose(g_prior, 0.8 * prior.grad, atol=1e-6)  # prior pulled toward posterior with 0.8
    assert torch.allclose(g_post, 0.2 * post.grad, atol=1e-6)  # posterior regularized with 0.2


def test_straight_through_sample():
    torch.manual_seed(0)
    logits = torch.randn(2000, 3, 4, requires_grad=True)
    z = sample_onehot(logits)
    assert torch.allclose(z.detach().sum(-1), torch.ones(2000, 3), atol=1e-6)
    freq = z.detach().mean(0)
    assert torch.allclose(freq, torch.softmax(logits.detach(), -1).mean(0), atol=0.05)
    w = torch.randn(4)
    (z * w).sum().backward()
    p = torch.softmax(logits.detach(), -1)
    expected = p * (w - (p * w).sum(-1, keepdim=True))  # d/dlogits of sum(softmax * w)
    assert torch.allclose(logits.grad, expected, atol=1e-5)


def test_kl_scale_counts_categoricals():
    cfg = make_config("paper", "smax:3m").model
    assert math.isclose(cfg.kl_scale, 1 / 32) and cfg.n_categoricals == 32 and cfg.n_classes == 32
    assert np.isclose(cfg.kl_balance, 0.8)


@pytest.mark.parametrize("kind", ["mse", "smooth_l1"])
def test_reward_loss_by_hand(kind):
    """``model.reward_loss``: Gaussian NLL (default) or Huber with delta 1 (the authors' code), in the total."""
    cfg = tiny(reward_loss=kind)
    torch.manual_seed(0)
    model = BiLevelWorldModel(SPEC, cfg.model)
    b = batch()
    b["reward"] = b["reward"] * 5  # errors on both sides of the Huber kink
    _, m, post = model.loss(b)
    with torch.no_grad():
        d = model.heads(post)["reward"] - b["reward"]
    if kind == "mse":
        expect = (0.5 * d ** 2).mean()
    else:
        expect = torch.where(d.abs() < 1, 0.5 * d ** 2, d.abs() - 0.5).mean()
        assert (d.abs() > 1).any() and (d.abs() < 1).any()
    assert torch.allclose(m["reward"], expect, rtol=1e-5, atol=1e-6)


def test_obs_norm_standardizes_encoder_input_and_decoder_target():
    """model.obs_norm: running statistics equal the pooled ones until the window is full, the floor keeps
    constant features finite, the loss reads the standardized target, decode_obs inverts it, and the
    statistics are model state (the decentralized policy reads the same ones)."""
    from mabl.world_model import ObsNorm
    from mabl.agent import DecentralizedPolicy
    from mabl.policy import Actor

    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 4, generator=g) * torch.tensor([0.1, 1.0, 3.0, 0.0]) + torch.tensor([0.5, -1.0, 2.0, 7.0])
    norm = ObsNorm(4, window=10_000)
    for chunk in a.split(70):
        norm.update(chunk)
    assert torch.allclose(norm.mean, a.mean(0), atol=1e-5)
    assert torch.allclose(norm.var, a.var(0, unbiased=False), atol=1e-4)
    assert float(norm.count) == 300 and float(norm.std()[3]) == pytest.approx(ObsNorm.FLOOR)
    x = torch.randn(5, 4, generator=g)
    assert torch.allclose(norm.invert(norm(x)), x, atol=1e-5)
    capped = ObsNorm(4, window=100)
    for chunk in a.split(50):
        capped.update(chunk)
    assert float(capped.count) == 100  # beyond the window: an exponential average

    from mabl.world_model import gaussian_nll

    spec = SPEC
    model = BiLevelWorldModel(spec, tiny(obs_norm=True).model)
    assert "obs_norm.mean" in model.state_dict()
    assert "obs_norm.mean" not in BiLevelWorldModel(spec, tiny().model).state_dict()
    batch = globals()["batch"]()
    model.obs_norm.update(batch["obs"])
    assert torch.allclose(model.norm_obs(batch["obs"]).flatten(0, -2).mean(0), torch.zeros(spec.obs_dim), atol=1e-4)
    loss, terms, post = model.loss(batch)
    assert torch.isfinite(loss)
    fa, _ = model.features(post)
    with torch.no_grad():
        target = model.norm_obs(batch["obs"])
        assert torch.allclose(terms["obs"], gaussian_nll(model.obs_decoder(fa), target).mean(), rtol=1e-4)
        assert torch.allclose(model.decode_obs(fa), model.obs_norm.invert(model.obs_decoder(fa).float()))
    pol = DecentralizedPolicy(model, Actor(model.feat_a, spec.action_dim, 16, 1, True))
    assert pol.obs_norm is model.obs_norm
    obs = batch["obs"][0, 0]
    carry = pol.initial(spec.n_agents)
    feat_on, _, _ = pol.features(obs, carry, deterministic=True)
    pol.obs_norm = None
    feat_manual, _, _ = pol.features(model.norm_obs(obs), carry, deterministic=True)
    assert torch.equal(feat_on, feat_manual)  # execution reads the standardized observation



@pytest.mark.parametrize("fused", [False, True])
def test_state_norm_standardizes_the_global_posterior_input_and_state_target(fused):
    """model.state_norm: s_t enters q(z^g | s_t, z^a, h^g) and the state decoder's target standardized by
    running statistics the learner updates on every replayed batch; with the same weights, the model with
    the flag on a raw state equals the model without it on the state standardized by hand."""
    from mabl.learner import MABLLearner
    from mabl.world_model import gaussian_nll

    cfg = tiny(state_decoder=True, state_norm=True)
    cfg = replace(cfg, run={"fused_recurrence": fused, "fused_heads": fused, "fused_kl": fused})
    torch.manual_seed(0)
    learner = MABLLearner(SPEC, cfg)
    model = learner.model
    assert "state_norm.mean" in model.state_dict()
    assert "state_norm.mean" not in BiLevelWorldModel(SPEC, tiny().model).state_dict()
    with pytest.raises(ConfigError, match="model.state_norm needs model.bilevel"):
        tiny(state_norm=True, bilevel=False)
    b = batch()
    b["state"] = b["state"] * 5.0 + 3.0  # far from standardized
    learner.train_model_step(b)
    assert float(model.state_norm.count) == b["state"].numel() / SPEC.state_dim
    assert torch.allclose(model.norm_state(b["state"]).flatten(0, -2).mean(0), torch.zeros(SPEC.state_dim), atol=1e-4)

    off = BiLevelWorldModel(SPEC, replace(cfg, model={"state_norm": False}).model, model.speed)
    missing, unexpected = off.load_state_dict(model.state_dict(), strict=False)
    assert not missing and set(unexpected) == {"state_norm.mean", "state_norm.var", "state_norm.count"}
    model.eval(), off.eval()
    args = (b["prev_action"], b["is_first"])
    with torch.no_grad():
        normed = model.norm_state(b["state"])
        post_on, logits_on, _ = model.observe(b["obs"], b["state"], *args, sample=False)
        _, logits_hand, _ = off.observe(b["obs"], normed, *args, sample=False)
        _, logits_raw, _ = off.observe(b["obs"], b["state"], *args, sample=False)
        assert torch.allclose(logits_on["post_g"], logits_hand["post_g"], atol=1e-5)
        assert not torch.allclose(logits_on["post_g"], logits_raw["post_g"], atol=1e-3)
        assert torch.equal(logits_on["post_a"], logits_raw["post_a"])  # the agent level never reads s_t
        _, terms, post = model.loss(b)
        _, fg = model.features(post)
        expected = gaussian_nll(model.state_decoder(fg).float(), normed.unsqueeze(-2)).mean()
        raw = gaussian_nll(model.state_decoder(fg).float(), b["state"].unsqueeze(-2)).mean()
        assert torch.allclose(terms["state"].float(), expected, rtol=1e-3)  # the standardized target ...
        assert not torch.allclose(terms["state"].float(), raw, rtol=0.1)  # ... not the raw one
