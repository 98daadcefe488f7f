"""Does the world model rank policies as the environment does? Imagined against real returns.

    python benchmarks/imagined_vs_real.py runs/smax:3m/fast/seed0 --episodes 64

MABL's actor only ever sees imagined returns (§3.3), so it can only become as good as the world
model's *ranking* of behaviours. This script takes a checkpoint (a file or a run directory) and,
for every policy, measures on the same fresh episode seeds

* the **real** return: episodes in the environment;
* the **imagined** return: from the posterior state of each episode's first real observation, the
  priors are rolled ``--horizon`` steps with the policy acting, the return being the predicted team
  rewards weighted by the predicted probability that the episode is still running
  (``sum_t r_t * prod_{k<t} cont_{k+1}``: r_t is the reward of the transition into s_{t+1},
  cont_{k+1} the predicted probability that s_{k+1} is not terminal), averaged over ``--repeats`` latent samples.

* the **posterior** return: the reward head summed along the posterior states of the real episode
  (the model sees every real observation): how well the reward head knows that behaviour's outcome;
* the **replayed** return: the same, but the imagined agents replay, open loop, the actions the
  policy took in the real episode (no decoding, no predicted masks: what the model predicts for
  exactly that behaviour).

Policies: the checkpoint's actor (greedy and sampled) and, on SMAX, the scripted decentralized rules
of ``benchmarks/smax_scripted.py`` acting on the observations the model decodes from its imagined
agent states (``obs_decoder(z^a, h^a)``) and on its predicted action availability. A model that
ranks the scripted ``weakest_sync`` rule below the actor while the environment ranks it above
shows where the learner's ceiling comes from: behaviour the data never contains is predicted poorly.
``--imagine-latent sample mode 0.5`` repeats the imagined and replayed columns for each way imagination
draws the prior latents (``model.imagine_latent``, a number = sampled at that ``model.imagine_temperature``;
default: the checkpoint's own). Prints a table and,
last, one JSON line; ``--name`` also writes the table as a BENCHMARKS.md section.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from learning_curve import FINAL_SEED, commit, episode_posterior, machine, write_section  # noqa: E402
from mabl.envs import make_env  # noqa: E402
from mabl.train import load_for_eval, run_episode  # noqa: E402


@torch.no_grad()
def posterior_returns(learner, episodes: list[dict]) -> np.ndarray:
    """Predicted team return along the *posterior* of each real episode (the model sees every real
    observation): the reward head's accuracy on that behaviour, without the learned dynamics."""
    out = []
    for ep in episodes:
        post, _ = episode_posterior(learner, ep)
        with learner.autocast():
            reward = learner.model.heads(post)["reward"].float().mean(-1)[:, 0]
        out.append(float(reward[1:].sum()))
    return np.asarray(out)


def open_loop(episodes: list[dict], stop: int):
    """An imagination policy replaying the actions of recorded episodes (``stop`` after an episode's end)."""
    taken = [ep["prev_action"][1:].argmax(-1) for ep in episodes]
    T = max(len(a) for a in taken)
    table = np.full((len(taken), T, taken[0].shape[1]), stop)
    for m, a in enumerate(taken):
        table[m, : len(a)] = a

    def imag(t, _fa, _avail, _dec):
        return torch.as_tensor(table[:, t] if t < T else np.full(table[:, 0].shape, stop))

    return imag


@torch.no_grad()
def imagined_returns(learner, first_obs, first_state, first_avail, policy, horizon: int, repeats: int,
                     always_available: int | None = None) -> np.ndarray:
    """``policy(t, fa, avail_pred, decoded_obs) -> action indices [M, N]`` acting in the model's imagination
    (``always_available``: an action the predicted mask never removes, e.g. SMAX's stop)."""
    model = learner.model
    M, N, A = first_avail.shape
    obs = torch.as_tensor(first_obs)[None]
    state = torch.as_tensor(first_state)[None]
    prev = torch.zeros(1, M, N, A)
    first = torch.ones(1, M, dtype=torch.bool)
    out = []
    for _ in range(repeats):
        with learner.autocast():
            post, _, _ = model.observe(obs, state, prev, first)
            st = post.map(lambda x: x[0])
            alive, ret = torch.ones(M), torch.zeros(M)
            for t in range(horizon):
                fa, fg = model.features(st)
                if t == 0:
                    avail = torch.as_tensor(first_avail)
                else:
                    both = fa if fg is None else torch.cat([fa, fg], -1)
                    avail = torch.sigmoid(model.avail_head(both).float()) > 0.5
                    if always_available is not None:
                        avail[..., always_available] = True
                act = policy(t, fa, avail, model.decode_obs(fa))
                st = model.imagine_step(st, torch.nn.functional.one_hot(act.long(), A).to(fa.dtype))
                heads = model.heads(st)
                ret += alive * heads["reward"].float().mean(-1)  # r_t counts if s_t was not terminal
                alive = alive * torch.sigmoid(heads["cont"].float()).mean(-1)
        out.append(ret.numpy())
    return np.mean(out, 0)


def paired_summary(rows: dict[str, dict[str, np.ndarray]], cols) -> dict[str, dict[str, float]]:
    """Per policy and column: mean, standard error, and the paired difference (mean, standard error) to the
    first policy of ``rows`` (same episode seeds), as ``c``, ``c_se``, ``c_minus_actor``, ``c_minus_actor_se``."""
    se = lambda x: float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")  # noqa: E731
    ref = next(iter(rows.values()))
    out = {}
    for name, r in rows.items():
        out[name] = {}
        for c in cols:
            d = r[c] - ref[c]
            out[name].update({c: float(r[c].mean()), c + "_se": se(r[c]),
                              c + "_minus_actor": float(d.mean()), c + "_minus_actor_se": se(d)})
    return out


def markdown_rows(result: dict[str, dict[str, float]], cols) -> list[str]:
    """The table rows of :func:`paired_summary`: the columns, then their differences to the first policy."""
    return [f"| {name} | " + " | ".join(f"{row[c]:.2f} ± {row[c + '_se']:.2f}" for c in cols) + " | "
            + " | ".join(f"{row[c + '_minus_actor']:+.2f} ± {row[c + '_minus_actor_se']:.2f}" for c in cols) + " |"
            for name, row in result.items()]


def draw_kind(text: str) -> str | float:
    """``--imagine-latent`` value: "sample", "mode", or a sampling temperature > 0."""
    if text in ("sample", "mode"):
        return text
    try:
        t = float(text)
    except ValueError:
        t = None
    if t is None or not t > 0:
        raise argparse.ArgumentTypeError(f"{text!r}; accepted: sample, mode, or a temperature > 0")
    return t


def draw_config(model_cfg, draw: str | float | None):
    """``model_cfg`` drawing imagination's prior latents as ``draw`` (:func:`draw_kind`) says (None: as it does)."""
    if draw is None:
        return model_cfg
    if isinstance(draw, str):
        return dataclasses.replace(model_cfg, imagine_latent=draw, imagine_temperature=1.0)
    return dataclasses.replace(model_cfg, imagine_latent="sample", imagine_temperature=draw)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="checkpoint file or run directory (newest checkpoint)")
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--seed", type=int, default=FINAL_SEED)
    p.add_argument("--horizon", type=int, default=25, help="imagined steps (cover the whole episode)")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--imagine-latent", nargs="+", type=draw_kind, metavar="{sample,mode,T}",
                   help="how imagination draws the prior latents, one set of columns each: sample (at temperature 1), "
                        "mode, or a temperature T > 0 to sample at (default: the checkpoint's)")
    p.add_argument("--name", help="also write the table as this BENCHMARKS.md section")
    args = p.parse_args(argv)
    t0 = time.time()
    cfg, learner, _ = load_for_eval(args.checkpoint)
    learner.model.eval()
    draws = args.imagine_latent or [None]  # None: the checkpoint's own
    torch.manual_seed(args.seed)
    env = make_env(cfg.run.env, seed=0, **cfg.run.env_options)
    if not env.spec.discrete:
        raise SystemExit("error: imagined_vs_real.py supports discrete-action tasks")
    seeds = [args.seed + k for k in range(args.episodes)]
    firsts = [env.reset(seed=s) for s in seeds]
    f_obs = np.stack([t.obs for t in firsts])
    f_state = np.stack([t.state for t in firsts])
    f_avail = np.stack([t.avail for t in firsts])
    actor = learner.algo.actor
    device = torch.device("cpu")

    def real(policy, det):
        """Real returns and the recorded (buffer-format) episodes of ``policy`` on ``seeds``."""
        eps = [run_episode(env, policy, s, det, device) for s in seeds]
        return np.array([st.ret for _, st in eps]), [ep for ep, _ in eps]

    def learned(det):
        def imag(_t, fa, avail, _dec):
            return actor.sample(fa, avail, deterministic=det)[0]

        return (imag, *real(learner.policy, det))

    policies = {"actor (greedy)": learned(True), "actor (sampled)": learned(False)}
    stop = None
    suite, _, task = cfg.run.env.partition(":")
    if suite == "smax":
        from smax_scripted import STOP, ObsLayout, ScriptedPolicy

        stop = STOP
        layout = ObsLayout(task)
        for name in ("weakest", "weakest_sync"):
            pol = ScriptedPolicy(name, layout)

            def imag(_t, _fa, avail, dec, pol=pol):
                d, a = dec.numpy(), avail.numpy()
                return torch.as_tensor(np.stack([pol.act(d[m], a[m]) for m in range(d.shape[0])]))

            policies[f"scripted {name}"] = (imag, *real(pol, True))
    rows = {}
    for name, (imag, real, episodes) in policies.items():
        rows[name] = dict(real=real, posterior=posterior_returns(learner, episodes))
        for draw in draws:
            learner.model.cfg = draw_config(cfg.model, draw)
            tag = "" if len(draws) == 1 else f" ({draw if isinstance(draw, str) else f'T={draw:g}'})"
            rows[name]["imagined" + tag] = imagined_returns(learner, f_obs, f_state, f_avail, imag, args.horizon,
                                                            args.repeats, stop)
            rows[name]["replayed" + tag] = imagined_returns(learner, f_obs, f_state, f_avail, open_loop(episodes, stop or 0),
                                                            args.horizon, args.repeats, stop)
    learner.model.cfg = cfg.model
    cols = tuple(rows["actor (greedy)"])
    result = paired_summary(rows, cols)
    w = max(14, max(len(c) for c in cols) + 1)
    print(f"{'policy':22s}" + "".join(f"{c:>{w}s}" for c in cols) + "".join(f"{c[:4] + ' - actor':>17s}" for c in cols))
    for name, row in result.items():
        print(f"{name:22s}" + "".join(f"{row[c]:{w - 5}.2f}±{row[c + '_se']:4.2f}" for c in cols)
              + "".join(f"{row[c + '_minus_actor']:+12.2f}±{row[c + '_minus_actor_se']:4.2f}" for c in cols))
    print(json.dumps({"checkpoint": str(args.checkpoint), "episodes": args.episodes, "horizon": args.horizon, "policies": result}))
    if args.name:
        cmd = "python benchmarks/imagined_vs_real.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        lines = [f"### Imagined against real returns (`{args.name}`)", "", f"- command: `{cmd}`",
                 f"- commit `{commit()}`, {time.strftime('%Y-%m-%d')}, machine: {machine()}",
                 f"- checkpoint `{args.checkpoint}`; {args.episodes} episodes on seeds {args.seed}...; horizon {args.horizon}, "
                 f"{args.repeats} latent samples each; mean ± standard error, and the paired difference to the actor "
                 f"(greedy); {time.time() - t0:.0f} s", "",
                 "| policy | " + " | ".join(cols) + " | " + " | ".join(f"{c} − actor" for c in cols) + " |",
                 "|---|" + "---:|" * (2 * len(cols)), *markdown_rows(result, cols)]
        write_section(args.name, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
