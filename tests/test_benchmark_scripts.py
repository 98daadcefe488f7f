"""The learning-curve benchmark script: report of a run, random baseline, paired final comparison."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from mabl.config import make_config
from mabl.train import train

pytest.importorskip("jaxmarl", reason="SMAX needs the smax extra")

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_learning_curve_report_with_paired_final_comparison(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    train(make_config("tiny", "smax:3m", {"run": {"steps": 120, "eval_every": 60, "checkpoint_every": 60,
                                                   "eval_episodes": 2, "run_dir": str(run)}}))
    lc = load_script("learning_curve")
    monkeypatch.setattr(lc, "ROOT", tmp_path)  # BENCHMARKS.md and results/ go to tmp, not the repo
    argv = ["--report-only", "--run-dir", str(run), "--random-episodes", "2", "--final-episodes", "3", "--name", "t:x"]
    assert lc.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cmp = out["final_comparison"]
    assert cmp["episodes"] == 3 and cmp["checkpoint_env_steps"] >= 120
    # run.keep_best wrote best.pt: its greedy policy is tested on the same fresh seeds
    assert (run / "best.pt").exists() and 0 < cmp["best_env_steps"] <= cmp["checkpoint_env_steps"]
    for name in ("greedy", "sampled", "best greedy"):
        row = cmp[name]
        # the paired difference is taken episode by episode on the same seeds
        assert row["diff_vs_random"] == pytest.approx(row["return"] - cmp["random"]["return"], abs=1e-9)
        lo, hi = row["diff_vs_random_ci95"]
        assert lo <= row["diff_vs_random"] <= hi
        assert 0.0 <= row["win_rate"] <= 1.0
    # the random baseline on those seeds is reproducible: the same seeds give the same episodes
    again = lc.final_comparison(run, 3, lc.FINAL_SEED, 0)
    assert again["random"]["return"] == pytest.approx(cmp["random"]["return"])
    assert np.isfinite(cmp["random"]["return_ci95"]).all()
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "<!-- t:x:start -->" in text and "paired return difference vs random" in text
    assert "best periodic evaluation (`best.pt`" in text
    assert (tmp_path / "benchmarks" / "results" / "t_x.csv").exists()
    saved = json.loads((tmp_path / "benchmarks" / "results" / "t_x_final.json").read_text())
    assert saved["greedy"]["return"] == pytest.approx(cmp["greedy"]["return"])
    # a damaged best.pt costs its row, not the report
    (run / "best.pt").write_bytes(b"not a checkpoint")
    assert "best greedy" not in lc.final_comparison(run, 2, lc.FINAL_SEED, 0)
    assert "best.pt" in capsys.readouterr().err


def _obs(layout, own_health=1.0, allies=(), enemies=()):
    """A SMAX unit_list observation: allies/enemies as (index, health, dx, dy) in map units."""
    o = np.zeros(layout.own_at + 4 + layout.type_bits, np.float32)
    sight = layout.sight[0]  # marines
    for base, units in ((0, allies), (layout.unit_feats * (layout.n_allies - 1), enemies)):
        for j, h, dx, dy in units:
            at = base + j * layout.unit_feats
            o[at:at + 3] = h, dx / sight, dy / sight
    o[layout.own_at] = own_health
    o[layout.own_at + 4] = 1.0  # unit type 0: marine
    return o


def test_scripted_rules_focus_and_wait():
    sc = load_script("smax_scripted")
    layout = sc.ObsLayout("3m")
    avail = np.zeros(5 + layout.n_enemies, bool)
    avail[:5] = True
    avail[[5, 6]] = True  # enemies 0 and 1 in range
    o = _obs(layout, enemies=[(0, 0.9, 4, 0), (1, 0.3, 4, 1)])
    assert sc.ScriptedPolicy("first", layout).agent(o, avail) == 5
    assert sc.ScriptedPolicy("weakest", layout).agent(o, avail) == 6
    avail[5:] = False
    # enemy 8 units east; the only visible ally is 3 units behind (11 from it): weakest_sync waits
    o = _obs(layout, allies=[(0, 1.0, -3, 0)], enemies=[(0, 1.0, 8, 0)])
    assert sc.ScriptedPolicy("weakest", layout).agent(o, avail) == 1  # moves +x
    assert sc.ScriptedPolicy("weakest_sync", layout).agent(o, avail) == sc.STOP
    # level with the ally: moves in
    o = _obs(layout, allies=[(0, 1.0, 0, 1)], enemies=[(0, 1.0, 8, 0)])
    assert sc.ScriptedPolicy("weakest_sync", layout).agent(o, avail) == 1
    # two equally weak enemies in range: weakest takes the lower index, weakest_sync_team the one nearer
    # the centre of the team it sees (agent at 0, ally at (0, -4): centre (0, -2))
    avail[[5, 6]] = True
    o = _obs(layout, allies=[(0, 1.0, 0, -4)], enemies=[(0, 0.6, 3, 3), (1, 0.6, 3, -2)])
    assert sc.ScriptedPolicy("weakest", layout).agent(o, avail) == 5
    assert sc.ScriptedPolicy("weakest_sync_team", layout).agent(o, avail) == 6
    # health still comes first
    o = _obs(layout, allies=[(0, 1.0, 0, -4)], enemies=[(0, 0.4, 3, 3), (1, 0.6, 3, -2)])
    assert sc.ScriptedPolicy("weakest_sync_team", layout).agent(o, avail) == 5
    with pytest.raises(Exception, match="accepted: random, first, weakest, weakest_sync, weakest_sync_team"):
        sc.ScriptedPolicy("kite", layout)


def test_scripted_benchmark_and_imagined_vs_real(tmp_path, capsys, monkeypatch):
    sc = load_script("smax_scripted")
    assert sc.main(["--env", "smax:3m", "--episodes", "4", "--output", str(tmp_path / "s.md")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {r["policy"]: r for r in out["results"]}
    assert rows["random"]["win_rate"] == 0.0 and rows["weakest_sync"]["return_mean"] > rows["random"]["return_mean"]
    assert "weakest_sync" in (tmp_path / "s.md").read_text()

    run = tmp_path / "run"
    train(make_config("tiny", "smax:3m", {"run": {"steps": 80, "checkpoint_every": 10**9, "run_dir": str(run)}}))
    ivr = load_script("imagined_vs_real")
    assert ivr.main([str(run), "--episodes", "3", "--horizon", "4", "--repeats", "2"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["policies"]
    assert set(res) == {"actor (greedy)", "actor (sampled)", "scripted weakest", "scripted weakest_sync"}
    assert res["actor (greedy)"]["imagined_minus_actor"] == 0.0 == res["actor (greedy)"]["replayed_minus_actor"]
    for row in res.values():
        assert np.isfinite([row["real"], row["posterior"], row["imagined"], row["replayed"]]).all()
    # both ways of drawing imagination's latents, one set of columns each, written as a section
    monkeypatch.setattr(ivr, "write_section", lambda name, body: (tmp_path / "section.md").write_text(name + "\n" + body))
    assert ivr.main([str(run), "--episodes", "3", "--horizon", "4", "--repeats", "2", "--imagine-latent", "sample", "mode",
                     "0.5", "--name", "diagnosis:test"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["policies"]
    for row in res.values():
        assert np.isfinite([row[f"{c} ({d})"] for c in ("imagined", "replayed") for d in ("sample", "mode", "T=0.5")]).all()
    text = (tmp_path / "section.md").read_text()
    assert text.startswith("diagnosis:test") and "replayed (mode)" in text and "--imagine-latent sample mode 0.5" in text
    # a draw is applied as the config it names; a bad one is a one-line error naming what is accepted
    c = ivr.draw_config(make_config("tiny", "smax:3m", {}).model, 0.25)
    assert (c.imagine_latent, c.imagine_temperature) == ("sample", 0.25)
    with pytest.raises(SystemExit):
        ivr.main([str(run), "--imagine-latent", "argmax"])
    assert "'argmax'; accepted: sample, mode, or a temperature > 0" in capsys.readouterr().err


def test_reward_by_agent_splits_alive_and_dead_agents(tmp_path, capsys, monkeypatch):
    rba = load_script("reward_by_agent")
    # alive flags from a SMAX 3m world state: 6 units x (health, x, y, cooldown, 6 type bits) + 12
    st = np.zeros((2, 72), np.float32)
    st[0, [0, 10, 20]] = [1.0, 0.5, 0.2]
    st[1, [0, 20]] = [0.3, 0.1]
    assert rba.alive_mask(st, 3, 6).tolist() == [[True, True, True], [True, False, True]]
    run = tmp_path / "run"
    train(make_config("tiny", "smax:3m", {"run": {"steps": 80, "checkpoint_every": 10**9, "run_dir": str(run)},
                                           "model": {"reward_input": "agent+global"}}))
    monkeypatch.setattr(rba, "write_section", lambda name, body: (tmp_path / "section.md").write_text(name + "\n" + body))
    assert rba.main([str(run), "--episodes", "3", "--write", "test"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])[0]
    assert row["reward_input"] == "agent+global" and row["episodes"] == 3 and np.isfinite(row["mae_alive"])
    text = (tmp_path / "section.md").read_text()
    assert text.startswith("diagnosis:test") and "agent+global" in text and "reward_by_agent.py" in text


def test_learner_speed_sections_keep_each_cpu_kind_apart(tmp_path):
    """The speed targets are stated for the AMX machine: figures from an AVX2 CPU (fp32 fallback) or
    an AVX512-BF16 CPU without AMX go to their own sections and never overwrite the AMX table."""
    ls = load_script("learner_speed")
    amx = {"isa": "AVX512", "native_bf16": True, "amx": True}
    zen4 = {"isa": "AVX512", "native_bf16": True, "amx": False}
    avx2 = {"isa": "AVX2", "native_bf16": False, "amx": False}
    assert ls.markers(amx) == (ls.START, ls.END)
    keys = {ls.markers(m)[0] for m in (amx, zen4, avx2)}
    assert keys == {ls.START, "<!-- learner_speed_avx512_bf16:start -->", "<!-- learner_speed_avx2:start -->"}
    assert ls.cpu_kind(amx) == "" and "no AMX" in ls.cpu_kind(zen4) and "without native bf16" in ls.cpu_kind(avx2)
    out = tmp_path / "B.md"
    out.write_text(f"# B\n\n{ls.START}\nAMX table\n{ls.END}\n")
    for m, body in ((zen4, "zen4 table"), (avx2, "avx2 table"), (zen4, "zen4 again")):
        s, e = ls.markers(m)
        ls.write_section(out, f"{s}\n{body}\n{e}")
    text = out.read_text()
    assert "AMX table" in text and "avx2 table" in text and "zen4 again" in text and "zen4 table" not in text
    # a GPU (--device cuda) writes its own section, whatever CPU hosts it
    gpu = dict(amx, gpu="NVIDIA H200")
    assert ls.markers(gpu)[0] == "<!-- learner_speed_cuda:start -->" and "NVIDIA H200" in ls.cpu_kind(gpu)
    s, e = ls.markers(gpu)
    ls.write_section(out, f"{s}\ngpu table\n{e}")
    text = out.read_text()
    assert "AMX table" in text and "gpu table" in text and "zen4 again" in text


def test_learner_speed_refuses_a_device_it_cannot_use(capsys):
    ls = load_script("learner_speed")
    with pytest.raises(SystemExit) as exit_info:
        ls.main(["--device", "tpu", "--output", ""])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "bad device 'tpu'" in err and "accepted: auto, cpu, cuda, cuda:N" in err


def test_imagined_by_step_compares_imagined_and_real_returns(tmp_path, capsys, monkeypatch):
    ibs = load_script("imagined_by_step")
    run = tmp_path / "run"
    train(make_config("tiny", "smax:3m", {"run": {"steps": 80, "checkpoint_every": 10**9, "run_dir": str(run)}}))
    monkeypatch.setattr(ibs, "write_section", lambda name, body: (tmp_path / "section.md").write_text(name + "\n" + body))
    assert ibs.main([str(run), "--episodes", "3", "--write", "test"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])[0]
    H = row["horizon"]
    assert H == 5 and len(row["reward_by_step"]) == len(row["cont_by_step"]) == len(row["reach_by_step"]) == H
    # every step of an episode but a terminal last one is a start: episode lengths + 1 (reset) - terminal ends
    total = round(row["mean_length"] * 3)
    assert total <= row["starts"] <= total + 3
    reach = np.array(row["reach_by_step"])
    assert reach[0] == 1.0 and (np.diff(reach) <= 1e-6).all() and (reach > 0).all()
    assert np.isfinite([row["real_return"], row["imagined_weighted"], row["imagined_unweighted"], row["after_real_end"]]).all()
    # the real H-step return of a SMAX start is a sum of at most H non-negative team rewards (scaled x10, <= ~20 per episode)
    assert 0.0 <= row["real_return"] <= 25.0
    # terminal steps: one per episode that ended in a decided battle; continuations are probabilities
    assert 0 <= row["terminal_steps"] <= 3
    if row["terminal_steps"]:
        assert 0.0 <= row["terminal_cont_post"] <= 1.0 and 0.0 <= row["terminal_cont_prior"] <= 1.0
        assert np.isfinite([row["terminal_reward_post"], row["terminal_reward_prior"], row["terminal_reward_real"]]).all()
    text = (tmp_path / "section.md").read_text()
    assert text.startswith("diagnosis:test") and "imagined_by_step.py" in text and "reach weight" in text
    assert "one-step prior samples" in text


def test_smax_focus_fire_measures_target_choice(tmp_path, capsys, monkeypatch):
    import torch

    sff = load_script("smax_focus_fire")
    run = tmp_path / "run"
    train(make_config("tiny", "smax:3m", {"run": {"steps": 80, "checkpoint_every": 10**9, "run_dir": str(run)}}))
    monkeypatch.setattr(sff, "write_section", lambda name, body: (tmp_path / "section.md").write_text(name + "\n" + body))
    assert sff.main([str(run), "--episodes", "3", "--write", "test"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])[0]
    for key in ("win", "win_target_weakest", "imagined_p_weakest"):
        assert 0.0 <= row[key] <= 1.0, key
    for key in ("attacks_on_weakest", "decoder_finds_weakest"):  # nan when no step had two targets of different health
        assert np.isnan(row[key]) or 0.0 <= row[key] <= 1.0, key
    assert sum(row["imagined_attacks"]) <= row["imagined_steps"]
    assert set(row["advantage_gap"]) == set(sff.VARIANTS)
    assert "target = weakest" in (tmp_path / "section.md").read_text()
    assert "counterfactual baseline" in (tmp_path / "section.md").read_text()
    # the override attacks the weakest enemy in range whenever there is one, and the carry sees that action
    from mabl.envs import make_env
    from mabl.train import load_for_eval

    _, learner, _ = load_for_eval(str(run), "cpu")
    env, layout = make_env("smax:3m", seed=0), sff.ObsLayout("3m")
    pol = sff.WeakestTarget(learner.policy, layout)
    checked = 0
    for seed in range(4):
        ts, carry = env.reset(seed=seed), pol.initial(3)
        while not ts.done:
            _, act, carry, _ = pol.step(torch.as_tensor(ts.obs), torch.as_tensor(ts.avail), carry, deterministic=True)
            assert (carry.prev_action.argmax(-1) == act).all()
            for i in range(3):
                targets = np.flatnonzero(ts.avail[i, 5:])
                if targets.size:
                    health = layout.parse(ts.obs[i])[3]
                    assert health[int(act[i]) - 5] == health[targets].min()
                    checked += 1
            ts = env.step(act.numpy())
    assert checked > 0


def test_smax_shared_target_measures_teammates_shots_in_imagination(tmp_path, capsys, monkeypatch):
    sst = load_script("smax_shared_target")
    run = tmp_path / "run"
    train(make_config("tiny", "smax:3m", {"run": {"steps": 80, "checkpoint_every": 10**9, "run_dir": str(run)},
                                          "model": {"agent_prior_input": "zhat_g+h_g"}}))
    monkeypatch.setattr(sst, "write_section", lambda name, body: (tmp_path / "section.md").write_text(name + "\n" + body))
    assert sst.main([str(run), "--episodes", "4", "--write", "test"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])[0]
    real, count = row["real_drop"], row["real_count"]
    assert count["0"] > 0 and real["0"] == 0.0  # SMAX enemies do not heal: no attacker, no loss of health
    for m in ("1", "2", "3"):  # every attack that lands takes health
        assert count[m] == 0 or real[m] > 0, m
    if count["1"] and count["2"]:
        assert real["2"] > real["1"]
    assert row["imagined_count"] > 0  # the tiny policy attacks: some steps have an enemy in range of two agents
    assert all(np.isfinite(v) for v in row["imagined_drop"].values())
    text = (tmp_path / "section.md").read_text()
    assert text.startswith("diagnosis:test") and "teammate - none" in text


def test_weight_averaging_compares_last_and_averaged_checkpoints(tmp_path, capsys, monkeypatch):
    wa = load_script("weight_averaging")
    run = tmp_path / "run"
    train(make_config("tiny", "smax:3m", {"run": {"steps": 120, "checkpoint_every": 30, "keep_checkpoints": 10,
                                                    "run_dir": str(run)}}))
    monkeypatch.setattr(wa, "write_section", lambda name, body: (tmp_path / "section.md").write_text(name + "\n" + body))
    assert wa.main([str(run), "--start", "30", "--every", "30", "--windows", "2", "--episodes", "2",
                    "--fresh-episodes", "2", "--write", "test"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    steps = sorted(int(p.stem.split("_")[1]) for p in (run / "checkpoints").glob("ckpt_*.pt"))
    rows = out["rows"]
    # one row per checkpoint here (one per 30 steps); "last" is that checkpoint, avg2 it and the one before
    assert [r["upto"] for r in rows] == steps
    assert all(r["last_steps"] == [r["upto"]] * 2 for r in rows)
    assert [r["avg2_steps"] for r in rows] == [[steps[0], steps[0]]] + [[a, b] for a, b in zip(steps, steps[1:])]
    assert all(0.0 <= r[c] <= 1.0 for r in rows for c in ("last", "avg2"))
    assert set(out["fresh"]) == {"last:final", "last:best", "avg2:final", "avg2:best"}
    assert out["fresh"]["avg2:final"]["steps"] == steps[-2:]
    text = (tmp_path / "section.md").read_text()
    assert text.startswith("diagnosis:test") and "weight_averaging.py" in text and "| `avg2:final` |" in text
    # the script's cached averaging is mabl eval --average's (load_averaged), for both parts
    import torch

    from mabl.train import load_averaged

    for part in ("policy", "actor"):
        avg = wa.Averager(wa.ckpt_paths(run), part)
        assert avg.window(2, steps[-1]) == steps[-2:]
        got = [p.detach().clone() for p in avg.learner(steps[-2:]).policy.parameters()]
        _, ref, _, _ = load_averaged(run, 2, part=part)
        for a, b in zip(got, ref.policy.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_advantage_noise_splits_the_imagined_advantage_variance(tmp_path, capsys, monkeypatch):
    an = load_script("advantage_noise")
    import torch
    x = torch.tensor([1.0, 2.0, 4.0, 7.0])
    assert an.explained_variance(x, x) == 1.0 and abs(an.explained_variance(x, torch.full_like(x, float(x.mean())))) < 1e-6
    run = tmp_path / "run"
    train(make_config("tiny", "smax:3m", {"run": {"steps": 80, "checkpoint_every": 10**9, "run_dir": str(run)}}))
    monkeypatch.setattr(an, "write_section", lambda name, body: (tmp_path / "section.md").write_text(name + "\n" + body))
    assert an.main([str(run), "--episodes", "3", "--write", "test"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])[0]
    assert row["horizon"] == 5 and len(row["by_t"]) == 5 and row["agents"] == 3 and row["starts"] > 0
    assert 0.0 <= row["between_t_share"] <= 1.0 and 0.0 <= row["common_share"] <= 1.0
    # the run's own lambda reproduces the advantage it reports; lambda = 0 is the one-step TD error
    assert abs(row["adv_std_by_lambda"][str(row["gae_lambda"])] - row["adv_std"]) < 1e-3 * max(1.0, row["adv_std"])
    assert set(row["adv_std_by_lambda"]) == {"0.95", "0.8", "0.5", "0.0"}
    assert all(np.isfinite([b["ret"], b["value"], b["adv_std"]]).all() for b in row["by_t"])
    assert set(row["counterfactual"]) == {"1", "4"}
    for c in row["counterfactual"].values():
        assert c["adv_std"] > 0 and 0.0 <= c["common_share"] <= 1.0 and 0.0 <= c["common_share_lambda0"] <= 1.0 and c["gap"] >= 0
    text = (tmp_path / "section.md").read_text()
    assert text.startswith("diagnosis:test") and "advantage_noise.py" in text and "explained variance" in text
    assert "counterfactual baseline" in text


def test_eval_seed_blocks_reads_each_block_and_the_gap(tmp_path, capsys, monkeypatch):
    """benchmarks/eval_seed_blocks.py: block 0 is the run's fixed evaluation block, the next blocks are the
    seeds run.eval_seeds=fresh moves on to, and the gap is block 0 minus the pooled rest."""
    esb = load_script("eval_seed_blocks")
    from mabl.train import EVAL_SEED_OFFSET

    assert esb.seed_blocks(2, 5, 3, 1) == [("eval 0", EVAL_SEED_OFFSET + 2 * 7_919), ("eval 1", EVAL_SEED_OFFSET + 2 * 7_919 + 5),
                                          ("eval 2", EVAL_SEED_OFFSET + 2 * 7_919 + 10), ("final 0", 2_000_003)]
    row = esb.summary_row("p", [(4, 5), (1, 5), (2, 5)])
    assert row["rates"] == [0.8, 0.2, 0.4] and row["rest"] == pytest.approx(0.3) and row["gap"] == pytest.approx(0.5)
    assert 0.0 < row["rest_ci95"][0] < 0.3 < row["rest_ci95"][1] < 1.0

    run = tmp_path / "run"
    train(make_config("tiny", "smax:3m", {"run": {"steps": 80, "checkpoint_every": 10**9, "eval_every": 40,
                                                   "run_dir": str(run)}}))
    monkeypatch.setattr(esb, "write_section", lambda name, body: (tmp_path / "section.md").write_text(name + "\n" + body))
    assert esb.main([str(run), "--episodes", "2", "--blocks", "2", "--best", "--scripted", "weakest_sync_team"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    names = [r["policy"] for r in out["rows"]]
    assert len(names) == 3 and "best.pt" in names[1] and names[2] == "scripted weakest_sync_team"
    assert all(len(r["rates"]) == 3 for r in out["rows"])
    text = (tmp_path / "section.md").read_text()
    assert text.startswith("diagnosis:smax:3m:eval_seed_blocks") and "| block 0 − rest |" in text
    with pytest.raises(SystemExit, match="--blocks"):
        esb.main([str(run), "--blocks", "1"])


def test_polish_trains_on_the_buffer_without_env_steps_and_leaves_the_run_alone(tmp_path, capsys, monkeypatch):
    pol = load_script("polish")
    run = tmp_path / "run"
    train(make_config("tiny", "smax:3m", {"run": {"steps": 80, "checkpoint_every": 10**9, "run_dir": str(run)}}))
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    written = {}
    monkeypatch.setattr(pol, "write_section", lambda name, body: written.update({name: body}))
    assert pol.main([str(run), "--updates", "2", "--eval-every", "1", "--eval-episodes", "2", "--final-episodes", "3",
                     "--name", "polish:test"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["env_steps"] >= 80 and out["extra_updates"] == 2 and out["learner_updates_before"] >= 1
    assert [r["updates"] for r in out["curve"]] == [0, 1, 2]
    for key in ("held_out_before", "held_out_after"):
        assert 0.0 <= out[key]["win_rate"] <= 1.0 and len(out[key]["win_rate_ci95"]) == 2
    body = written["polish:test"]
    assert "benchmarks/polish.py" in body and "no new env step" in body and "| 2 |" in body
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before  # the run is only read


def test_latent_ceiling_clones_a_scripted_rule_on_the_actors_own_input(tmp_path, capsys, monkeypatch):
    """benchmarks/latent_ceiling.py: the features it rebuilds along a recorded episode are exactly what the
    run's decentralized actor acted on, the teacher labels its own episodes with the actions it took, and
    cloning fits the teacher on the observation; the end-to-end run writes the table."""
    lc = load_script("latent_ceiling")
    run = tmp_path / "run"
    train(make_config("tiny", "smax:3m", {"run": {"steps": 80, "checkpoint_every": 10**9, "run_dir": str(run)}}))
    cfg, learner, _ = lc.load_for_eval(run)
    env = lc.make_env("smax:3m", seed=0)
    import torch

    ep, _ = lc.run_episode(env, learner.policy, 5, True, torch.device("cpu"))
    feat = lc.agent_features(learner.policy, ep)
    T = ep["obs"].shape[0] - 1
    assert feat.shape == (T, env.spec.n_agents, learner.model.feat_a)
    acted = torch.as_tensor(ep["prev_action"][1:]).argmax(-1)
    greedy = learner.policy.actor.params(feat, torch.as_tensor(ep["avail"][:T]))[0].argmax(-1)
    assert torch.equal(greedy, acted)  # the actor's greedy choice on the rebuilt features = what it did

    teacher = lc.ScriptedPolicy("weakest_sync_team", lc.ObsLayout("3m"), sync_margin=0.25)
    eps = [lc.run_episode(env, teacher, lc.TRAIN_SEED + k, True, torch.device("cpu"))[0] for k in range(6)]
    x, o, m, y = lc.label(teacher, learner.policy, eps)
    assert len(x) == len(o) == len(m) == len(y) > 0 and bool(m.sum(-1).gt(1).all())
    taken = torch.cat([torch.as_tensor(e["prev_action"][1:]).argmax(-1)[torch.as_tensor(e["avail"][:-1].sum(-1) > 1)]
                       for e in eps])
    assert torch.equal(y, taken)  # a deterministic teacher's labels on its own states are its actions
    torch.manual_seed(0)
    student = lc.Actor(env.spec.obs_dim, env.spec.action_dim, 64, 2, True)
    before = lc.accuracy(student, o, m, y)
    assert lc.fit(student, o, m, y, steps=300, batch=256, lr=3e-3, seed=0) > max(0.9, before)
    # early stopping keeps the parameters of the best held-out check, the last step among the checks:
    # on labels unrelated to the inputs it ends at least as good on the held-out set as the same fit
    # (same initialisation and batches) without stopping
    import copy

    torch.manual_seed(1)
    plain = lc.Actor(env.spec.obs_dim, env.spec.action_dim, 64, 2, True)
    stopped = copy.deepcopy(plain)
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    lc.fit(plain, o, m, shuffled, steps=60, batch=256, lr=3e-3, seed=0, weight_decay=0.01)
    lc.fit(stopped, o, m, shuffled, steps=60, batch=256, lr=3e-3, seed=0, weight_decay=0.01, val=(o, m, y), check_every=1)
    assert lc.accuracy(stopped, o, m, y) >= lc.accuracy(plain, o, m, y)

    written = {}
    monkeypatch.setattr(lc, "write_section", lambda name, body: written.update({name: body}))
    assert lc.main([str(run), "--episodes", "3", "--dagger", "1", "--steps", "5", "--eval-episodes", "2",
                    "--val-frac", "0.34", "--weight-decay", "0.01", "--imagine", "3", "--horizon", "4", "--repeats", "1"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["round"] for r in out["rounds"]] == [0, 1]
    assert out["rounds"][1]["latent_samples"] > out["rounds"][0]["latent_samples"]
    assert all(0.0 <= r[k + "_val_acc"] <= 1.0 for r in out["rounds"] for k in ("latent", "decoded", "obs"))
    assert set(out["results"]) == {"teacher", "run's actor", "latent student", "decoded student", "obs student"}
    body = written["diagnosis:smax:3m:latent_ceiling"]
    assert "benchmarks/latent_ceiling.py" in body and "| latent student | [z^a, h^a] (cloned) |" in body
    assert "held-out acc." in body and "early stopping" in body
    rated = out["imagined"]
    assert list(rated) == ["run's actor", "latent student"] and "| latent student | " in body.split("How the world model")[1]
    assert rated["run's actor"]["imagined_minus_actor"] == 0.0 and all(v == v for v in rated["latent student"].values())
    # the real return is the environment's: the run's actor scores what evaluate() gives on the same seeds
    from mabl.train import evaluate

    assert rated["run's actor"]["real"] == pytest.approx(evaluate(env, learner.policy, 3, lc.FINAL_SEED, torch.device("cpu"))["return"])
    r2 = out["reconstruction_r2"]
    assert set(r2) == {"allies", "enemies", "own"} and all(set(v) == {"health", "x", "y", "cooldown"} for v in r2.values())
    assert all(v <= 1.0 for g in r2.values() for v in g.values() if v == v) and "| enemies |" in body
    # a perfect reconstruction scores 1 on every column that varies
    perfect = lc.reconstruction_r2(teacher.layout, lc._compiled("3m")[0], o, o.clone())
    assert all(v == pytest.approx(1.0) for g in perfect.values() for v in g.values() if v == v)
    with pytest.raises(SystemExit):
        lc.main([str(run), "--teacher", "random"])


def test_summarize_smax_3m_joins_curve_and_seed_block_sections():
    sm = load_script("summarize_smax_3m")
    text = "\n".join([
        "<!-- curve:smax:3m:fast:s1:reward_smooth_l1:reward_global:e01:unimix:prior_h_g:sil1:xyz:start -->",
        "- command: `python benchmarks/learning_curve.py --seed 1 --run-dir runs/bench/run_a --name curve:smax:3m:fast:s1:...`",
        "- final checkpoint (50,010 env steps) against the random policy on the same 100 fresh episode seeds (2000003...; 95% intervals):",
        "  - greedy: return 17.00 [16.00, 18.00], win rate 0.730 [0.64, 0.81]; paired return difference vs random +15.0 [+14.0, +16.0]",
        "  - sampled: return 15.00 [14.00, 16.00], win rate 0.600 [0.50, 0.69]; paired",
        "<!-- curve:smax:3m:fast:s1:reward_smooth_l1:reward_global:e01:unimix:prior_h_g:sil1:xyz:end -->",
        "<!-- diagnosis:smax:3m:eval_seed_blocks:a:start -->",
        "- greedy win rate on blocks of 40 episode seeds (first seed in brackets)",
        "| policy | eval 0 (1) | eval 1 (2) | final 0 (3) | rest pooled [95%] | block 0 − rest |",
        "|---|---:|---:|---:|---:|---:|",
        "| `run_a @ 50,010` | 0.500 | 0.700 | 0.900 | 0.800 [0.70, 0.88] | -0.300 |",
        "| `run_a best.pt @ 45,000` | 0.600 | 0.600 | 0.600 | 0.600 [0.50, 0.69] | +0.000 |",
        "| `weakest_sync_team (margin 0.25)` | 0.800 | 0.800 | 0.800 | 0.800 [0.70, 0.88] | +0.000 |",
        "<!-- diagnosis:smax:3m:eval_seed_blocks:a:end -->",
    ])
    tab, rows = sm.table(text)
    assert len(rows) == 1  # the scripted rule is not a run
    row = rows[0]
    assert row["seed"] == 1 and row["held_out"] == 0.73 and row["held_out_ci"] == [0.64, 0.81]
    assert row["env_steps"] == 50_010 and row["blocks"] == 3 and abs(row["pooled"] - 0.7) < 1e-9
    assert row["best_steps"] == 45_000 and abs(row["best_pooled"] - 0.6) < 1e-9
    assert "`fast:…:sil1:xyz`" in tab and "0.73 [0.64, 0.81]" in tab and "0.700 (3 x 40)" in tab
    assert sm.span(rows).startswith("Across the 1 runs") and "0.700-0.700" in sm.span(rows) and "0 of them reach 0.80" in sm.span(rows)
    assert sm.seed_means(rows)[1] == []  # one seed: no mean
    other = dict(row, run="run_b", seed=2, pooled=0.6, held_out=0.5,
                 variant=row["variant"].replace(":s1:", ":s2:"))
    means_tab, means = sm.seed_means(rows + [other])
    assert len(means) == 1 and means[0]["seeds"] == [1, 2] and means[0]["runs"] == 2
    assert abs(means[0]["pooled_mean"] - 0.65) < 1e-9 and abs(means[0]["held_out_mean"] - 0.615) < 1e-9
    assert "`fast:…:sil1:xyz` | 1, 2 | 0.615 | 0.650 (0.600-0.700) |" in means_tab
