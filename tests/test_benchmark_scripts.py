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
    for name in ("greedy", "sampled"):
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
    assert (tmp_path / "benchmarks" / "results" / "t_x.csv").exists()
    saved = json.loads((tmp_path / "benchmarks" / "results" / "t_x_final.json").read_text())
    assert saved["greedy"]["return"] == pytest.approx(cmp["greedy"]["return"])
