"""Algorithm 1 end to end on SMAX at tiny sizes, the CLI and its one-line errors."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from mabl.cli import main
from mabl.config import make_config, parse_set
from mabl.cpustat import read_cpu_times
from mabl.errors import ConfigError
from mabl.train import train

pytest.importorskip("jaxmarl", reason="SMAX needs the smax extra")


def tiny_cfg(tmp_path, steps=300, **run):
    over = {"run": {"steps": steps, "eval_every": 150, "checkpoint_every": 150, "eval_episodes": 2,
                    "run_dir": str(tmp_path / "run"), **run}}
    return make_config("tiny", "smax:3m", over)


def test_train_writes_metrics_checkpoints_curve(tmp_path):
    cfg = tiny_cfg(tmp_path)
    summary = train(cfg)
    run = tmp_path / "run"
    assert summary["env_steps"] >= 300
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["env_steps"] == summary["env_steps"]
    assert any("model/loss" in r for r in rows) and any("policy/actor_loss" in r for r in rows)
    assert all(r["env_steps"] > p["env_steps"] for p, r in zip(rows, rows[1:]))
    evals = (run / "eval.csv").read_text().splitlines()
    assert evals[0].startswith("env_steps") and len(evals) >= 3 and "win_rate" in evals[0]
    assert (run / "curve.png").stat().st_size > 1000
    ckpts = sorted((run / "checkpoints").glob("ckpt_*.pt"))
    assert 1 <= len(ckpts) <= cfg.run.keep_checkpoints
    assert json.loads((run / "config.json").read_text())["run"]["env"] == "smax:3m"
    assert list(run.glob("tb/events.*"))
    if read_cpu_times() is not None:  # Linux: every row and the summary say how much CPU other VMs took
        assert all(0.0 <= r["time/cpu_steal"] <= 1.0 for r in rows)
        assert 0.0 <= summary["cpu_steal"] <= 1.0


def test_cli_train_then_eval_and_resume(tmp_path, capsys):
    rd = tmp_path / "r"
    args = ["train", "--env", "smax:3m", "--preset", "tiny", "--steps", "120", "--run-dir", str(rd),
            "--set", "run.checkpoint_every=60", "--set", "run.eval_every=1000000", "--no-progress"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # --no-resume refuses a directory with checkpoints (nothing is overwritten)
    assert main(args + ["--no-resume"]) == 2
    assert "--resume" in capsys.readouterr().err
    # the same command again resumes by default: the budget is already spent, nothing to do
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["episodes"] == first["episodes"]
    # resume to a longer budget continues from the checkpoint (old and new spellings)
    assert main(["train", "--resume", "--run-dir", str(rd), "--steps", "160", "--no-progress"]) == 0
    mid = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["train", "--resume", str(rd), "--steps", "200", "--no-progress"]) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["env_steps"] >= 200 and second["episodes"] > mid["episodes"] > first["episodes"]
    assert main(["eval", str(rd), "--episodes", "2"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["episodes"] == 2 and 0.0 <= res["win_rate"] <= 1.0 and res["env"] == "smax:3m"


@pytest.mark.parametrize("argv, needle", [
    (["train", "--env", "smax:4m", "--preset", "tiny"], "4m"),
    (["train", "--env", "atari:pong"], "atari"),
    (["train", "--env", "smax:3m", "--preset", "huge"], "huge"),
    (["train", "--env", "smax:3m", "--set", "model.hiden=3"], "hiden"),
    (["train", "--env", "smax:3m", "--set", "model.hidden=abc"], "model.hidden"),
    (["train", "--env", "smax:3m", "--set", "ppo.clip"], "ppo.clip"),
    (["train", "--env", "smax:3m", "--set", "run.device=tpu"], "tpu"),
    (["train", "--env", "smax:3m", "--set", "model.obs_loss=l3"], "l3"),
    (["config", "--env", "smax:3m", "--set", "ppo.gamma=1.5"], "ppo.gamma"),
])
def test_bad_input_is_one_line(argv, needle, capsys, tmp_path):
    argv = argv + ["--set", f"run.run_dir={tmp_path / 'x'}"] if argv[0] == "train" else argv
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mabl: error:") and "\n" not in err and needle in err, err
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_corrupt_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "ckpt_000000000001.pt"
    bad.write_bytes(b"\x00garbage" * 100)
    assert main(["eval", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "corrupt" in err and str(bad) in err and "\n" not in err


def test_unknown_section_and_parse_set():
    assert parse_set(["model.lr=1e-4", "run.bf16=false", "run.env_options={\"a\": 1}"]) == {
        "model": {"lr": 1e-4}, "run": {"bf16": False, "env_options": {"a": 1}}}
    with pytest.raises(ConfigError, match="modle"):
        parse_set(["modle.lr=1"])


def test_console_script_reports_missing_subcommand():
    out = subprocess.run([sys.executable, "-m", "mabl.cli"], capture_output=True, text=True)
    assert out.returncode == 2 and "command" in out.stderr


def test_update_schedule_by_episodes_or_env_steps(tmp_path):
    """run.train_every counts episodes; run.train_every_steps > 0 counts env steps, carrying the remainder."""
    rows_of = lambda d: [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    cfg = tiny_cfg(tmp_path, steps=200, train_every=2, eval_every=10**9, checkpoint_every=10**9)
    train(cfg)
    rows = rows_of(tmp_path / "run")
    updated = [r["episode"] for r in rows if "model/loss" in r]
    min_buffer = cfg.run.min_buffer
    assert updated and updated == [r["episode"] for r in rows if r["episode"] % 2 == 0 and r["env_steps"] >= min_buffer]

    cfg = tiny_cfg(tmp_path / "b", steps=200, train_every_steps=25, min_buffer=0, eval_every=10**9,
                   checkpoint_every=10**9)
    train(cfg)
    rows = rows_of(tmp_path / "b" / "run")
    # with min_buffer 0 every env step counts: the learner has done floor(steps / 25) updates after each episode
    for r in rows:
        expected = r["env_steps"] // 25
        assert r.get("learner/updates", None) in (None, expected)
    assert rows[-1]["env_steps"] // 25 == max(r.get("learner/updates", 0) for r in rows) > 0
    with pytest.raises(ConfigError, match="train_every_steps"):
        make_config("tiny", "smax:3m", {"run": {"train_every_steps": -1}})


def test_periodic_eval_greedy_or_sampled(tmp_path, monkeypatch):
    import mabl.train as T

    seen = []
    real = T.evaluate

    def spy(*a, **k):
        seen.append(k["deterministic"])
        return real(*a, **k)

    monkeypatch.setattr(T, "evaluate", spy)
    train(tiny_cfg(tmp_path / "s", steps=80, eval_every=40, checkpoint_every=10**9, eval_greedy=False))
    assert seen and not any(seen)
    seen.clear()
    train(tiny_cfg(tmp_path / "g", steps=80, eval_every=40, checkpoint_every=10**9))
    assert seen and all(seen)
    with pytest.raises(ConfigError, match="eval_greedy"):
        make_config("tiny", "smax:3m", {"run": {"eval_greedy": "yes"}})


def test_exploration_noise_only_takes_available_actions_and_is_recorded():
    """run.explore: random actions come from the available ones, the buffer holds the action taken."""
    import numpy as np
    import torch

    from mabl.envs import make_env
    from mabl.envs.base import EnvSpec
    from mabl.learner import MABLLearner
    from mabl.train import explore_actions, run_episode

    env = make_env("smax:3m", seed=0)
    cfg = make_config("tiny", "smax:3m")
    learner = MABLLearner(env.spec, cfg)
    rng = np.random.default_rng(0)
    avail = np.zeros((3, env.spec.action_dim), bool)
    avail[:, [1, 4, 6]] = True
    acts = np.array([[explore_actions(env.spec, np.array([4, 4, 4]), avail, 1.0, rng) for _ in range(200)]]).reshape(-1)
    assert set(acts.tolist()) == {1, 4, 6}
    assert (explore_actions(env.spec, np.array([4, 1, 6]), avail, 0.0, rng) == [4, 1, 6]).all()

    # every recorded action is one-hot, available at the step it was taken, and eps=1 departs from the policy
    ep, stats = run_episode(env, learner.policy, 3, True, torch.device("cpu"), explore=1.0)
    taken = ep["prev_action"][1:].argmax(-1)
    assert np.allclose(ep["prev_action"][1:].sum(-1), 1.0)
    assert ep["avail"][:-1][np.arange(stats.length)[:, None], np.arange(3)[None], taken].all()
    greedy, _ = run_episode(env, learner.policy, 3, True, torch.device("cpu"))
    assert len(greedy["obs"]) != len(ep["obs"]) or not np.array_equal(greedy["prev_action"], ep["prev_action"])

    # continuous: clipped to [-1, 1], padding dimensions of unequal agents untouched
    spec = EnvSpec(name="x", n_agents=2, obs_dim=3, state_dim=3, action_dim=3, discrete=False, action_dims=(3, 2))
    out = explore_actions(spec, np.zeros((2, 3), np.float32) + 0.9, None, 5.0, rng)
    assert out.dtype == np.float32 and np.abs(out).max() <= 1.0 and out[1, 2] == np.float32(0.9)

    with pytest.raises(ConfigError, match="run.explore"):
        make_config("tiny", "smax:3m", {"run": {"explore": 1.5}})


def test_best_checkpoint_follows_the_best_evaluation(tmp_path, monkeypatch, capsys):
    """``run.keep_best``: best.pt holds the learner of the best evaluation (ties keep the earlier one),
    `mabl eval` reads it, and it is not a checkpoint a resume would pick."""
    import torch

    import mabl.train as T
    from mabl.checkpoint import load_checkpoint

    scores = [0.2, 0.5, 0.5, 0.3]
    real = T.evaluate
    steps_at = []

    def scripted(*a, **k):
        res = real(*a, **k)
        res["win_rate"] = scores.pop(0) if scores else 0.0
        return res

    monkeypatch.setattr(T, "evaluate", scripted)
    orig_save = T.save_best

    def spy(state, run_dir):
        steps_at.append(state["counters"]["env_steps"])
        return orig_save(state, run_dir)

    monkeypatch.setattr(T, "save_best", spy)
    cfg = tiny_cfg(tmp_path, steps=160, eval_every=40, checkpoint_every=10**9)
    train(cfg)
    run = tmp_path / "run"
    assert not scores and len(steps_at) == 2  # after 0.2 (better than nothing) and 0.5; not after the second 0.5 or 0.3
    best = load_checkpoint(run / "best.pt")
    assert best["counters"]["env_steps"] == steps_at[-1] and best["counters"]["best_eval"] == 0.5
    assert json.loads(best["last_eval"])["win_rate"] == 0.5
    last = load_checkpoint(run / "checkpoints")
    assert last["counters"]["env_steps"] > steps_at[-1]
    diff = [k for k, v in best["learner"]["model"].items() if not torch.equal(v, last["learner"]["model"][k])]
    assert diff  # the learner kept at the best evaluation, not the final one
    capsys.readouterr()
    assert main(["eval", str(run / "best.pt"), "--episodes", "1"]) == 0
    out = capsys.readouterr().out
    assert "best.pt" in out and json.loads(out.splitlines()[-1])["seed"] == T.HELDOUT_SEED  # held-out by default
    # off: no file
    train(tiny_cfg(tmp_path / "off", steps=80, eval_every=40, checkpoint_every=10**9, keep_best=False))
    assert not (tmp_path / "off" / "run" / "best.pt").exists()

    # run.best_window=2: ranked by the mean of the newest two evaluations; the first (alone) is kept only
    # until a full window exists, so its lucky 0.8 does not outrank the later means 0.5 and 0.6
    scores[:] = [0.8, 0.2, 0.6, 0.6, 0.3]
    steps_at.clear()
    train(tiny_cfg(tmp_path / "w2", steps=200, eval_every=40, checkpoint_every=10**9, best_window=2))
    assert not scores and len(steps_at) == 3  # after 0.8 (alone), mean 0.5, mean 0.6; not after 0.4 or 0.45
    best = load_checkpoint(tmp_path / "w2" / "run" / "best.pt")
    assert best["counters"]["env_steps"] == steps_at[-1] and best["counters"]["best_eval"] == pytest.approx(0.6)
    assert best["counters"]["recent_scores"] == [0.6, 0.6]
    assert load_checkpoint(tmp_path / "w2" / "run" / "checkpoints")["counters"]["recent_scores"] == [0.6, 0.3]
    assert T.best_rank([0.5, float("nan")]) == -math.inf and T.best_rank([0.2, 0.4]) == pytest.approx(0.3)
    with pytest.raises(ConfigError, match="run.best_window"):
        make_config("tiny", "smax:3m", {"run": {"best_window": 0}})


def test_evaluation_seeds_fresh_or_fixed(tmp_path, monkeypatch):
    """``run.eval_seeds``: ``fresh`` (default) gives every evaluation a block of seeds no earlier evaluation
    of the run played, across a resume too; ``fixed`` replays one block."""
    import mabl.train as T

    firsts: list[int] = []
    real = T.evaluate

    def spy(env, policy, episodes, seed, *a, **k):
        firsts.append(seed)
        return real(env, policy, episodes, seed, *a, **k)

    monkeypatch.setattr(T, "evaluate", spy)
    base = T.EVAL_SEED_OFFSET
    train(tiny_cfg(tmp_path, steps=120, eval_every=40, checkpoint_every=10**9))
    n = len(firsts)
    assert n >= 3 and firsts == [base + 2 * j for j in range(n)]  # eval_episodes=2: consecutive, disjoint blocks
    train(tiny_cfg(tmp_path, steps=200, eval_every=40, checkpoint_every=10**9))  # resumes from the final checkpoint
    assert len(firsts) > n and firsts == [base + 2 * j for j in range(len(firsts))]
    firsts.clear()
    train(tiny_cfg(tmp_path / "fixed", steps=120, eval_every=40, checkpoint_every=10**9, eval_seeds="fixed", seed=3))
    assert len(firsts) >= 3 and set(firsts) == {base + 3 * 7_919}
    with pytest.raises(ConfigError, match="run.eval_seeds.*fresh.*fixed"):
        make_config("tiny", "smax:3m", {"run": {"eval_seeds": "rotating"}})


def test_policy_ema_is_the_evaluated_policy(tmp_path, capsys):
    """run.policy_ema: an exponential moving average of the acting networks' weights, updated after every
    learner update, is what periodic evaluation, best.pt and `mabl eval` use; the live weights are logged
    beside it, survive in the checkpoint, and `mabl eval --live` reads them."""
    import torch

    from mabl.envs import make_env
    from mabl.learner import MABLLearner
    from mabl.train import load_for_eval

    # the update rule by hand: decay min(x, (1 + n) / (10 + n)) at the n-th call, only the acting networks
    env = make_env("smax:3m", seed=0)
    ln = MABLLearner(env.spec, make_config("tiny", "smax:3m", {"run": {"policy_ema": 0.15}}))
    assert ln.eval_policy is ln.policy_ema and ln.policy_ema is not ln.policy
    assert all(torch.equal(e, p) for e, p in zip(ln.policy_ema.parameters(), ln.policy.parameters()))
    assert not any(e.requires_grad for e in ln.policy_ema.parameters())
    ema = [p.detach().clone() for p in ln.policy.parameters()]
    for n, decay in enumerate([0.1, 0.15, 0.15]):  # 1/10, then min(0.15, 2/11 = 0.18), min(0.15, 3/12)
        with torch.no_grad():
            for p in ln.policy.parameters():
                p.add_(torch.randn_like(p))
        ln.update_policy_ema()
        ema = [decay * e + (1 - decay) * p.detach() for e, p in zip(ema, ln.policy.parameters())]
        for e, got in zip(ema, ln.policy_ema.parameters()):
            torch.testing.assert_close(got, e)
    assert ln.ema_updates == 3
    critic = [p.detach().clone() for p in ln.algo.critic.parameters()]
    ln.update_policy_ema()
    assert all(torch.equal(a, b) for a, b in zip(critic, ln.algo.critic.parameters()))
    assert MABLLearner(env.spec, make_config("tiny", "smax:3m")).eval_policy is not None  # off: the live policy

    # a run: eval.csv holds the averaged policy's figures and the live ones as live_*
    cfg = tiny_cfg(tmp_path, steps=160, eval_every=40, checkpoint_every=80, policy_ema=0.9)
    train(cfg)
    run = tmp_path / "run"
    head = (run / "eval.csv").read_text().splitlines()[0].split(",")
    assert {"win_rate", "return", "live_win_rate", "live_return"} <= set(head)
    _, learner, state = load_for_eval(run)
    assert int(state["learner"]["ema_updates"]) == learner.ema_updates == learner.updates > 1
    assert any(not torch.equal(e, p) for e, p in zip(learner.policy_ema.parameters(), learner.policy.parameters()))
    capsys.readouterr()
    assert main(["eval", str(run), "--episodes", "1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["weights"] == "policy_ema"
    assert main(["eval", str(run), "--episodes", "1", "--live"]) == 0
    assert "weights" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match="run.policy_ema"):
            make_config("tiny", "smax:3m", {"run": {"policy_ema": bad}})


def test_policy_ema_resumes_exactly(tmp_path):
    import torch

    from mabl.train import load_for_eval

    train(tiny_cfg(tmp_path / "a", steps=160, eval_every=80, checkpoint_every=80, policy_ema=0.9, threads=1))
    train(tiny_cfg(tmp_path / "b", steps=80, eval_every=80, checkpoint_every=80, policy_ema=0.9, threads=1))
    train(tiny_cfg(tmp_path / "b", steps=160, eval_every=80, checkpoint_every=80, policy_ema=0.9, threads=1))
    _, a, sa = load_for_eval(tmp_path / "a" / "run")
    _, b, sb = load_for_eval(tmp_path / "b" / "run")
    assert sa["counters"]["env_steps"] == sb["counters"]["env_steps"] and a.ema_updates == b.ema_updates > 0
    assert all(torch.equal(x, y) for x, y in zip(a.policy_ema.parameters(), b.policy_ema.parameters()))
    assert (tmp_path / "a" / "run" / "eval.csv").read_text().splitlines()[1:] != []
    rows = lambda p: [r.split(",", 2)[::2] for r in (p / "run" / "eval.csv").read_text().splitlines()]  # noqa: E731
    assert rows(tmp_path / "a") == rows(tmp_path / "b")  # every column but wall_s


def test_best_smax_3m_config_file_is_the_benchmarked_configuration(capsys):
    """configs/smax_3m_best.json resolves to exactly the --set flags of the best SMAX 3m sections of
    BENCHMARKS.md (`...:sil1:value05:obs_norm:model_batch40`), and nothing else differs from the fast preset."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    flags = ["model.reward_loss=smooth_l1", "model.reward_input=agent+global", "ppo.entropy=0.01",
             "model.unimix=0.01", "model.agent_prior_input=zhat_g+h_g", "ppo.self_imitation=1.0",
             "ppo.self_imitation_value=0.5", "model.obs_norm=true", "model.batch_size=40"]
    assert main(["config", "--env", "smax:3m", "--config", str(root / "configs" / "smax_3m_best.json")]) == 0
    from_file = json.loads(capsys.readouterr().out)
    argv = ["config", "--env", "smax:3m", "--preset", "fast"]
    for f in flags:
        argv += ["--set", f]
    assert main(argv) == 0
    from_flags = json.loads(capsys.readouterr().out)
    assert from_file == from_flags
    assert main(["config", "--env", "smax:3m", "--preset", "fast"]) == 0
    plain = json.loads(capsys.readouterr().out)
    changed = {f"{s}.{k}" for s in ("model", "ppo", "run") for k in plain[s] if plain[s][k] != from_file[s][k]}
    assert changed == {f.split("=")[0] for f in flags}
