"""Where does imagination's reward come from? Imagined against real H-step returns, step by step.

    python benchmarks/imagined_by_step.py runs/bench/smax_3m_fast_s0/checkpoints/ckpt_000000020014.pt [more] --episodes 40 [--write NAME]

For each checkpoint the policy plays ``--episodes`` fresh episodes (seeds 2000003..., sampled actions as
in training). Every non-terminal step t of every episode is an imagination start (the posterior state
there, as the learner's starts); from it the model imagines ``ppo.horizon`` steps with the policy, as in
training. Per imagined step k it reports the predicted team reward, the predicted continuation and the
reach weight w_k (the product of the continuations before k, what GAE and the PPO weights use), and
compares with the real episode from the same start:

* ``real H-step return``: the sum of the real team rewards of steps t+1 .. t+H (the episode may end sooner);
* ``imagined, weighted``: sum over k of w_k r_k (the return the critic and the advantages see, gamma = 1);
* ``imagined, unweighted``: sum over k of r_k (what ``policy/imag_reward`` in metrics.jsonl averages);
* ``after the real end``: the weighted imagined reward at steps k beyond the real episode's end, i.e.
  reward the model invents after a battle that is over (the model never saw a transition out of a
  terminal state).

It also asks whether the heads know a terminal step when they see prior latents: at the real terminal
steps, the predicted continuation and team reward from the posterior latents (what the heads are trained
on) and from one-step prior samples (ẑ^g ~ p(ẑ^g | h^g), ẑ^a ~ p(ẑ^a | h^a, ẑ^g), the posterior's h;
mean of 8 samples), against the real reward there. Imagination feeds the heads prior samples only.

Prints a table and one JSON line; ``--write NAME`` also puts the table into BENCHMARKS.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from learning_curve import FINAL_SEED, diagnosis_main, episode_posterior, write_section  # noqa: E402
from mabl.envs import make_env  # noqa: E402
from mabl.mappo import imagine, reach_weights  # noqa: E402
from mabl.world_model import LatentState  # noqa: E402
from mabl.train import load_for_eval, run_episode  # noqa: E402


@torch.no_grad()
def measure(checkpoint: str, episodes: int) -> dict:
    cfg, learner, state = load_for_eval(checkpoint, "cpu")
    env = make_env(cfg.run.env, seed=FINAL_SEED, **cfg.run.env_options)
    model, actor, H = learner.model, learner.algo.actor, cfg.ppo.horizon
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(FINAL_SEED)
    real_ret, im_w, im_u, after_end, rew_k, cont_k, w_k, n_k = [], [], [], [], np.zeros(H), np.zeros(H), np.zeros(H), 0
    lengths, wins = [], 0
    term = {"cont_post": [], "cont_prior": [], "reward_post": [], "reward_prior": [], "reward_real": []}
    for e in range(episodes):
        ep, st = run_episode(env, learner.policy, FINAL_SEED + e, False, torch.device("cpu"))
        lengths.append(st.length)
        wins += bool(st.won)
        T = len(ep["obs"])  # reset step + one per action
        post, logits = episode_posterior(learner, ep)
        with learner.autocast():
            if ep["cont"][-1] == 0:  # a terminal step: what the heads say from the posterior and from prior samples
                f32 = lambda st: st.map(lambda x: x[-1:].float())  # noqa: E731
                heads = model.heads(f32(post))
                term["cont_post"].append(float(torch.sigmoid(heads["cont"].float()).mean()))
                term["reward_post"].append(float(heads["reward"].float().mean()))
                cs, rs = [], []
                for _ in range(8):
                    zg = logits.get("zhat_g")
                    if zg is not None:
                        zg = model._sample(logits["prior_g"][-1:], True).float()
                    pa = logits["prior_a"][-1:] if zg is None else model._agent_prior(post.h_a[-1:].float(), model._expand_g(zg),
                                                                                           model._expand_g(post.h_g[-1:].float()))
                    za = model._sample(pa, True).float()
                    hp = model.heads(LatentState(post.h_a[-1:].float(), za, None if zg is None else post.h_g[-1:].float(), zg))
                    cs.append(float(torch.sigmoid(hp["cont"].float()).mean())), rs.append(float(hp["reward"].float().mean()))
                term["cont_prior"].append(float(np.mean(cs))), term["reward_prior"].append(float(np.mean(rs)))
                term["reward_real"].append(float(ep["reward"][-1].mean()))
        keep = torch.as_tensor(ep["cont"]) > 0  # imagination starts: the non-terminal steps, as the learner's
        starts = post.map(lambda x: x[:, 0][keep])
        with learner.autocast():
            traj = imagine(model, actor, starts, H)
        r = traj.reward.mean(-1).double().numpy()  # [H, M] team reward of imagined transition k
        c = traj.cont.mean(-1).double()
        w = reach_weights(c).numpy()  # [H, M]: probability that imagined step k is reached
        team = ep["reward"].mean(-1)  # [T] real team reward for arriving at t
        for m, t in enumerate(np.flatnonzero(keep.numpy())):
            real_ret.append(float(team[t + 1:t + 1 + H].sum()))
            im_w.append(float((w[:, m] * r[:, m]).sum()))
            im_u.append(float(r[:, m].sum()))
            left = T - 1 - t  # real steps after the start
            after_end.append(float((w[left:, m] * r[left:, m]).sum()) if left < H else 0.0)
        rew_k += r.sum(1)
        cont_k += c.numpy().sum(1)
        w_k += w.sum(1)
        n_k += r.shape[1]
    mean = lambda x: float(np.mean(x))  # noqa: E731
    return {"checkpoint": checkpoint, "env_steps": int(state["counters"]["env_steps"]), "episodes": episodes, "won": wins,
            "mean_length": mean(lengths), "starts": len(real_ret), "horizon": H,
            "real_return": mean(real_ret), "imagined_weighted": mean(im_w), "imagined_unweighted": mean(im_u),
            "after_real_end": mean(after_end), "terminal_steps": len(term["cont_post"]),
            **{f"terminal_{k}": mean(v) if v else float("nan") for k, v in term.items()},
            "reward_by_step": (rew_k / n_k).round(3).tolist(), "cont_by_step": (cont_k / n_k).round(3).tolist(),
            "reach_by_step": (w_k / n_k).round(3).tolist()}


def table(rows: list[dict]) -> str:
    out = ["| checkpoint | env steps | won | starts | real H-step return | imagined, weighted | imagined, unweighted | "
           "of it after the real end (weighted) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| `{r['checkpoint']}` | {r['env_steps']:,} | {r['won']}/{r['episodes']} | {r['starts']} | {r['real_return']:.2f} | "
                   f"{r['imagined_weighted']:.2f} | {r['imagined_unweighted']:.2f} | {r['after_real_end']:.2f} |")
    out += ["", "At the real terminal steps: predicted continuation and team reward from the posterior latents and from "
            "one-step prior samples, and the real team reward there", "",
            "| checkpoint | terminal steps | continuation, posterior | continuation, prior samples | reward, posterior | "
            "reward, prior samples | reward, real |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| `{r['checkpoint']}` | {r['terminal_steps']} | {r['terminal_cont_post']:.2f} | {r['terminal_cont_prior']:.2f} | "
                   f"{r['terminal_reward_post']:.2f} | {r['terminal_reward_prior']:.2f} | {r['terminal_reward_real']:.2f} |")
    out += ["", "Per imagined step k = 1..H (mean over starts): team reward / continuation / reach weight", ""]
    for r in rows:
        steps = " ".join(f"{a:.2f}/{b:.2f}/{c:.2f}" for a, b, c in zip(r["reward_by_step"], r["cont_by_step"], r["reach_by_step"]))
        out.append(f"- `{r['checkpoint']}`: {steps}")
    return "\n".join(out)


def main(argv=None) -> int:
    return diagnosis_main(argv, __doc__, "imagined_by_step.py", measure, table, 40,
                          "Imagined against real H-step returns, step by step",
                          "sampled actions; every non-terminal step an imagination start", write_section)


if __name__ == "__main__":
    sys.exit(main())
