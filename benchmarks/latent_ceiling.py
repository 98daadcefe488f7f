"""Can the actor's input express a better policy? Behaviour cloning of a scripted rule on the
world model's agent features against the same cloning on the raw observation.

    python benchmarks/latent_ceiling.py RUN_OR_CHECKPOINT --teacher weakest_sync_team --episodes 300 --dagger 2

MABL's actor reads only the agent-level features [z^a_t, h^a_t] of the world model's posterior
(paper §3.3). If the trained policies stop below a known decentralized rule (on SMAX 3m they stop
at ~0.6-0.7 while ``weakest_sync_team`` wins ~0.8, section ``scripted:smax:3m``), either those
features do not carry what the rule reads, or the reinforcement learning in imagination does not
find the rule. This script separates the two. From a checkpoint it takes the frozen encoder, agent
recurrence and agent posterior (exactly what :class:`mabl.agent.DecentralizedPolicy` runs), plays
the scripted teacher (seeds 3000003..., never the evaluation seeds), and trains two fresh students
by cross-entropy on the teacher's actions, with the same actor architecture as the run's
(``ppo.hidden`` x ``ppo.layers``):

* ``latent``: on [z^a_t, h^a_t], z^a_t the posterior mode, h^a_t carried through the agent's own
  previous actions (what the run's actor sees at test time);
* ``decoded``: on the world model's reconstruction ô^i_t = decoder(z^a_t, h^a_t) alone (the same
  information as ``latent``, read out as continuous observation features);
* ``obs``: on the raw observation o^i_t alone (the teacher's own input; the control).

``--dagger K`` adds K rounds of DAgger (Ross et al. 2011): each student plays ``--episodes`` more
episodes itself, greedy, the teacher labels the states it reached, and the student is retrained on
everything so far, so the students are judged on their own state distribution. ``--val-frac F`` holds
out the last fraction F of every batch of labelled episodes and keeps, per fit, the parameters with the
best accuracy there (early stopping; with ``--weight-decay``, AdamW's decoupled decay): a student on the
1,280-wide latent input can memorize its training states, so without it a gap between the students may
be over-fitting rather than missing information. ``--imagine N`` then asks the next question: does the
world model rate the latent student (which plays the rule) above the run's actor, as the environment
does? Imagined against real returns from the first states of N held-out episodes, as in
``benchmarks/imagined_vs_real.py``; a model that rates the better policy lower explains why PPO in
imagination does not move toward it. Finally the teacher,
the run's own actor and both students play the same ``--eval-episodes`` held-out seeds (2000003...,
the learning curves' final comparison). A latent student close to the obs student means the
features carry the rule and the gap lies in the learning; a latent student far below it means the
representation is the limit. Writes a section into ``BENCHMARKS.md`` (``--name``, ``--no-write``);
the last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from imagined_vs_real import markdown_rows  # noqa: E402
from learning_curve import FINAL_SEED, commit, machine, write_section  # noqa: E402
from smax_scripted import POLICIES, ObsLayout, ScriptedPolicy  # noqa: E402
from mabl.agent import AgentCarry, DecentralizedPolicy  # noqa: E402
from mabl.envs import make_env  # noqa: E402
from mabl.policy import Actor  # noqa: E402
from mabl.envs.smax import _compiled  # noqa: E402
from mabl.train import evaluate, load_for_eval, run_episode  # noqa: E402

TRAIN_SEED = 3_000_003  # teacher and DAgger episodes: disjoint from the evaluation seeds (1000003..., 2000003...)


class DecodedStudent(DecentralizedPolicy):
    """The run's frozen agent recurrence and posterior, an actor on the decoded observation ô^i_t."""

    def __init__(self, model, actor: Actor):
        super().__init__(model, actor)
        self.decoder = model.decode_obs  # in observation units, like the obs student's input

    @torch.no_grad()
    def step(self, obs, avail, carry, deterministic: bool = True):
        feat, h, z = self.features(obs, carry, deterministic=True)
        logits, _ = self.actor.params(self.decoder(feat), avail)
        a = self.actor.sample_from_params(logits, None, deterministic=deterministic)[0]
        return a, a, AgentCarry(h, z, self.actor.env_to_model_action(a)), logits


class ObsStudent:
    """Decentralized policy on agent i's current observation alone (the protocol of run_episode)."""

    def __init__(self, actor: Actor):
        self.actor = actor

    def initial(self, n_agents: int, device=None):
        return SimpleNamespace(prev_action=torch.zeros(n_agents, self.actor.action_dim))

    @torch.no_grad()
    def step(self, obs, avail, carry, deterministic: bool = True):
        logits, _ = self.actor.params(obs.float(), avail)
        a = self.actor.sample_from_params(logits, None, deterministic=deterministic)[0]
        return a, a, SimpleNamespace(prev_action=self.actor.env_to_model_action(a)), logits


@torch.no_grad()
def agent_features(policy: DecentralizedPolicy, ep: dict) -> torch.Tensor:
    """[T, N, F] actor inputs along a recorded episode: the agent recurrence fed the actions the
    agents actually took (``ep['prev_action']``), the posterior's mode at every step."""
    obs, prev = torch.as_tensor(ep["obs"]).float(), torch.as_tensor(ep["prev_action"]).float()
    n = obs.shape[1]
    carry = policy.initial(n)
    feats = []
    for t in range(obs.shape[0] - 1):  # the last row is the state after the final action
        carry = AgentCarry(carry.h_a, carry.z_a, prev[t])
        feat, h, z = policy.features(obs[t], carry, deterministic=True)
        feats.append(feat)
        carry = AgentCarry(h, z, carry.prev_action)
    return torch.stack(feats)


def label(teacher: ScriptedPolicy, policy: DecentralizedPolicy, episodes: list[dict]):
    """(latent features, observations, availability, teacher actions) of every live decision
    (agents with a single available action, the dead, are left out)."""
    xs, os_, ms, ys = [], [], [], []
    for ep in episodes:
        T = ep["obs"].shape[0] - 1
        obs, avail = ep["obs"][:T], ep["avail"][:T]
        y = np.stack([teacher.act(obs[t], avail[t]) for t in range(T)])
        keep = torch.as_tensor(avail.sum(-1) > 1)
        xs.append(agent_features(policy, ep)[keep])
        os_.append(torch.as_tensor(obs).float()[keep])
        ms.append(torch.as_tensor(avail).bool()[keep])
        ys.append(torch.as_tensor(y)[keep])
    return tuple(torch.cat(v) for v in (xs, os_, ms, ys))


def fit(actor: Actor, x: torch.Tensor, m: torch.Tensor, y: torch.Tensor, steps: int, batch: int, lr: float,
        seed: int, weight_decay: float = 0.0, val: tuple | None = None, check_every: int = 100) -> float:
    """Cross-entropy of the masked actor logits on the teacher's actions (AdamW, ``weight_decay``);
    returns the final accuracy on the fitted data. With ``val = (x, m, y)`` of held-out episodes the
    accuracy there is checked every ``check_every`` steps and the parameters of the best check are
    kept (early stopping), so a student that memorizes its training states is judged at the point
    where it generalized best."""
    opt = torch.optim.AdamW(actor.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    best, best_state = -1.0, None
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(y), (min(batch, len(y)),), generator=g)
        logits, _ = actor.params(x[idx], m[idx])
        loss = F.cross_entropy(logits, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if val is not None and (step % check_every == 0 or step == steps):
            acc = accuracy(actor, *val)
            if acc > best:
                best, best_state = acc, {k: v.clone() for k, v in actor.state_dict().items()}
    if best_state is not None:
        actor.load_state_dict(best_state)
    return accuracy(actor, x, m, y)


@torch.no_grad()
def accuracy(actor: Actor, x, m, y) -> float:
    return float((actor.params(x, m)[0].argmax(-1) == y).float().mean()) if len(y) else float("nan")


def reconstruction_r2(layout: ObsLayout, jenv, obs: torch.Tensor, decoded: torch.Tensor) -> dict[str, dict[str, float]]:
    """R² of the decoded observation per unit group (allies, enemies, own) and feature (health, x, y,
    weapon cooldown), pooled over the group's units: how much of what the rules read the latent keeps."""
    feats = {"health": "health", "x": "position_x", "y": "position_y", "cooldown": "weapon_cooldown"}
    unit, own = list(jenv.unit_features), list(jenv.own_features)
    groups = {"allies": [layout.unit_feats * u for u in range(layout.n_allies - 1)],
              "enemies": [layout.unit_feats * u for u in range(layout.n_allies - 1, layout.n_allies - 1 + layout.n_enemies)],
              "own": [layout.own_at]}
    out = {}
    for g, starts in groups.items():
        names = own if g == "own" else unit
        out[g] = {}
        for short, f in feats.items():
            cols = [s + names.index(f) for s in starts]
            o, d = obs[:, cols].double(), decoded[:, cols].double()
            sst = float(((o - o.mean(0)) ** 2).sum())
            out[g][short] = 1.0 - float(((o - d) ** 2).sum()) / sst if sst > 0 else float("nan")
    return out


def rate_in_imagination(learner, env, policies: dict, episodes: int, horizon: int, repeats: int) -> dict:
    """Real, imagined and open-loop replayed returns (``benchmarks/imagined_vs_real.py``) of actors on the
    agent features, from the first states of held-out episodes: ``policies`` maps a name to (the Actor
    acting in imagination on [z^a, h^a], the decentralized policy acting in the environment). Returns
    per name the means, standard errors and paired differences to the first policy."""
    from imagined_vs_real import imagined_returns, open_loop, paired_summary
    from smax_scripted import STOP

    seeds = [FINAL_SEED + k for k in range(episodes)]
    firsts = [env.reset(seed=s) for s in seeds]
    f_obs, f_state, f_avail = (np.stack([getattr(t, k) for t in firsts]) for k in ("obs", "state", "avail"))
    rows = {}
    for name, (actor, policy) in policies.items():
        played = [run_episode(env, policy, s, True, torch.device("cpu")) for s in seeds]
        eps = [ep for ep, _ in played]
        imag = lambda _t, fa, avail, _dec, a=actor: a.sample(fa, avail, deterministic=True)[0]  # noqa: E731
        rows[name] = {"real": np.array([st.ret for _, st in played]),
                      "imagined": imagined_returns(learner, f_obs, f_state, f_avail, imag, horizon, repeats, STOP),
                      "replayed": imagined_returns(learner, f_obs, f_state, f_avail, open_loop(eps, STOP), horizon,
                                                   repeats, STOP)}
    out = paired_summary(rows, ("real", "imagined", "replayed"))
    for name in out:
        print(f"{name:16s} real {out[name]['real']:6.2f}  imagined {out[name]['imagined']:6.2f}  "
              f"replayed {out[name]['replayed']:6.2f}", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="checkpoint file or run directory (newest checkpoint)")
    p.add_argument("--teacher", default="weakest_sync_team", choices=[x for x in POLICIES if x != "random"])
    p.add_argument("--sync-margin", type=float, default=0.25)
    p.add_argument("--episodes", type=int, default=300, help="teacher episodes, and student episodes per DAgger round")
    p.add_argument("--dagger", type=int, default=2, help="DAgger rounds after the teacher's episodes")
    p.add_argument("--steps", type=int, default=3000, help="gradient steps per fit")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay of the students")
    p.add_argument("--val-frac", type=float, default=0.0,
                   help="fraction of each batch of labelled episodes held out for early stopping (0: fit all, no stopping)")
    p.add_argument("--eval-episodes", type=int, default=100)
    p.add_argument("--imagine", type=int, default=0, metavar="N",
                   help="also compare how the world model rates the run's actor and the latent student: imagined "
                        "against real returns from the first states of N held-out episodes (0: off)")
    p.add_argument("--horizon", type=int, default=25, help="imagined steps of --imagine (cover the whole episode)")
    p.add_argument("--repeats", type=int, default=4, help="latent samples per start of --imagine")
    p.add_argument("--seed", type=int, default=0, help="initialisation of the students")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--name", default="", help="BENCHMARKS.md section (default diagnosis:<env>:latent_ceiling)")
    p.add_argument("--note", default="", help="a paragraph added to the section")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if not 0.0 <= args.val_frac < 1.0:  # checked before the checkpoint is loaded
        raise SystemExit(f"error: --val-frac must be in [0, 1), got {args.val_frac}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg, learner, state = load_for_eval(args.checkpoint)
    suite, _, task = cfg.run.env.partition(":")
    if suite != "smax":
        raise SystemExit(f"error: latent_ceiling.py needs a SMAX run (scripted teachers exist for SMAX only), got {cfg.run.env!r}")
    learner.model.eval()
    env = make_env(cfg.run.env, seed=0, **cfg.run.env_options)
    spec, device = env.spec, torch.device("cpu")
    teacher = ScriptedPolicy(args.teacher, ObsLayout(task), seed=args.seed, sync_margin=args.sync_margin)
    torch.manual_seed(args.seed)
    make = lambda d: Actor(d, spec.action_dim, cfg.ppo.hidden, cfg.ppo.layers, True)  # noqa: E731
    students = {"latent": make(learner.model.feat_a), "decoded": make(spec.obs_dim), "obs": make(spec.obs_dim)}
    acting = {"latent": DecentralizedPolicy(learner.model, students["latent"]),
              "decoded": DecodedStudent(learner.model, students["decoded"]), "obs": ObsStudent(students["obs"])}
    decode = torch.no_grad()(learner.model.decode_obs)
    inputs = {"latent": lambda x, o: x, "decoded": lambda x, o: decode(x), "obs": lambda x, o: o}
    frozen = learner.policy  # encoder + agent recurrence + posterior of the run; its actor is not used here
    t0 = time.perf_counter()
    seed = TRAIN_SEED
    def split(eps):  # (labelled training part, labelled held-out part or None), whole episodes
        n_val = min(int(round(args.val_frac * len(eps))), len(eps) - 1)
        return (label(teacher, frozen, eps[:len(eps) - n_val]),
                label(teacher, frozen, eps[len(eps) - n_val:]) if n_val > 0 else None)

    teacher_eps = [run_episode(env, teacher, seed + k, True, device)[0] for k in range(args.episodes)]
    seed += args.episodes
    first, first_val = split(teacher_eps)
    data = {k: [first] for k in students}
    val_data = {k: [first_val] if first_val is not None else [] for k in students}
    r2 = reconstruction_r2(teacher.layout, _compiled(task)[0], first[1], decode(first[0]))
    print(json.dumps({"reconstruction_r2": r2}), flush=True)
    rounds = []
    for r in range(args.dagger + 1):
        row = {"round": r}
        for k, actor in students.items():
            x, o, m, y = (torch.cat(v) for v in zip(*data[k]))
            inp = inputs[k](x, o)
            row[f"{k}_samples"] = len(y)
            val = None
            if val_data[k]:
                xv, ov, mv, yv = (torch.cat(v) for v in zip(*val_data[k]))
                val = (inputs[k](xv, ov), mv, yv)
            row[f"{k}_train_acc"] = fit(actor, inp, m, y, args.steps, args.batch, args.lr, args.seed + r,
                                        weight_decay=args.weight_decay, val=val)
            if val is not None:
                row[f"{k}_val_acc"] = accuracy(actor, *val)
            if r < args.dagger:  # the student plays, the teacher labels what it reached
                eps = [run_episode(env, acting[k], seed + j, True, device)[0] for j in range(args.episodes)]
                new_fit, new_val = split(eps)
                new = [torch.cat(v) for v in zip(*([new_fit] + ([new_val] if new_val is not None else [])))]
                row[f"{k}_own_acc"] = accuracy(actor, inputs[k](new[0], new[1]), new[2], new[3])
                data[k].append(new_fit)
                if new_val is not None:
                    val_data[k].append(new_val)
        seed += args.episodes
        rounds.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    results = {}
    for name, pol in (("teacher", teacher), ("run's actor", learner.policy), ("latent student", acting["latent"]),
                      ("decoded student", acting["decoded"]), ("obs student", acting["obs"])):
        res = evaluate(env, pol, args.eval_episodes, FINAL_SEED, device, with_ci=True)
        results[name] = {k: res[k] for k in ("win_rate", "win_rate_ci95", "return", "length")}
        lo, hi = res["win_rate_ci95"]
        print(f"{name:16s} win {res['win_rate']:.3f} [{lo:.2f}, {hi:.2f}]  return {res['return']:6.2f}", flush=True)
    rating = rate_in_imagination(learner, env, {"run's actor": (learner.policy.actor, learner.policy),
                                                "latent student": (students["latent"], acting["latent"])},
                                 args.imagine, args.horizon, args.repeats) if args.imagine > 0 else {}
    env_steps = int(state.get("counters", {}).get("env_steps", 0))
    out = {"checkpoint": state["_path"], "env": cfg.run.env, "env_steps": env_steps, "teacher": args.teacher,
           "sync_margin": args.sync_margin, "reconstruction_r2": r2, "rounds": rounds, "results": results, "imagined": rating,
           "seconds": round(time.perf_counter() - t0, 1)}
    if not args.no_write:
        cmd = "python benchmarks/latent_ceiling.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        table = ["| policy | input | win rate [95%] | mean return |", "|---|---|---|---:|"]
        inputs = {"teacher": "own observation (rules)", "run's actor": "[z^a, h^a] (trained in imagination)",
                  "latent student": "[z^a, h^a] (cloned)", "decoded student": "decoder(z^a, h^a) (cloned)",
                  "obs student": "own observation (cloned)"}
        for name, r in results.items():
            table.append(f"| {name} | {inputs[name]} | {r['win_rate']:.3f} [{r['win_rate_ci95'][0]:.2f}, "
                         f"{r['win_rate_ci95'][1]:.2f}] | {r['return']:.2f} |")
        held = args.val_frac > 0
        fits = ["| round | " + " | ".join(f"{k}: samples / fit acc. / " + ("held-out acc. / " if held else "")
                                           + "acc. on own states" for k in students) + " |",
                "|---:|" + "---|" * len(students)]
        for row in rounds:
            cell = lambda k: (f"{row[k + '_samples']} / {row[k + '_train_acc']:.3f} / "  # noqa: E731
                              + (f"{row[k + '_val_acc']:.3f} / " if k + "_val_acc" in row else ("- / " if held else ""))
                              + (f"{row[k + '_own_acc']:.3f}" if k + "_own_acc" in row else "-"))
            fits.append(f"| {row['round']} | " + " | ".join(cell(k) for k in students) + " |")
        name = args.name or f"diagnosis:{cfg.run.env}:latent_ceiling"
        body = "\n".join([
            f"### Behaviour cloning on the actor's input (`{name}`)", "",
            f"- command: `{cmd.strip()}`",
            f"- commit `{commit()}`, {time.strftime('%Y-%m-%d')}, machine: {machine()}",
            f"- checkpoint `{state['_path']}` ({env_steps:,} env steps); teacher `{args.teacher}` (sync margin "
            f"{args.sync_margin:g}); {args.episodes} teacher episodes + {args.dagger} DAgger round(s) of {args.episodes} "
            f"(seeds {TRAIN_SEED}...); {args.steps} AdamW steps (batch {args.batch}, lr {args.lr:g}, weight decay "
            f"{args.weight_decay:g}) per fit"
            + (f", the best of every 100 steps on the held-out {args.val_frac:g} of each round's episodes (early stopping)"
               if args.val_frac > 0 else "") + "; students "
            f"{cfg.ppo.hidden}x{cfg.ppo.layers} MLPs like the run's actor; evaluation: {args.eval_episodes} greedy episodes "
            f"on seeds {FINAL_SEED}...; 95% Wilson intervals; {out['seconds']:.0f} s", "",
            *table, "", *fits, "",
            "R² of the observation decoded from [z^a, h^a] on the teacher's states (live agents), per unit group and feature:", "",
            "| units | health | x | y | weapon cooldown |", "|---|---:|---:|---:|---:|",
            *[f"| {g} | " + " | ".join(f"{v[c]:.3f}" for c in ("health", "x", "y", "cooldown")) + " |" for g, v in r2.items()],
            *(["", f"How the world model rates the two policies on the [z^a, h^a] features (`--imagine {args.imagine}`): "
                   f"from the posterior state of the first observation of held-out episodes {FINAL_SEED}..., the priors "
                   f"rolled {args.horizon} steps with the policy acting greedily ({args.repeats} latent samples each); "
                   "*replayed*: the actions of the policy's real episode replayed open loop; mean ± standard error, "
                   "and the paired difference to the run's actor:", "",
                   "| policy | real return | imagined | replayed | real − actor | imagined − actor | replayed − actor |",
                   "|---|---:|---:|---:|---:|---:|---:|",
                   *markdown_rows(rating, ("real", "imagined", "replayed"))]
              if rating else []),
            *(["", args.note] if args.note else []),
        ])
        write_section(name, body)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
