"""Reliability: exact resume after SIGKILL (also mid-checkpoint), safe and strict checkpoint
loading, the divergence guard end to end, input validation (fuzzed) and ``mabl eval`` CIs.

Runtime budget ~60 s on a 2-core CPU: one in-process reference run, two killed training
subprocesses, everything else in-process on the same (JIT-compiled) SMAX map.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mabl.checkpoint import (atomic_save, digest, list_checkpoints, load_buffer, load_checkpoint, peek_checkpoint,
                             save_buffer)
from mabl.cli import main

pytest.importorskip("jaxmarl", reason="SMAX needs the smax extra")

ROOT = Path(__file__).resolve().parents[1]
STEPS = 300
TRAIN = ["--env", "smax:3m", "--preset", "tiny", "--steps", str(STEPS), "--no-progress", "--device", "cpu",
         "--set", "run.checkpoint_every=50", "--set", "run.threads=1", "--set", "model.capacity=150",
         "--set", "run.keep_checkpoints=3"]


def _pythonpath() -> str:
    """``src`` first, then whatever PYTHONPATH the test process has (where a dependency may live)."""
    return os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p)


def rows(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def learned(row: dict) -> dict:
    """A metrics row without the wall-clock parts."""
    return {k: v for k, v in row.items() if not k.startswith("time/") and k != "wall_s"}


def one_error_line(err: str) -> str:
    err = err.strip()
    assert err.startswith("mabl: error:") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run; the killed and resumed runs must reproduce it exactly."""
    run = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", *TRAIN, "--run-dir", str(run)]) == 0
    return run


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


def _spawn(args: list[str], delay: float) -> subprocess.Popen:
    env = dict(os.environ, MABL_DEBUG_SAVE_DELAY=str(delay), PYTHONPATH=_pythonpath())
    return subprocess.Popen([sys.executable, "-m", "mabl.cli", "train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_until(proc: subprocess.Popen, cond, timeout: float = 90.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended before the kill point (rc {proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail("kill point never reached")


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _ckpt_tmps(run: Path) -> list[Path]:
    d = run / "checkpoints"
    return [p for p in d.iterdir() if p.name.startswith(".ckpt_") and p.name.endswith(".tmp")] if d.is_dir() else []


def _check_consistent(run: Path) -> int:
    """The newest checkpoint is complete and its buffer loads; returns its env steps."""
    newest = list_checkpoints(run / "checkpoints")[-1]
    state = load_checkpoint(newest)  # digest-verified: not half-written
    from mabl.buffer import ReplayBuffer
    from mabl.envs.base import EnvSpec

    buf = ReplayBuffer(EnvSpec(**json.loads(state["spec"])), 150)
    assert load_buffer(buf, state["buffer"], newest) == state["buffer"]["total"]
    return int(state["counters"]["env_steps"])


def test_sigkill_mid_checkpoint_and_resume_is_exact(reference, tmp_path, capsys):
    run = tmp_path / "killed"
    args = [*TRAIN, "--run-dir", str(run)]

    # 1) kill while a checkpoint is being written (its .tmp exists, the rename has not happened)
    proc = _spawn(args, delay=0.3)
    _wait_until(proc, lambda: len(list_checkpoints(run / "checkpoints")) >= 2 and _ckpt_tmps(run))
    _kill(proc)
    assert _ckpt_tmps(run), "the kill should have interrupted a checkpoint write"
    first_ckpt = _check_consistent(run)
    assert first_ckpt < STEPS

    # 2) resume in a subprocess and kill it at a random moment outside a write
    proc = _spawn(["--resume", str(run), "--no-progress"], delay=0.3)
    _wait_until(proc, lambda: _check_newer(run, first_ckpt) and not _ckpt_tmps(run))
    time.sleep(random.uniform(0.0, 0.15))
    _kill(proc)
    err = proc.stderr.read().decode()
    assert "Traceback" not in err, err
    ckpt = _check_consistent(run)
    assert first_ckpt < ckpt < STEPS
    beyond = [r for r in rows(run) if r["env_steps"] > ckpt]  # work after the checkpoint, to be redone

    # 3) resume to the end in-process; the saved config (threads=1, fp32) comes from the run dir
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    got, ref = rows(run), rows(reference)
    steps = [r["env_steps"] for r in got]
    assert steps == sorted(set(steps)), "metrics.jsonl has duplicate or unordered rows"
    assert [learned(r) for r in got] == [learned(r) for r in ref]  # bit-exact, losses included
    assert any("model/loss" in r for r in got if r["env_steps"] > ckpt)
    assert len(got) >= len(beyond)
    # nothing half-written or orphaned is left behind
    assert not _ckpt_tmps(run) and not list((run / "checkpoints" / "buffer").glob(".*.tmp"))
    needed = set()
    for c in list_checkpoints(run / "checkpoints"):
        needed |= set(json.loads(peek_checkpoint(c)["buffer"]["shards"]))
    assert {p.name for p in (run / "checkpoints" / "buffer").iterdir()} == needed
    # the same checkpoint schedule, and final weights equal to the uninterrupted run's
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == [p.name for p in list_checkpoints(reference / "checkpoints")]
    a = load_checkpoint(reference / "checkpoints")["learner"]
    b = load_checkpoint(run / "checkpoints")["learner"]
    assert digest(a) == digest(b)


def _check_newer(run: Path, steps: int) -> bool:
    found = list_checkpoints(run / "checkpoints")
    return bool(found) and int(found[-1].name[5:17]) > steps


def test_sigterm_stops_at_an_episode_boundary_with_a_checkpoint_and_resume_is_exact(reference, tmp_path, capsys):
    """SIGTERM (what a scheduler or `kill` sends) lets the update in progress finish, writes a checkpoint at
    that very step and exits 130; running the command again reproduces the uninterrupted run bit for bit."""
    run = tmp_path / "stopped"
    env = dict(os.environ, PYTHONPATH=_pythonpath())
    proc = subprocess.Popen([sys.executable, "-m", "mabl.cli", "train", *TRAIN, "--run-dir", str(run)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = run / "metrics.jsonl"
    def past_first_checkpoint() -> bool:
        try:
            return metrics.exists() and any(r["env_steps"] > 60 for r in rows(run))
        except json.JSONDecodeError:  # a row being written
            return False

    _wait_until(proc, past_first_checkpoint)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]
    err = err.decode()
    assert "Traceback" not in err and "stopped by SIGTERM" in err and "--resume" in err, err
    summary = json.loads(out.decode().strip().splitlines()[-1])
    stopped_at = summary["env_steps"]
    assert summary["stopped"] == "SIGTERM" and 60 < stopped_at < STEPS
    assert _check_consistent(run) == stopped_at  # the newest checkpoint is the step it stopped at
    assert rows(run)[-1]["env_steps"] == stopped_at
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert [learned(r) for r in rows(run)] == [learned(r) for r in rows(reference)]
    a = load_checkpoint(reference / "checkpoints")["learner"]
    b = load_checkpoint(run / "checkpoints")["learner"]
    assert digest(a) == digest(b)


def test_stop_request_first_signal_asks_second_interrupts():
    from mabl.train import StopRequest

    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        assert stop.requested is None and signal.getsignal(signal.SIGINT) == stop._handle
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.requested == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) == before


def test_corrupt_newest_checkpoint_falls_back_and_stays_exact(reference, tmp_path, capsys):
    run = copy_run(reference, tmp_path / "run")
    ckpts = list_checkpoints(run / "checkpoints")
    newest, previous = ckpts[-1], ckpts[-2]
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated
    # a run dir: warn, use the previous checkpoint
    assert main(["eval", str(run), "--episodes", "1"]) == 0
    err = capsys.readouterr().err
    assert "mabl: warning:" in err and "corrupt" in err and f"falling back to {previous.name}" in err
    # the file itself: refused, one line
    assert main(["eval", str(newest)]) == 2
    assert "corrupt" in one_error_line(capsys.readouterr().err)
    # a bit flip inside tensor data (which torch.load does not notice) is caught by the digest
    flipped = tmp_path / "ckpt_000000000001.pt"
    flipped.write_bytes(data)
    with zipfile.ZipFile(flipped) as z:
        rec = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)  # tensor bytes
    with open(flipped, "r+b") as f:
        f.seek(rec.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        f.seek(rec.header_offset + 30 + name_len + extra_len + rec.file_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))
    assert main(["eval", str(flipped)]) == 2
    assert "digest mismatch" in one_error_line(capsys.readouterr().err)
    # resuming falls back to the previous checkpoint, quarantines the bad one, redoes the work
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"falling back to {previous.name}" in err
    assert newest.with_name(newest.name + ".corrupt").exists()
    assert [learned(r) for r in rows(run)] == [learned(r) for r in rows(reference)]


def test_missing_buffer_shard_falls_back(reference, tmp_path, capsys):
    run = copy_run(reference, tmp_path / "run")
    newest = list_checkpoints(run / "checkpoints")[-1]
    last_shard = json.loads(peek_checkpoint(newest)["buffer"]["shards"])[-1]
    (run / "checkpoints" / "buffer" / last_shard).unlink()
    assert main(["train", "--resume", str(run), "--no-progress", "--steps", str(STEPS + 1)]) == 0
    err = capsys.readouterr().err
    assert "mabl: warning:" in err and last_shard in err and "missing" in err


@pytest.mark.parametrize("extra, needles", [
    (["--set", "model.hidden=64"], ["model.hidden: 32 in the checkpoint, 64 now"]),
    (["--seed", "7"], ["run.seed: 0 in the checkpoint, 7 now"]),
    (["--set", "ppo.epochs=2", "--set", "model.lr=0.001"], ["ppo.epochs: 1 in the checkpoint, 2 now", "model.lr"]),
])
def test_mismatched_config_is_refused(reference, tmp_path, capsys, extra, needles):
    run = copy_run(reference, tmp_path / "run")
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert main(["train", "--resume", str(run), *extra]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "different config" in err and all(n in err for n in needles), err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # untouched


def test_foreign_task_and_algorithm_are_refused(reference, tmp_path, capsys):
    run = copy_run(reference, tmp_path / "run")
    # another task into the same run dir (resume is the default): refused before the env is built
    t0 = time.perf_counter()
    assert main(["train", "--env", "smax:2s3z", "--preset", "tiny", "--run-dir", str(run)]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "run.env: 'smax:3m' in the checkpoint, 'smax:2s3z' now" in err
    assert main(["train", "--resume", str(run), "--env", "smax:2s3z"]) == 2  # the saved config, another env
    err = one_error_line(capsys.readouterr().err)
    assert "different config: run.env: 'smax:3m' in the checkpoint, 'smax:2s3z' now (" in err
    assert time.perf_counter() - t0 < 3.0  # refused before the other map is built (no JIT)
    # --no-resume never overwrites
    assert main(["train", *TRAIN, "--run-dir", str(run), "--no-resume"]) == 2
    assert "already holds checkpoints" in one_error_line(capsys.readouterr().err)

    # another algorithm: same config, a learner whose MARL algorithm is another class
    from mabl.config import config_from_dict, replace
    from mabl.errors import CheckpointError
    from mabl.learner import MABLLearner
    from mabl.mappo import MAPPO
    from mabl.train import train

    class OtherPPO(MAPPO):
        pass

    cfg = replace(config_from_dict(json.loads((run / "config.json").read_text())), run={"run_dir": str(run)})
    with pytest.raises(CheckpointError, match="algorithm 'MAPPO', this run uses 'OtherPPO'"):
        train(cfg, make_learner=lambda spec, c, dev: MABLLearner(spec, c, dev, make_algorithm=OtherPPO))


def test_checkpoint_loading_runs_no_code(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "ckpt_000000000005.pt"
    torch.save({"format": "mabl-checkpoint-v1", "x": Evil()}, bad)
    assert main(["eval", str(bad)]) == 2
    assert "not a mabl file" in one_error_line(capsys.readouterr().err)
    assert not marker.exists()
    # a valid torch file that is not a mabl checkpoint
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    assert main(["eval", str(other)]) == 2
    assert "not a mabl checkpoint" in one_error_line(capsys.readouterr().err)
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "does not exist" in one_error_line(capsys.readouterr().err)
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(tmp_path / "empty")]) == 2
    assert "no checkpoint" in one_error_line(capsys.readouterr().err)


def test_buffer_shards_restore_the_ring_exactly(tmp_path):
    """Ring buffer wrapped many times, checkpointed through shards: sampling is identical."""
    from mabl.buffer import ReplayBuffer
    from mabl.envs.base import EnvSpec

    spec = EnvSpec("toy:x", 2, 3, 4, 5, True, True, 30, True)
    rng = np.random.default_rng(0)
    buf, total, entry = ReplayBuffer(spec, 37), 0, None
    for k in range(40):
        T = int(rng.integers(2, 12))
        ep = {"obs": rng.standard_normal((T, 2, 3), dtype=np.float32), "state": rng.standard_normal((T, 4), dtype=np.float32),
              "prev_action": rng.standard_normal((T, 2, 5), dtype=np.float32), "reward": rng.standard_normal((T, 2), dtype=np.float32),
              "cont": np.ones(T, np.float32), "avail": rng.random((T, 2, 5)) > 0.5, "is_first": np.arange(T) == 0}
        buf.add_episode(ep)
        total += T
        if k % 3 == 0:
            entry = save_buffer(buf, tmp_path, total, entry)
            other = ReplayBuffer(spec, 37)
            assert load_buffer(other, entry, tmp_path / "ckpt.pt") == total
            a = buf.sample(6, 9, np.random.default_rng(k))
            b = other.sample(6, 9, np.random.default_rng(k))
            assert all(torch.equal(a[f], b[f]) for f in a) and len(other) == len(buf)


# ------------------------------------------------------------------------------------------
# Divergence guard, end to end through the CLI

@pytest.fixture
def nan_after(monkeypatch):
    """World-model loss becomes NaN from the k-th model update on."""
    from mabl.world_model import BiLevelWorldModel

    orig = BiLevelWorldModel.loss
    calls = {"n": 0, "k": 10**9}

    def loss(self, *a, **kw):
        out = orig(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] >= calls["k"]:
            return (out[0] * float("nan"), *out[1:])
        return out

    monkeypatch.setattr(BiLevelWorldModel, "loss", loss)

    def arm(k: int):
        calls["k"] = k
    return arm


def test_divergence_stops_with_report(tmp_path, capsys, nan_after):
    run = tmp_path / "run"
    nan_after(40)  # tiny: 2 model updates per episode, learning from episode ~2: a checkpoint exists by then
    assert main(["train", *TRAIN, "--steps", "600", "--run-dir", str(run)]) == 3
    err = one_error_line(capsys.readouterr().err)
    last = list_checkpoints(run / "checkpoints")[-1]
    assert "non-finite loss in world_model_loss at learner step 40" in err
    assert f"last good checkpoint: {last}" in err and "env step" in err and "skip_nonfinite" in err
    report = json.loads((run / "divergence.json").read_text())
    assert report["last_good_checkpoint"] == str(last) and report["learner_step"] == 40
    learner = load_checkpoint(last)["learner"]
    assert all(torch.isfinite(v).all() for v in learner["model"].values())


def test_skip_nonfinite_continues(tmp_path, capsys, nan_after):
    run = tmp_path / "run"
    nan_after(10)
    assert main(["train", *TRAIN, "--steps", "200", "--run-dir", str(run), "--set", "run.skip_nonfinite=true"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["nonfinite_skipped"] > 0 and summary["env_steps"] >= 200
    learner = load_checkpoint(run)["learner"]
    assert all(torch.isfinite(v).all() for v in learner["model"].values())
    assert rows(run)[-1]["guard/skipped"] == summary["nonfinite_skipped"]


# ------------------------------------------------------------------------------------------
# Input validation: one line, the bad value, what is accepted, non-zero exit

@pytest.mark.parametrize("argv, needles", [
    (["train", "--env", "smax:3m", "--steps", "abc"], ["--steps", "invalid int value: 'abc'"]),
    (["train", "--env", "smax:3m", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["train", "--env", "smax:3m", "--device", "cuda"], ["'cuda'", "CUDA is not available", "accepted: auto, cpu"]),
    (["train", "--env", "smax:3m", "--device", "tpu"], ["bad device 'tpu'", "accepted: auto, cpu, cuda, cuda:N"]),
    (["train", "--env", "smax:3m", "--steps", "0"], ["run.steps must be > 0, got 0"]),
    (["train", "--env", "smax:3m", "--seed", "-1"], ["run.seed must be >= 0, got -1"]),
    (["train", "--env", "smax:3m", "--set", "model.lr=NaN"], ["model.lr must be a finite number"]),
    (["train", "--env", "smax:3m", "--set", "model.hidden=1e12"], ["model.hidden must be at most"]),
    (["train", "--env", "smax", "--preset", "tiny"], ["bad env name 'smax'", "SUITE:TASK"]),
    (["train", "--env", "smax:3m", "--set", "run.env_options={\"foo\": 1}"], ["foo"]),
    (["train", "--env", "smax:3m", "--resume", "/nonexistent/run"], ["cannot resume '/nonexistent/run'"]),
    (["train", "--env", "smax:3m", "--resume", "--no-resume"], ["not allowed with argument"]),
    (["eval", "/nonexistent.pt", "--episodes", "0"], ["--episodes must be > 0, got 0"]),
    (["eval", "x", "--env-options", "[1]"], ["--env-options must be a JSON object"]),
    (["config", "--preset", "huge"], ["unknown preset 'huge'", "paper, fast, tiny"]),
    (["frobnicate"], ["invalid choice: 'frobnicate'"]),
])
def test_bad_flags_one_line(argv, needles, capsys, tmp_path):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    if argv[0] == "train" and "--resume" not in argv:
        argv = [*argv, "--run-dir", str(tmp_path / "r"), "--set", "run.threads=1"]
    assert main(argv) == 2
    err = one_error_line(capsys.readouterr().err)
    assert all(n in err for n in needles), err
    assert not (tmp_path / "r" / "checkpoints").exists()


class _WouldTrain(Exception):
    pass


class _NoTrainer:
    def __init__(self, *a, **kw):
        raise _WouldTrain


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:
    _KEYS = {
        "model": ["hidden", "layers", "lr", "capacity", "kl_balance", "obs_loss", "reward_loss", "recent_fraction",
                  "recent_window", "bilevel", "junk"],
        "ppo": ["epochs", "gamma", "clip", "critic_input", "attention_heads", "hidden", "entropy_annealing"],
        "run": ["env", "steps", "seed", "device", "threads", "env_options", "skip_nonfinite", "eval_episodes"],
    }
    _scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, 1, 4, 32, -1]),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                         st.sampled_from(["smax:3m", "smax:4m", "cuda", "cpu", "cuda:0", "mse", "global", "tiny"]))
    _values = st.recursive(_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                           max_leaves=5)
    _section = st.dictionaries(st.sampled_from(sum(_KEYS.values(), [])), _values, max_size=4) | _values
    _config = st.one_of(
        st.dictionaries(st.sampled_from(["preset", "model", "ppo", "run", "extra"]),
                        st.one_of(_section, st.sampled_from(["tiny", "fast", "paper", "huge"])), max_size=4),
        _values)

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(data=_config, raw=st.one_of(st.none(), st.binary(max_size=40)))
    def test_fuzz_config_files(data, raw, tmp_path, capsys, monkeypatch):
        monkeypatch.setattr("mabl.train.Trainer", _NoTrainer)
        path = tmp_path / "cfg.json"
        path.write_bytes(raw if raw is not None else json.dumps(data).encode())
        for cmd in (["config"], ["train", "--run-dir", str(tmp_path / "r")]):
            try:
                rc = main([*cmd, "--config", str(path)])
            except _WouldTrain:
                rc = 0
            out = capsys.readouterr()
            assert rc in (0, 2)
            if rc:
                one_error_line(out.err)

    _TOKENS = ["--env", "smax:3m", "smax:3s_vs_5z", "smax:99m", "atari:pong", ":", "--preset", "tiny", "huge",
               "--set", "model.hidden=-1", "run.seed=-3", "ppo.gamma=2", "model.lr=inf", "run.device=cuda:x",
               "run.steps=1e30", "x.y=1", "model.hidden", "=", "--steps", "0", "-5", "abc", "10", "--seed",
               "--device", "cpu", "tpu", "cuda:99", "--config", "/nonexistent.json", "--resume", "--no-resume",
               "--no-progress", "--episodes", "--stochastic", "--env-options", "{}", "[", "--", "-h-"]

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(cmd=st.sampled_from(["train", "config", "eval"]), toks=st.lists(st.sampled_from(_TOKENS), max_size=8))
    def test_fuzz_cli_arguments(cmd, toks, tmp_path, capsys, monkeypatch):
        monkeypatch.setattr("mabl.train.Trainer", _NoTrainer)
        monkeypatch.chdir(tmp_path)  # a default run dir lands here
        argv = [cmd, *toks] + (["--run-dir", str(tmp_path / "r")] if cmd == "train" and "--resume" not in toks else [])
        try:
            rc = main(argv)
        except _WouldTrain:
            rc = 0
        out = capsys.readouterr()
        assert rc in (0, 2), (argv, out.err)
        if rc:
            one_error_line(out.err)


@pytest.mark.parametrize("argv, setup, needle", [
    (["train", "--env", "smax:4m"], None, "unknown smax task '4m'"),
    (["train", "--steps", "abc"], None, "invalid int value: 'abc'"),
    (["config", "--config", "{cfg}"], '{"model": {"hidden": "big"}}', "model.hidden must be an int"),
    (["config", "--config", "{cfg}"], '{"model": [1, 2]}', "config section 'model'"),
    (["config", "--config", "{cfg}"], '{"model": {"hidden": 32,', "not valid JSON"),
])
def test_bad_input_via_subprocess(argv, setup, needle, tmp_path):
    cfg = tmp_path / "c.json"
    if setup is not None:
        cfg.write_text(setup)
    argv = [a.replace("{cfg}", str(cfg)) for a in argv]
    out = subprocess.run([sys.executable, "-m", "mabl.cli", *argv], capture_output=True, text=True, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=_pythonpath()), timeout=120)
    assert out.returncode == 2 and needle in one_error_line(out.stderr), out.stderr


# ------------------------------------------------------------------------------------------
# mabl eval: confidence intervals

def test_eval_prints_confidence_intervals(reference, capsys):
    assert main(["eval", str(reference), "--episodes", "4", "--stochastic"]) == 0
    human, js = capsys.readouterr().out.strip().splitlines()[-2:]
    res = json.loads(js)
    assert "95% Wilson CI" in human and "95% t CI" in human
    lo, hi = res["win_rate_ci95"]
    assert 0.0 <= lo <= res["win_rate"] <= hi <= 1.0 and hi - lo > 0.2  # 4 episodes: a wide interval
    lo, hi = res["return_ci95"]
    assert lo <= res["return"] <= hi and res["episodes"] == 4


def test_interval_formulas():
    from mabl.train import mean_ci, t975, wilson_ci

    assert wilson_ci(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-4)
    assert wilson_ci(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-4)
    assert wilson_ci(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-4)
    assert mean_ci([1, 2, 3, 4]) == pytest.approx((2.5 - 3.182446 * math.sqrt(5 / 3) / 2, 2.5 + 3.182446 * math.sqrt(5 / 3) / 2))
    assert mean_ci([3.0]) == (-math.inf, math.inf)
    assert t975(60) == pytest.approx(2.000298, abs=1e-4) and t975(1000) == pytest.approx(1.962339, abs=1e-4)


def test_atomic_save_never_leaves_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "ckpt_000000000010.pt"
    atomic_save({"a": torch.ones(3)}, target)

    def boom(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        atomic_save({"a": torch.zeros(3)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_run_dir_lock_and_resume_without_checkpoint(tmp_path, capsys):
    from mabl.train import RunLock

    run = tmp_path / "run"
    run.mkdir()
    with RunLock(run):  # another process is training here
        assert main(["train", *TRAIN, "--steps", "30", "--run-dir", str(run)]) == 2
        err = one_error_line(capsys.readouterr().err)
        assert "is in use by another mabl process" in err and f"pid {os.getpid()}" in err
    # killed before its first checkpoint: --resume starts over from the saved config, with a warning
    (run / "config.json").write_text(tiny_config_json(run))
    (run / "metrics.jsonl").write_text('{"env_steps": 5, "episode": 1}\n{"env_st')  # stale, half-written row
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr()
    assert "no checkpoint in" in out.err and "starting from step 0" in out.err
    steps = [r["env_steps"] for r in rows(run)]
    assert steps and 5 not in steps and steps == sorted(set(steps))


def tiny_config_json(run: Path) -> str:
    from mabl.config import make_config

    cfg = make_config("tiny", "smax:3m", {"run": {"steps": 40, "run_dir": str(run), "threads": 1, "progress": False}})
    return cfg.to_json()


# ------------------------------------------------------------------------------------------
# mabl eval --average: policy weights averaged over a run's checkpoints

def test_weight_averaging_is_the_mean_of_the_checkpoints(reference):
    from mabl.errors import ConfigError
    from mabl.train import load_averaged, load_for_eval

    ckpts = list_checkpoints(reference / "checkpoints")
    steps = [int(p.stem.split("_")[1]) for p in ckpts]
    assert len(ckpts) == 3
    _, avg, newest, used = load_averaged(reference, 2)
    assert sorted(used) == steps[-2:] and newest["_path"] == str(ckpts[-1])
    _, a, _ = load_for_eval(ckpts[-1])
    _, b, _ = load_for_eval(ckpts[-2])
    assert any(not torch.equal(pa, pb) for pa, pb in zip(a.policy.parameters(), b.policy.parameters()))
    for pa, pb, pm in zip(a.policy.parameters(), b.policy.parameters(), avg.policy.parameters()):
        torch.testing.assert_close(pm, (pa + pb) / 2, rtol=0, atol=1e-7)
    # everything that does not act at run time (global level, heads, critic) is the newest checkpoint's
    acting = {id(p) for p in avg.policy.parameters()}
    rest_avg = [p for p in [*avg.model.parameters(), *avg.algo.parameters()] if id(p) not in acting]
    acting_a = {id(p) for p in a.policy.parameters()}
    rest_a = [p for p in [*a.model.parameters(), *a.algo.parameters()] if id(p) not in acting_a]
    assert len(rest_avg) == len(rest_a) > 0 and all(torch.equal(x, y) for x, y in zip(rest_avg, rest_a))

    # upto: only checkpoints at or below that step; fewer than asked averages those there are
    _, early, _, used = load_averaged(reference, 5, upto=steps[1])
    assert sorted(used) == steps[:2]
    _, c, _ = load_for_eval(ckpts[0])
    for pb, pc, pm in zip(b.policy.parameters(), c.policy.parameters(), early.policy.parameters()):
        torch.testing.assert_close(pm, (pb + pc) / 2, rtol=0, atol=1e-7)

    # part="actor": the actor averaged over all three, the encoder and posterior the newest's
    _, act, _, _ = load_averaged(reference, 3, part="actor")
    for pm, *ps in zip(act.algo.actor.parameters(), a.algo.actor.parameters(), b.algo.actor.parameters(),
                       c.algo.actor.parameters()):
        torch.testing.assert_close(pm, sum(ps) / 3, rtol=0, atol=1e-7)
    assert all(torch.equal(x, y) for x, y in zip(act.policy.obs_encoder.parameters(), a.policy.obs_encoder.parameters()))

    with pytest.raises(ConfigError, match="int >= 1"):
        load_averaged(reference, 0)
    with pytest.raises(ConfigError, match="accepted: policy, actor"):
        load_averaged(reference, 2, part="critic")


def test_eval_average_cli(reference, tmp_path, capsys):
    assert main(["eval", str(reference), "--episodes", "2", "--average", "3"]) == 0
    human, js = capsys.readouterr().out.strip().splitlines()[-2:]
    res = json.loads(js)
    steps = [int(p.stem.split("_")[1]) for p in list_checkpoints(reference / "checkpoints")]
    assert res["averaged"] == {"part": "policy", "env_steps": steps} and "averaged over 3 checkpoints" in human
    assert main(["eval", str(reference), "--average", "-2"]) == 2
    assert "--average must be >= 1" in one_error_line(capsys.readouterr().err)
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(tmp_path / "empty"), "--average", "2"]) == 2
    assert "no checkpoints to average" in one_error_line(capsys.readouterr().err)
