"""Speed switches and the fused kernels behind them (GitHub issue "Speed").

Every optimization of the post-episode learner update is a flag of :class:`Speed` (read from
``RunConfig``); ``Speed()`` with every flag off is the plain fp32 eager path the tests compare
against. None of them changes what is computed, only how:

* ``bf16``: bf16 matmuls with fp32 master weights. The plain modules run under autocast; the
  fused paths cast each weight once per update step and keep activations that feed matmuls in
  bf16 (softmax, KL, sampling, GRU state and losses stay fp32, as under autocast).
* ``fused_recurrence``: the posterior rollout with the GRU matmul split into its input and
  recurrent parts, every matmul of a recurrent tensor done once for all of its consumers, the
  biases folded into the time-batched projections, both levels' GRU steps in one batched matmul,
  and the recurrent weights' gradients as one matmul over all steps (:class:`LoopLinear`).
* ``fused_heads``: heads that share an input (the decoders, reward/termination/availability heads,
  the actor in imagination) compute their first layers in one matmul per input; imagination
  reuses the predicted availability instead of evaluating the head twice; the world-model loss
  keeps its features in the compute dtype.
* ``fast_sampling``: categorical sampling by inverse CDF (one uniform per categorical instead of
  a Gumbel per class, no argmax) with an analytic straight-through backward, in cache-sized
  chunks: the same distribution and the same gradient (that of ``softmax(logits)``), another
  random stream.
* ``fused_kl``: the balanced KL computed once with its two gradient weights applied in one
  analytic backward (the plain path computes the KL three times).
* ``fast_critic``: the attention across agents as head-blocked batched matmuls with an explicit
  small-dim softmax, the critic's first layer split by input (no 2560-wide concatenation), PPO
  features stored in the compute dtype.
* ``fused_adam``: ``torch.optim.Adam(fused=True)`` and foreach gradient clipping.
* ``compile``: ``torch.compile`` of the PPO minibatch losses (first compile costs minutes).
* ``gather_onehot``: a matmul whose input is a one-hot latent (32 ones in 1024 columns) done as a
  gather-sum of the 32 selected weight columns (``embedding_bag``) in the forward pass; the
  backward stays dense (PyTorch's scatter-adds are slower than the matmul). Used in fp32 only
  (no native bf16): there the matmul runs at ~130 GFLOP/s and the gather is ~6x faster.
* ``tune_malloc`` (process-wide, one-way): glibc keeps freed memory instead of returning every
  large tensor to the kernel, which otherwise zero-fills fresh pages on each reallocation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Speed:
    bf16: bool = False
    fused_recurrence: bool = False
    fused_heads: bool = False
    fast_sampling: bool = False
    fused_kl: bool = False
    fast_critic: bool = False
    fused_adam: bool = False
    compile: bool = False
    tune_malloc: bool = False
    gather_onehot: bool = False

    @property
    def gather(self) -> bool:
        """One-hot latents times a weight as a gather-sum (fp32 only: with native bf16 the AMX
        matmul was measured as fast as the gather, and the gather's indices need exact one-hots)."""
        return self.gather_onehot and not self.bf16

    @classmethod
    def from_run(cls, run, device: torch.device | str | None = None) -> "Speed":
        """The switches of a :class:`mabl.config.RunConfig`. With a ``device``, ``bf16`` is kept
        only where that device multiplies bf16 natively (:func:`native_bf16`)."""
        flags = {f.name: bool(getattr(run, f.name)) for f in fields(cls)}
        if device is not None and flags["bf16"] and not native_bf16(device):
            flags["bf16"] = False
        return cls(**flags)

    @classmethod
    def all_on(cls, bf16: bool = True) -> "Speed":
        return cls(**{f.name: (bf16 if f.name == "bf16" else f.name not in ("compile", "tune_malloc")) for f in fields(cls)})

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    def describe(self) -> str:
        on = [f.name for f in fields(self) if getattr(self, f.name)]
        return ",".join(on) if on else "plain-fp32-eager"


PLAIN = Speed()


def sync(device: torch.device | str) -> None:
    """Wait for ``device``'s queued kernels (CUDA runs them asynchronously), so that a wall-clock
    reading after it times the work, not its launch. A no-op on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` runs bf16 matmuls in hardware: CUDA with bf16 support, or a CPU with
    AMX tiles or AVX512-BF16. Elsewhere (e.g. an AVX2-only CPU) oneDNN emulates bf16 at ~1 GFLOP/s,
    about 100x slower than fp32, so ``run.bf16`` falls back to fp32 there."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    cpu = torch.cpu
    return any(bool(getattr(cpu, name, lambda: False)()) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def no_autocast(device_type: str):
    """The fused paths manage dtypes themselves."""
    return torch.autocast(device_type, enabled=False)


# ------------------------------------------------------------------------------------------
# linear algebra helpers

class Caster:
    """Casts parameters to the compute dtype once per forward pass (autocast's weight cache,
    without autocast's per-op dispatch). Inside autograd the cast is part of the graph, so the
    fp32 master weights get the (accumulated) gradient."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self._cache: dict[int, torch.Tensor] = {}

    def __call__(self, p: torch.Tensor | None) -> torch.Tensor | None:
        if p is None:
            return None
        out = self._cache.get(id(p))
        if out is None:
            out = self._cache[id(p)] = p.to(self.dtype)
        return out


def _cast_fn(dtype_or_caster):
    if isinstance(dtype_or_caster, Caster):
        return dtype_or_caster, dtype_or_caster.dtype
    return (lambda p: None if p is None else p.to(dtype_or_caster)), dtype_or_caster


def mlp_tail(seq: nn.Sequential, pre: torch.Tensor, dtype) -> torch.Tensor:
    """Run ``seq`` (an :func:`mabl.nets.mlp`) from the pre-activation of its first Linear.
    ``dtype``: a torch dtype or a :class:`Caster`."""
    c, _ = _cast_fn(dtype)
    x = F.relu(pre)
    for mod in list(seq)[2:]:
        if isinstance(mod, nn.Linear):
            x = F.linear(x, c(mod.weight), c(mod.bias))
        else:
            x = mod(x)
    return x


def mlp_forward(seq: nn.Sequential, x: torch.Tensor, dtype) -> torch.Tensor:
    c, dt = _cast_fn(dtype)
    x = x.to(dt)
    for mod in seq:
        if isinstance(mod, nn.Linear):
            x = F.linear(x, c(mod.weight), c(mod.bias))
        else:
            x = mod(x)
    return x


class FusedLinears:
    """Several Linear layers fed by shared source tensors, one matmul per source.

    ``add(name, bias, {source: weight_block})`` declares a layer ``y = Σ_s x_s W_s^T + b``;
    :meth:`project` multiplies one source by the stacked blocks of all layers that read it and
    returns the pieces by layer name; :meth:`out` adds a layer's pieces up. A layer's bias is
    folded into the matmul of the first source it lists. Same math as separate layers, with
    fewer and larger matmuls (and a single gradient matmul per source in the backward pass).
    """

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self._layers: list[tuple[str, torch.Tensor | None, dict[str, torch.Tensor]]] = []
        self._built = False
        self._wt: dict[str, torch.Tensor] = {}  # gather tables of project_onehot

    def add(self, name: str, bias: torch.Tensor | None, blocks: dict[str, torch.Tensor]) -> "FusedLinears":
        self._layers.append((name, bias, blocks))
        return self

    def build(self) -> "FusedLinears":
        by_src: dict[str, list[tuple[str, torch.Tensor, torch.Tensor | None]]] = {}
        for name, bias, blocks in self._layers:
            for k, (src, w) in enumerate(blocks.items()):
                by_src.setdefault(src, []).append((name, w, bias if k == 0 else None))
        self.w, self.b, self.names, self.sizes = {}, {}, {}, {}
        for src, items in by_src.items():
            self.w[src] = torch.cat([w for _, w, _ in items], 0).to(self.dtype)
            if any(b is not None for _, _, b in items):
                self.b[src] = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for _, w, b in items]).to(self.dtype)
            else:
                self.b[src] = None
            self.names[src] = [n for n, _, _ in items]
            self.sizes[src] = [w.shape[0] for _, w, _ in items]
        self._built = True
        return self

    def project(self, src: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = F.linear(x, self.w[src], self.b[src])
        return dict(zip(self.names[src], y.split(self.sizes[src], -1)))

    def project_onehot(self, src: str, x: torch.Tensor, idx: torch.Tensor | None, S: int) -> dict[str, torch.Tensor]:
        """:meth:`project` where the first ``S`` columns of ``x`` are a one-hot latent with its
        ones at ``idx`` (``Speed.gather_onehot``: a gather instead of that part of the matmul);
        ``idx=None``: plain :meth:`project`."""
        if idx is None:
            return self.project(src, x)
        wt = self._wt.get(src)
        if wt is None:  # the gather table, once per source
            wt = self._wt[src] = onehot_weight(self.w[src][:, :S])
        y = onehot_linear(x[..., :S], idx, wt)
        if x.shape[-1] > S:
            y = y + F.linear(x[..., S:], self.w[src][:, S:], self.b[src])
        elif self.b[src] is not None:
            y = y + self.b[src]
        return dict(zip(self.names[src], y.split(self.sizes[src], -1)))

    @staticmethod
    def out(name: str, *projs: dict[str, torch.Tensor]) -> torch.Tensor:
        out = None
        for p in projs:
            if p is not None and name in p:
                out = p[name] if out is None else out + p[name]
        return out


# ------------------------------------------------------------------------------------------
# one-hot latents times a weight as a gather (Speed.gather_onehot)

_INDEX_W: dict = {}


def onehot_indices(z: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Positions ``[..., C]`` of the ones of one-hot latents ``z [..., C*K]`` as row numbers of
    :func:`onehot_weight` (column + 1; 0 for a categorical with no one, e.g. a zero initial carry).

    One small matmul with a fixed index matrix (ATen's argmax over 32-wide rows is ~10x slower);
    exact in fp32 for S = C*K < 2^24."""
    S = z.shape[-1]
    key = (S, n_classes, z.device, z.dtype)
    w = _INDEX_W.get(key)
    if w is None:
        w = torch.zeros(S, S // n_classes, dtype=z.dtype, device=z.device)
        cols = torch.arange(S, device=z.device)
        w[cols, cols // n_classes] = (cols + 1).to(z.dtype)
        _INDEX_W[key] = w
    return torch.matmul(z.detach(), w).round_().long()  # (a straight-through one is one up to rounding)


def onehot_weight(w: torch.Tensor) -> torch.Tensor:
    """The table of a gather: ``w [out, S]`` (the latent's block of a Linear weight) as
    ``[S + 1, out]`` rows with a zero row 0 (the padding of an empty categorical)."""
    return torch.cat([w.new_zeros(1, w.shape[0]), w.t()], 0)


class _OneHotLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, wtp, idx):
        ctx.save_for_backward(z, wtp)
        return F.embedding_bag(idx, wtp, mode="sum", padding_idx=0)

    @staticmethod
    def backward(ctx, g):
        z, wtp = ctx.saved_tensors
        gz = g @ wtp[1:].t() if ctx.needs_input_grad[0] else None
        gw = torch.cat([g.new_zeros(1, g.shape[-1]), z.t() @ g], 0) if ctx.needs_input_grad[1] else None
        return gz, gw, None


def onehot_linear(z: torch.Tensor, idx: torch.Tensor, wtp: torch.Tensor) -> torch.Tensor:
    """``z @ w.t()`` for one-hot latents ``z [..., S]`` (ones at :func:`onehot_indices` ``idx``),
    ``wtp = onehot_weight(w)``. Forward: the sum of the selected rows; backward (where a gradient
    is needed): the dense matmuls of a linear layer. Same value and gradients as the matmul."""
    lead = z.shape[:-1]
    i2 = idx.reshape(-1, idx.shape[-1])
    if torch.is_grad_enabled() and (z.requires_grad or wtp.requires_grad):
        y = _OneHotLinear.apply(z.reshape(-1, z.shape[-1]), wtp, i2)
    else:
        y = F.embedding_bag(i2, wtp, mode="sum", padding_idx=0)
    return y.view(*lead, wtp.shape[-1])


def split_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, idx: torch.Tensor | None = None,
                 S: int = 0) -> torch.Tensor:
    """``F.linear(x, w, b)`` where ``x = [S-wide one-hot z | dense rest]``; with ``idx`` (the ones
    of z, :func:`onehot_indices`) the z part is a gather (:func:`onehot_linear`)."""
    if idx is None:
        return F.linear(x, w, b)
    return onehot_linear(x[..., :S], idx, onehot_weight(w[:, :S])) + F.linear(x[..., S:], w[:, S:], b)


# ------------------------------------------------------------------------------------------
# recurrent matmuls with one weight-gradient matmul for all time steps

class _GateW(torch.autograd.Function):
    """``token = 0 * W``: every loop matmul takes ``token`` as an input, so its backward runs
    after all of theirs; it then turns the stashed (input, output-grad) pairs into ``W``'s
    gradient with one matmul."""

    @staticmethod
    def forward(ctx, w, stash):
        ctx.stash = stash
        return w.new_zeros(())

    @staticmethod
    def backward(ctx, _):
        xs, gs = ctx.stash
        if not xs:
            return None, None
        x = torch.cat(xs, -2)
        g = torch.cat(gs, -2)
        xs.clear(), gs.clear()
        return torch.matmul(g.transpose(-1, -2), x), None


class _LinNoWGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token, w, stash):
        ctx.save_for_backward(x, w)
        ctx.stash = stash
        return F.linear(x, w) if w.dim() == 2 else torch.bmm(x, w.transpose(1, 2))

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        if ctx.needs_input_grad[1]:
            ctx.stash[0].append(x)
            ctx.stash[1].append(g)
        gx = torch.matmul(g, w) if ctx.needs_input_grad[0] else None
        return gx, (g.new_zeros(()) if ctx.needs_input_grad[1] else None), None, None


class LoopLinear:
    """``x @ W^T`` used at every step of a recurrence (no bias); ``W [out, in]`` or a stack of
    weights ``[L, out, in]`` applied to ``x [L, rows, in]`` (one batched matmul for L layers).

    Autograd would compute and accumulate one small weight-gradient matmul per step; here the
    per-step backward only computes the input gradient and stashes ``(x_t, g_t)``, and the weight
    gradient is ``G^T X`` in one large matmul once the whole recurrence has been back-propagated.
    Same gradient (summation order differs). Rows of the weight can be selected per call
    (``rows``), e.g. to skip consumers that are not needed at the last step.
    """

    def __init__(self, w: torch.Tensor):
        self.w = w
        self.track = torch.is_grad_enabled() and w.requires_grad
        if self.track:
            self._stash: dict = {}
            self._tokens: dict = {}

    def __call__(self, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        w = self.w if rows is None else self.w[..., rows, :]
        if not self.track:
            return F.linear(x, w) if w.dim() == 2 else torch.bmm(x, w.transpose(1, 2))
        key = (None, None) if rows is None else (rows.start, rows.stop)
        if key not in self._tokens:
            stash = ([], [])
            self._stash[key] = stash
            self._tokens[key] = _GateW.apply(w, stash)
        return _LinNoWGrad.apply(x, self._tokens[key], w.detach(), self._stash[key])


# ------------------------------------------------------------------------------------------
# categorical sampling with a straight-through gradient

def _icdf_onehot(probs: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """One-hot samples of the rows of ``probs [R, K]`` by inverse CDF (one uniform per row)."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, device=probs.device, generator=generator) * cdf[:, -1:]
    above = cdf > u  # monotone 0..0 1..1: the sample is the first class whose cdf exceeds u
    above[:, -1] = True  # u < total up to rounding; never leave a row without a sample
    first = above ^ F.pad(above[:, :-1], (1, 0))  # the 0 -> 1 step
    return first.view(torch.uint8).to(dtype)


class _SampleST(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, n_cls, out_dtype):
        shape = logits.shape
        flat = logits.reshape(-1, n_cls)
        probs = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
        oh = torch.empty(flat.shape, dtype=out_dtype, device=flat.device)
        for i in range(0, flat.shape[0], _CHUNK):  # cache-sized chunks
            probs[i:i + _CHUNK] = torch.softmax(flat[i:i + _CHUNK], -1, dtype=torch.float32)
            oh[i:i + _CHUNK] = _icdf_onehot(probs[i:i + _CHUNK], out_dtype)
        ctx.save_for_backward(probs)
        ctx.shape, ctx.in_dtype = shape, logits.dtype
        return oh.view(shape)

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved_tensors
        g = g.reshape(p.shape)
        out = torch.empty(p.shape, dtype=ctx.in_dtype, device=p.device)
        for i in range(0, p.shape[0], _CHUNK):
            # backward of softmax (d onehot / d logits := d p / d logits): p * (g - <p, g>), one fused op
            out[i:i + _CHUNK] = torch.ops.aten._softmax_backward_data(g[i:i + _CHUNK].float(), p[i:i + _CHUNK], -1, torch.float32)
        return out.view(ctx.shape), None, None


def sample_st(logits: torch.Tensor, n_cls: int, dtype: torch.dtype) -> torch.Tensor:
    """Flattened one-hot samples ``[..., C*K]`` of the categoricals in ``logits [..., C*K]``.

    Forward: an exact one-hot sample from softmax(logits) per categorical; backward: that of
    softmax(logits) (straight-through, DreamerV2), as :func:`mabl.nets.sample_onehot`.
    """
    if torch.is_grad_enabled() and logits.requires_grad:
        return _SampleST.apply(logits, n_cls, dtype)
    flat = logits.reshape(-1, n_cls)
    out = torch.empty(flat.shape, dtype=dtype, device=flat.device)
    for i in range(0, flat.shape[0], _CHUNK):  # cache-sized chunks: softmax, cdf and sample stay in L2
        out[i:i + _CHUNK] = _icdf_onehot(torch.softmax(flat[i:i + _CHUNK], -1, dtype=torch.float32), dtype)
    return out.view(logits.shape)


_CHUNK = 8192  # rows of one categorical: 8192 x 32 classes x 4 bytes = 1 MiB


def mode_flat(logits: torch.Tensor, n_cls: int, dtype: torch.dtype) -> torch.Tensor:
    shaped = logits.unflatten(-1, (-1, n_cls))
    return F.one_hot(shaped.argmax(-1), n_cls).to(dtype).flatten(-2)


# ------------------------------------------------------------------------------------------
# balanced KL of categoricals, computed once

class _KLBalanced(torch.autograd.Function):
    @staticmethod
    def forward(ctx, post, prior, n_cls, balance):
        shape = post.shape
        lq = torch.log_softmax(post.reshape(-1, n_cls), -1, dtype=torch.float32)
        lp = torch.log_softmax(prior.reshape(-1, n_cls), -1, dtype=torch.float32)
        q = lq.exp()
        diff = lq.sub_(lp)  # lq is not needed any more
        kl = torch.mul(q, diff).view(-1, shape[-1]).sum(-1)  # per row: summed over categoricals and classes
        ctx.save_for_backward(q, lp, diff)
        ctx.meta = (shape, post.dtype, prior.dtype, n_cls, balance)
        return kl.view(shape[:-1])

    @staticmethod
    def backward(ctx, g):
        q, lp, diff = ctx.saved_tensors
        shape, post_dt, prior_dt, n_cls, balance = ctx.meta
        C = shape[-1] // n_cls
        gr = g.float().reshape(-1, 1, 1)  # per row, broadcast over categoricals and classes
        g_post = g_prior = None
        if ctx.needs_input_grad[0]:
            # d KL(q||p) / d post-logits = q (log q - log p - KL_cat): the softmax backward of (log q - log p)
            gp = torch.ops.aten._softmax_backward_data(diff, q, -1, torch.float32).view(-1, C, n_cls)
            g_post = gp.mul_(gr * (1.0 - balance)).view(shape).to(post_dt)
        if ctx.needs_input_grad[1]:  # d KL(q||p) / d prior-logits = p - q
            gq = lp.exp().sub_(q).view(-1, C, n_cls)
            g_prior = gq.mul_(gr * balance).view(shape).to(prior_dt)
        return g_post, g_prior, None, None


def kl_balanced_fused(post: torch.Tensor, prior: torch.Tensor, n_cat: int, balance: float) -> torch.Tensor:
    """Same value and gradients as :func:`mabl.world_model.kl_balanced` (KL(q||p) per row; the
    prior gets ``balance`` of its gradient, the posterior ``1 - balance``)."""
    return _KLBalanced.apply(post, prior, post.shape[-1] // n_cat, balance)


# ------------------------------------------------------------------------------------------
# attention across a few agents

def softmax_lastdim(x: torch.Tensor) -> torch.Tensor:
    """Softmax over a short last dim (torch's kernel is very slow for dims < 16 on CPU)."""
    e = (x - x.amax(-1, keepdim=True)).exp()
    return e / e.sum(-1, keepdim=True)


_MASKS: dict = {}


def _head_mask(n: int, heads: int, device) -> torch.Tensor:
    key = (n, heads, str(device))
    if key not in _MASKS:
        hid = torch.arange(n * heads, device=device) % heads
        _MASKS[key] = torch.zeros(n * heads, n * heads, device=device).masked_fill_(hid[:, None] != hid[None, :], float("-inf"))
    return _MASKS[key]


def agent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head scaled dot-product attention over the agent axis: ``q, k, v [B, N, E]`` -> ``[B, N, E]``.

    The rows ``(agent, head)`` of one joint state form one ``[N*heads, E/heads]`` matrix (a free
    view), so all heads are done by one batched matmul; pairs of different heads are masked to
    -inf, which gives them exactly zero weight: the same math as ``nn.MultiheadAttention``
    (no dropout), without the permute copies.
    """
    B, N, E = q.shape
    dh = E // heads
    q2, k2, v2 = q.reshape(B, N * heads, dh), k.reshape(B, N * heads, dh), v.reshape(B, N * heads, dh)
    s = torch.bmm(q2, k2.transpose(1, 2)).float() * (1.0 / math.sqrt(dh)) + _head_mask(N, heads, q.device)
    p = softmax_lastdim(s).to(v.dtype)
    return torch.bmm(p, v2).view(B, N, E)


_MALLOC_TUNED = False


def tune_malloc() -> bool:
    """Keep freed memory in the process heap (glibc ``mallopt``): no ``mmap``/``munmap`` per large
    tensor, hence no page faults (zeroed pages from the kernel) every time a big activation is
    allocated again. Process-wide and one-way: the heap keeps its peak size. Returns whether it
    applied (Linux/glibc only)."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    try:
        import ctypes
        import sys

        if not sys.platform.startswith("linux"):
            return False
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return False
    _MALLOC_TUNED = bool(ok)
    return _MALLOC_TUNED


def fused_adam(params, lr: float, on: bool) -> torch.optim.Adam:
    """Adam; with ``on`` the fused multi-tensor kernel (same algorithm, one pass over all params)."""
    if on:
        try:
            return torch.optim.Adam(params, lr=lr, fused=True)
        except (RuntimeError, TypeError):  # a build without the fused CPU kernel
            pass
    return torch.optim.Adam(params, lr=lr)


def clip_grad_norm(params, max_norm: float, foreach: bool) -> torch.Tensor:
    params = [p for p in params if p.grad is not None]
    if foreach:
        try:
            return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        except RuntimeError:
            pass
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
