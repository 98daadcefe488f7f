"""Speed of the post-episode learner update (GitHub issue "Speed").

Builds the real :class:`mabl.learner.MABLLearner` at the ``paper`` preset for synthetic SMAC-like
tasks, fills a replay buffer with synthetic episodes and times one full post-episode update
(``model.train_steps`` world-model steps + ``ppo.updates`` rounds of imagination and PPO),
split into world-model / imagination / policy seconds (median of ``--repeats``). In the same run
it times the same update with every optimization off (plain fp32 eager: ``run.bf16=false`` and
every speed switch of :mod:`mabl.fast` off) and prints the ratio, and measures the env-free
collection throughput of :class:`mabl.agent.DecentralizedPolicy` (all agents in one batched
step). Results go to a delimited section of BENCHMARKS.md; stdout ends with one JSON line.

Where a measurement runs fewer model steps / rounds / PPO epochs than the preset (``--quick``,
or the plain path for 8 and 27 agents, which takes many minutes), the measured phase times are
scaled up linearly to the full update and the table says so.

    python benchmarks/learner_speed.py --quick           # < 1 minute, 3 agents
    python benchmarks/learner_speed.py --agents 3 8 27   # the full table
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mabl.buffer import ReplayBuffer  # noqa: E402
from mabl.config import make_config, replace  # noqa: E402
from mabl.cpustat import StealMeter  # noqa: E402
from mabl.envs.base import EnvSpec  # noqa: E402
from mabl.errors import ConfigError  # noqa: E402
from mabl.fast import Speed, native_bf16, sync  # noqa: E402
from mabl.learner import MABLLearner, resolve_device  # noqa: E402

# synthetic SMAC-like tasks: (name, agents, obs, state, actions)
TASKS = {
    3: ("smax:3m", 3, 88, 84, 9),
    8: ("smax:8m", 8, 218, 204, 14),
    27: ("smax:27m_vs_30m", 27, 285, 1000, 36),  # approximate sizes of SMAC 27m_vs_30m
}
SPEED_FLAGS = [f for f in asdict(Speed()) if f != "compile"]
START, END = "<!-- learner_speed:start -->", "<!-- learner_speed:end -->"  # the AMX machine's section


def markers(mach: dict) -> tuple[str, str]:
    """One BENCHMARKS.md section per kind of CPU, and one for CUDA GPUs. The issue's targets are stated
    for the AMX machine, whose figures live in the unsuffixed section; any other CPU (AVX2 only: optimized
    path in fp32; AVX512-BF16 without AMX: bf16 at a fraction of AMX's rate) or a GPU (``--device cuda``)
    writes its own and never overwrites them."""
    if mach.get("gpu"):
        return "<!-- learner_speed_cuda:start -->", "<!-- learner_speed_cuda:end -->"
    if mach.get("amx"):
        return START, END
    key = mach["isa"].lower() + ("_bf16" if mach["native_bf16"] else "")
    return f"<!-- learner_speed_{key}:start -->", f"<!-- learner_speed_{key}:end -->"


def cpu_kind(mach: dict) -> str:
    """Heading suffix naming a GPU or a non-AMX CPU's matmul hardware ('' on the AMX machine)."""
    if mach.get("gpu"):
        return f", CUDA GPU ({mach['gpu']})"
    if mach.get("amx"):
        return ""
    if mach["native_bf16"]:
        return f", {mach['isa']} CPU with AVX512-BF16 and no AMX"
    return f", {mach['isa']} CPU without native bf16"


def spec_for(n: int) -> EnvSpec:
    if n in TASKS:
        name, n, o, s, a = TASKS[n]
    else:  # any other count: scale the 8-agent sizes
        name, o, s, a = f"smax:{n}m", 26 * n + 10, 25 * n + 4, n + 6
    return EnvSpec(name, n, o, s, a, discrete=True, has_action_mask=True, episode_limit=200, has_win=True)


def fill_buffer(spec: EnvSpec, steps: int, seed: int) -> ReplayBuffer:
    rng = np.random.default_rng(seed)
    buf = ReplayBuffer(spec, max(steps, 1000))
    n, a = spec.n_agents, spec.action_dim
    while len(buf) < steps:
        T = int(rng.integers(40, 80))
        act = np.eye(a, dtype=np.float32)[rng.integers(0, a, (T, n))]
        act[0] = 0.0
        avail = rng.random((T, n, a)) > 0.3
        avail[..., 0] = True
        cont = np.ones(T, np.float32)
        cont[-1] = 0.0
        buf.add_episode({
            "obs": rng.standard_normal((T, n, spec.obs_dim)).astype(np.float32),
            "state": rng.standard_normal((T, spec.state_dim)).astype(np.float32),
            "prev_action": act, "reward": rng.standard_normal((T, n)).astype(np.float32),
            "cont": cont, "avail": avail, "is_first": np.arange(T) == 0,
        })
    return buf


def make_learner(spec: EnvSpec, optimized: bool, seed: int, device: str = "cpu") -> MABLLearner:
    run = {f: optimized for f in SPEED_FLAGS}
    run["bf16"] = optimized
    run["compile"] = False
    torch.manual_seed(seed)
    cfg = make_config("paper", spec.name, {"run": run})
    return MABLLearner(spec, cfg, device)


def timed_update(learner: MABLLearner, buf: ReplayBuffer, seed: int, steps: int | None = None,
                 rounds: int | None = None, epochs: int | None = None) -> dict[str, float]:
    """One ``learner.update``; with fewer steps/rounds/epochs the phases are scaled to the full update."""
    full = learner.cfg
    mc, pc = full.model, full.ppo
    steps, rounds, epochs = steps or mc.train_steps, rounds or pc.updates, epochs or pc.epochs
    cut = (steps, rounds, epochs) != (mc.train_steps, pc.updates, pc.epochs)
    if cut:
        learner.cfg = replace(full, model={"train_steps": steps}, ppo={"updates": rounds, "epochs": epochs})
        learner.algo.cfg = learner.cfg.ppo
    try:
        learner.update(buf, np.random.default_rng(seed))
    finally:
        learner.cfg, learner.algo.cfg = full, full.ppo
    t = dict(learner.timings)
    out = {
        "model_s": t["model_s"] * mc.train_steps / steps,
        "imagine_s": t["imagine_s"] * pc.updates / rounds,
        # policy time grows with the PPO epochs; the value pass (a small part) is scaled with it
        "policy_s": t["policy_s"] * pc.updates / rounds * pc.epochs / epochs,
    }
    out["update_s"] = sum(out.values())
    out["scaled"] = cut
    return out


def collect_throughput(learner: MABLLearner, seconds: float, seed: int) -> float:
    """Env-free decentralized acting: one batched DecentralizedPolicy.step for all agents."""
    spec, dev = learner.spec, learner.device
    g = torch.Generator().manual_seed(seed)
    pol = learner.policy
    carry = pol.initial(spec.n_agents, device=dev)
    obs = [torch.randn(spec.n_agents, spec.obs_dim, generator=g).to(dev) for _ in range(16)]
    avail = torch.ones(spec.n_agents, spec.action_dim, dtype=torch.bool, device=dev)
    for i in range(5):
        _, _, carry, _ = pol.step(obs[i % 16], avail, carry)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for i in range(20):
            _, _, carry, _ = pol.step(obs[i % 16], avail, carry)
        n += 20
    sync(dev)
    return n / (time.perf_counter() - t0)


def median_dict(rows: list[dict]) -> dict:
    return {k: (statistics.median(r[k] for r in rows) if not isinstance(rows[0][k], bool) else rows[0][k]) for k in rows[0]}


def bench_plain(n: int, args) -> dict | None:
    """Every switch off (plain fp32 eager): full update for 3 agents, scaled otherwise (minutes)."""
    if args.no_plain:
        return None
    spec = spec_for(n)
    buf = fill_buffer(spec, 3000, args.seed)
    if args.quick:
        cut = dict(steps=3, rounds=1, epochs=1)
    elif n <= 3:
        cut = {}
    else:
        cut = dict(steps=2, rounds=1, epochs=1)
    slow = make_learner(spec, False, args.seed, args.device)
    timed_update(slow, buf, args.seed, steps=1, rounds=1, epochs=1)  # warm-up
    plain = timed_update(slow, buf, args.seed + 100, **cut)
    plain["cut"] = cut
    log(f"  agents={n} plain fp32 eager: " + " ".join(f"{k}={v:.2f}" for k, v in plain.items() if k not in ("scaled", "cut")))
    return plain


def bench_optimized(n: int, args, plain: dict | None) -> dict:
    spec = spec_for(n)
    buf = fill_buffer(spec, 3000, args.seed)
    cut = dict(steps=10, rounds=1) if args.quick else {}
    fast = make_learner(spec, True, args.seed, args.device)
    timed_update(fast, buf, args.seed, steps=2, rounds=1, epochs=1)  # warm-up (allocations, oneDNN kernels)
    rows = []
    for r in range(args.repeats):
        rows.append(timed_update(fast, buf, args.seed + 1 + r, **cut))
        if rows[-1]["update_s"] > args.single_above:  # a long update: one sample is enough
            break
    res = median_dict(rows)
    log(f"  agents={n} optimized ({len(rows)} run(s)): " + " ".join(f"{k}={v:.2f}" for k, v in res.items() if k != "scaled"))
    collect = collect_throughput(fast, 1.0 if args.quick else 3.0, args.seed)
    log(f"  agents={n} collection: {collect:.0f} steps/s")
    out = {"agents": n, "update_s": res["update_s"], "model_s": res["model_s"], "imagine_s": res["imagine_s"],
           "policy_s": res["policy_s"], "fp32_eager_update_s": None if plain is None else plain["update_s"],
           "ratio": None if plain is None else plain["update_s"] / res["update_s"], "collect_steps_per_s": collect}
    out["_notes"] = {"optimized_scaled": res["scaled"], "optimized_cut": cut, "repeats": len(rows),
                     "plain_scaled": None if plain is None else plain["scaled"], "plain_cut": None if plain is None else plain["cut"],
                     "plain": plain}
    return out


def bench_ablation(n: int, args) -> list[dict]:
    """The optimized update with one switch off at a time (bf16 off = fp32 with the fused paths)."""
    spec = spec_for(n)
    buf = fill_buffer(spec, 3000, args.seed)
    cut = dict(steps=10, rounds=1) if args.quick else dict(steps=20, rounds=2)
    rows = []
    for off in [None, "bf16"] + [f for f in SPEED_FLAGS if f not in ("bf16", "tune_malloc")]:
        run = {f: True for f in SPEED_FLAGS}
        run["compile"] = False
        if off:
            run[off] = False
        torch.manual_seed(args.seed)
        learner = MABLLearner(spec, make_config("paper", spec.name, {"run": run}), args.device)
        timed_update(learner, buf, args.seed, steps=2, rounds=1, epochs=1)
        t = timed_update(learner, buf, args.seed + 1, **cut)
        rows.append({"off": off or "(none: all on)", **{k: v for k, v in t.items() if k != "scaled"}})
        log(f"  ablation agents={n} off={off}: " + " ".join(f"{k}={v:.2f}" for k, v in t.items() if k != "scaled"))
    return rows


def ablation_table(n: int, rows: list[dict], cut: str) -> list[str]:
    base = rows[0]["update_s"]
    out = ["", f"Ablation, {n} agents (one switch off at a time; update seconds scaled from {cut}):", "",
           "| switch off | update s | model s | imagine s | policy s | slowdown |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['off']} | {r['update_s']:.2f} | {r['model_s']:.2f} | {r['imagine_s']:.2f} | {r['policy_s']:.2f} | "
                   f"{r['update_s'] / base:.2f}x |")
    return out


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine(device: str = "cpu") -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load": load, "isa": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": native_bf16(device), "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
            "gpu": torch.cuda.get_device_name(torch.device(device)) if torch.device(device).type == "cuda" else None}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def table(results: list[dict], args, mach: dict, load_end) -> str:
    cmd = "python benchmarks/learner_speed.py " + " ".join(sys.argv[1:])
    start, end = markers(mach)
    bf16 = "bf16 matmuls (native here)" if mach["native_bf16"] else "fp32 (no native bf16 on this CPU, so `run.bf16` falls back to fp32)"
    lines = [
        start,
        "## Learner update speed (`benchmarks/learner_speed.py`)" + cpu_kind(mach),
        "",
        f"- command: `{cmd.strip()}`",
        f"- commit: {git_commit() or 'n/a'}; date: {_dt.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {mach['cpu']}, {mach['cores']} cores, {mach['threads']} torch threads, torch {mach['torch']}, "
        f"python {mach['python']}, CPU ISA {mach['isa']}"
        + ("" if not mach.get("gpu") else f"; learner on the GPU {mach['gpu']} (CUDA {torch.version.cuda}), timings after torch.cuda.synchronize")
        + f"; load average at start {fmt_load(mach['load'])}, at end {fmt_load(load_end)}"
        + (" (above the core count: other jobs shared the CPU, absolute seconds are inflated; ratios are from the same run)"
           if max((mach["load"] or [0])[0], (load_end or [0])[0]) > 1.25 * (mach["cores"] or 1) else "")  # its own threads load the cores fully
        + ("" if mach.get("steal") is None else f"; CPU steal during the measurement {100 * mach['steal']:.0f}%"
           + (" (the hypervisor gave that share of the CPU to other guests: absolute seconds are inflated)" if mach["steal"] >= 0.1 else "")),
        "- one full post-episode update at the `paper` preset (60 world-model steps on 40x20 sequences, 4 rounds of "
        "imagination from 800 posterior states x 15 steps + 5 PPO epochs in minibatches of 2000 joint states); "
        f"seconds, median of repeats (one run where an update takes minutes); `optimized` = the defaults (every speed switch, no torch.compile; here: {bf16}), "
        "`fp32 eager` = every switch off; `collect` = batched DecentralizedPolicy.step per second (env-free)",
        "",
        "| agents | obs/state/actions | update s | model s | imagine s | policy s | fp32 eager update s | ratio | collect steps/s | notes |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        spec = spec_for(r["agents"])
        nt = r["_notes"]
        notes = [f"optimized: {nt['repeats']} run(s)"]
        if nt["optimized_scaled"]:
            notes.append("optimized scaled from " + cut_str(nt["optimized_cut"]))
        if nt["plain_scaled"]:
            notes.append("fp32 eager scaled from " + cut_str(nt["plain_cut"]))
        lines.append(f"| {r['agents']} | {spec.obs_dim}/{spec.state_dim}/{spec.action_dim} | {fmt(r['update_s'])} | {fmt(r['model_s'])} | "
                     f"{fmt(r['imagine_s'])} | {fmt(r['policy_s'])} | {fmt(r['fp32_eager_update_s'])} | {fmt(r['ratio'], '.1f')}x | "
                     f"{fmt(r['collect_steps_per_s'], '.0f')} | {'; '.join(notes)} |")
    if getattr(args, "ablation_rows", None):
        lines += ablation_table(args.agents[0], args.ablation_rows, "10 model steps, 1 round" if args.quick else "20 model steps, 2 rounds")
    lines += ["", end]
    return "\n".join(lines)


def fmt_load(load) -> str:
    return "n/a" if not load else "/".join(f"{x:.1f}" for x in load)


def cut_str(cut: dict) -> str:
    parts = []
    if "steps" in cut:
        parts.append(f"{cut['steps']} model steps")
    if "rounds" in cut:
        parts.append(f"{cut['rounds']} round(s)")
    if "epochs" in cut:
        parts.append(f"{cut['epochs']} PPO epoch(s)")
    return ", ".join(parts) + " (linear)"


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = section.splitlines()[0], section.splitlines()[-1]
    if start in text and end in text:
        a, b = text.index(start), text.index(end) + len(end)
        text = text[:a] + section + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, nargs="+", default=None, help="agent counts (default: 3 8 27; --quick: 3)")
    ap.add_argument("--quick", action="store_true", help="< 1 minute: 3 agents, one repeat, fewer steps scaled up linearly")
    ap.add_argument("--repeats", type=int, default=None, help="repeats of the optimized update (median; default 3, quick 1)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain fp32 eager measurement")
    ap.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"), help="markdown file to update ('' to skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (a GPU writes its own BENCHMARKS.md section)")
    ap.add_argument("--ablate", action="store_true",
                    help="also time the update with one switch off at a time (first agent count; scaled like --quick)")
    ap.add_argument("--single-above", type=float, default=120.0,
                    help="stop repeating once one optimized update took longer than this many seconds")
    args = ap.parse_args(argv)
    try:
        args.device = str(resolve_device(args.device))
    except ConfigError as e:  # a bad or absent device: one line naming it and the accepted ones
        ap.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    args.agents = args.agents or ([3] if args.quick else [3, 8, 27])
    args.repeats = args.repeats or (1 if args.quick else 3)
    mach = machine(args.device)
    steal = StealMeter()
    log(f"machine: {mach}")
    # every plain measurement first: the optimized learner tunes the process's allocator (tune_malloc)
    plains = {}
    for n in args.agents:
        log(f"agents={n}: plain fp32 eager ...")
        plains[n] = bench_plain(n, args)
    results = []
    for n in args.agents:
        log(f"agents={n}: optimized ...")
        results.append(bench_optimized(n, args, plains[n]))
    if args.ablate:
        log(f"agents={args.agents[0]}: ablation ...")
        args.ablation_rows = bench_ablation(args.agents[0], args)
    try:
        load_end = os.getloadavg()
    except OSError:
        load_end = None
    mach["steal"] = steal.total()
    section = table(results, args, mach, load_end)
    print(section)
    if args.output:
        write_section(Path(args.output), section)
    main_row = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in results[0].items() if not k.startswith("_")}
    if len(results) > 1:
        main_row["runs"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if not k.startswith("_")}
                            for r in results]
    main_row["bf16"] = bool(mach["native_bf16"])
    main_row["amx"] = bool(mach["amx"])
    main_row["device"] = args.device
    main_row["cpu_steal"] = None if mach["steal"] is None else round(mach["steal"], 4)
    print(json.dumps(main_row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
