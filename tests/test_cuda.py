"""The learner on a CUDA GPU computes what it computes on the CPU.

These tests need a CUDA device and are skipped without one (CI has none; they were run on an
NVIDIA H200, see BENCHMARKS.md "Learner on a CUDA GPU"). They check:
(a) the world-model loss and every gradient on CUDA equal the CPU's in fp32, for the plain and the
    fused paths, given the same weights and the same sampling noise;
(b) the actor and the centralized critic give the same outputs on both devices;
(c) a short optimized training (bf16 autocast on the GPU) learns, keeps everything on the GPU,
    and a full Algorithm-1 update (model steps, imagination, PPO) reports finite metrics;
(d) a learner checkpoint written on the GPU loads into a CPU learner (``map_location``) and acts
    identically there.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from mabl.config import make_config
from mabl.fast import PLAIN, Speed
from mabl.learner import MABLLearner, resolve_device
from mabl.world_model import BiLevelWorldModel
from test_speed_equivalence import SPEC  # the toy task and synthetic data of the CPU equivalence tests
from test_speed_equivalence import _batch as toy_batch
from test_speed_equivalence import _synthetic_buffer as toy_buffer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SMALL = dict(hidden=32, deter=32, embed=32, n_categoricals=4, n_classes=8, batch_size=8, seq_len=10, lr=3e-3)


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 matmuls as fp32 on the GPU (no TF32), so CPU and GPU agree to rounding."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture
def cpu_noise(monkeypatch):
    """``torch.rand_like`` (the Gumbel noise of the plain sampler) drawn from one CPU generator and
    moved to the tensor's device: the same noise on both devices. The fixture's value reseeds that
    generator (``cpu_noise(seed)``); call it before each pass."""
    gen = torch.Generator()

    def rand_like(x, *args, **kwargs):
        return torch.rand(x.shape, generator=gen, dtype=x.dtype).to(x.device)

    monkeypatch.setattr(torch, "rand_like", rand_like)
    return lambda seed=1: gen.manual_seed(seed)


def _batch(device="cpu"):
    return {k: v.to(device) for k, v in toy_batch().items()}


def _synthetic_buffer():
    return toy_buffer(SPEC)


def _max_rel(a_list, b_list):
    return max(float((a.cpu() - b.cpu()).abs().max() / (a.abs().max().cpu() + 1e-8)) for a, b in zip(a_list, b_list))


def test_auto_device_is_the_gpu():
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cuda:0") == torch.device("cuda:0")


@pytest.mark.parametrize("speed", [PLAIN, Speed(fused_recurrence=True, fused_heads=True, fused_kl=True)],
                         ids=["plain", "fused"])
@pytest.mark.parametrize("variant", [dict(), dict(single_global=True), dict(agent_prior_input="zhat_g+h_g", unimix=0.01)],
                         ids=["bilevel", "single-global", "prior-h_g-unimix"])
def test_world_model_loss_and_gradients_match_cpu(cpu_noise, speed, variant):
    cfg = make_config("tiny", "smax:3m", {"model": variant} if variant else None)
    torch.manual_seed(0)
    cpu = BiLevelWorldModel(SPEC, cfg.model, speed=speed)
    gpu = BiLevelWorldModel(SPEC, cfg.model, speed=speed)
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    out = []
    for model, dev in ((cpu, "cpu"), (gpu, "cuda")):
        cpu_noise(1)
        loss, metrics, _ = model.loss(_batch(device=dev))
        grads = torch.autograd.grad(loss, list(model.parameters()))
        out.append((loss.detach().cpu(), {k: v.detach().cpu() for k, v in metrics.items()}, grads))
    (l0, m0, g0), (l1, m1, g1) = out
    assert torch.allclose(l0, l1, rtol=1e-4, atol=1e-5), (l0, l1)
    for k in m0:
        assert torch.allclose(m0[k], m1[k], rtol=1e-4, atol=1e-5), (k, m0[k], m1[k])
    assert all(g.device.type == "cuda" for g in g1)
    assert _max_rel(g0, g1) < 1e-3


def _learner(device, optimized=False):
    flags = {f: optimized for f in ("fused_recurrence", "fused_heads", "fast_sampling", "fused_kl", "fast_critic", "fused_adam")}
    cfg = make_config("tiny", "smax:3m", {"model": SMALL, "run": dict(bf16=optimized, compile=False, tune_malloc=False, **flags)})
    torch.manual_seed(0)
    return MABLLearner(SPEC, cfg, device)


def _greedy_rollout(learner, obs, avail):
    """Deterministic decentralized acting (mode latents, mode actions): actions and logits per step."""
    dev = learner.device
    carry = learner.policy.initial(SPEC.n_agents, device=dev)
    acts, logits = [], []
    with torch.no_grad():
        for t in range(obs.shape[0]):
            raw, _, carry, params = learner.policy.step(obs[t].to(dev), avail.to(dev), carry, deterministic=True)
            acts.append(raw.cpu())
            logits.append(params.float().cpu())
    return torch.stack(acts), torch.stack(logits)


def _assert_same_policy(cpu, gpu):
    """The deterministic decentralized rollouts of two learners: equal actions, logits to rounding."""
    obs, avail = _obs()
    avail[:, 0] = True
    a_c, l_c = _greedy_rollout(cpu, obs, avail)
    a_g, l_g = _greedy_rollout(gpu, obs, avail)
    assert torch.equal(a_c, a_g)
    finite = torch.isfinite(l_c)
    assert torch.equal(finite, torch.isfinite(l_g))  # the same actions masked out
    assert torch.allclose(l_c[finite], l_g[finite], rtol=1e-4, atol=1e-5)


def _obs(seed=5, T=10):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, SPEC.n_agents, SPEC.obs_dim, generator=g), torch.rand(SPEC.n_agents, SPEC.action_dim, generator=g) > 0.3


def test_policy_and_critic_match_cpu():
    """Same weights: the decentralized policy (encoder, agent GRU, agent posterior, actor) gives the
    same logits and actions on both devices, and the attention critic the same values."""
    cpu, gpu = _learner("cpu"), _learner("cuda")
    gpu.model.load_state_dict(cpu.model.state_dict())
    gpu.algo.load_state_dict(cpu.algo.state_dict())
    _assert_same_policy(cpu, gpu)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(16, SPEC.n_agents, cpu.algo.critic.embed.in_features, generator=g)
    with torch.no_grad():
        v_c, v_g = cpu.algo.critic(x), gpu.algo.critic(x.cuda())
    assert v_g.device.type == "cuda"
    assert torch.allclose(v_c, v_g.cpu(), rtol=1e-4, atol=1e-5)


def test_optimized_training_on_gpu_learns_and_stays_there():
    learner = _learner("cuda", optimized=True)
    assert learner.speed.bf16 == torch.cuda.is_bf16_supported()
    buf = _synthetic_buffer()
    rng = np.random.default_rng(0)
    losses = [learner.train_model_step(buf.sample(8, 10, rng, learner.device)) for _ in range(40)]
    assert losses[-1]["model/loss"] < 0.8 * losses[0]["model/loss"], (losses[0]["model/loss"], losses[-1]["model/loss"])
    m = learner.update(buf, rng)
    assert all(np.isfinite(v) for v in m.values() if isinstance(v, float))
    assert m["time/update_s"] > 0
    for p in list(learner.model.parameters()) + list(learner.algo.parameters()):
        assert p.device.type == "cuda"


def test_gpu_checkpoint_loads_on_cpu_and_acts_the_same():
    gpu = _learner("cuda")
    buf = _synthetic_buffer()
    gpu.update(buf, np.random.default_rng(0))  # trained weights, not the initial ones
    blob = io.BytesIO()
    torch.save(gpu.state_dict(), blob)
    blob.seek(0)
    cpu = _learner("cpu")
    cpu.load_state_dict(torch.load(blob, map_location="cpu", weights_only=False))
    for k, v in cpu.model.state_dict().items():
        assert v.device.type == "cpu"
        assert torch.equal(v, gpu.model.state_dict()[k].cpu()), k
    # the decentralized policy: the same deterministic actions and logits from the same observations
    _assert_same_policy(cpu, gpu)
