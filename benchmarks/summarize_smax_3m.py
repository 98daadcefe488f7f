"""One table of every SMAX 3m run that ``eval_seed_blocks.py`` measured: the variant (its learning-curve
section), held-out 100 greedy episodes and the pooled win rate over all seed blocks.

    python benchmarks/summarize_smax_3m.py

Reads ``BENCHMARKS.md`` only (no checkpoint is needed): each ``diagnosis:smax:3m:eval_seed_blocks*`` section
names its run directory, and the ``curve:smax:3m:*`` section whose command trained that directory gives the
variant's name and its final-comparison win rate on the 100 fresh episode seeds (2000003...). Writes the
section ``summary:smax:3m:variants`` (``--no-write``: print it only); the last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from learning_curve import commit, write_section  # noqa: E402

SECTION = re.compile(r"<!-- ([^ ]+):start -->\n(.*?)<!-- \1:end -->", re.S)
NUMBER = re.compile(r"[0-9]+\.[0-9]+")
# The family prefix most variants share (the best configuration's options), shortened in the table.
COMMON = "reward_smooth_l1:reward_global:e01:unimix:prior_h_g:"


def short_name(variant: str) -> str:
    """A curve section's name as the tables print it: no ``curve:smax:3m:`` and seed, ``…:`` for COMMON."""
    return re.sub(r"^curve:smax:3m:(fast|paper):s([0-9]+|N):?", lambda m: f"{m.group(1)}:", variant).replace(COMMON, "…:")


def sections(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in SECTION.finditer(text)]


def curve_index(secs: list[tuple[str, str]]) -> dict[str, dict]:
    """Run directory basename -> {name, seed, held_out, held_out_ci} from the 3m learning-curve sections."""
    out: dict[str, dict] = {}
    for name, body in secs:
        if not name.startswith("curve:smax:3m:"):
            continue
        dirs = re.findall(r"--run-dir (runs/bench/[^\s`']+)", body)
        if not dirs:
            continue
        m = re.search(r"final checkpoint \(([0-9,]+) env steps\)[^\n]*\n\s*- greedy: [^\n]*?win rate ([0-9.]+) \[([0-9.]+), ([0-9.]+)\]", body)
        seed = re.search(r":s([0-9]+)(:|$)", name)
        row = {"name": name, "seed": int(seed.group(1)) if seed else None,
               "held_out": float(m.group(2)) if m else None,
               "held_out_ci": [float(m.group(3)), float(m.group(4))] if m else None,
               "held_out_steps": int(m.group(1).replace(",", "")) if m else None}
        for d in dirs:
            out[Path(d).name] = row  # a later section of the same directory (a continuation) wins
    return out


def block_rows(secs: list[tuple[str, str]]) -> list[dict]:
    """One row per trained checkpoint of every ``eval_seed_blocks`` section (scripted rules left out)."""
    rows = []
    for name, body in secs:
        if not name.startswith("diagnosis:smax:3m:eval_seed_blocks"):
            continue
        size = re.search(r"blocks of ([0-9]+) episode seeds", body)
        for line in body.splitlines():
            m = re.match(r"\| `([^`@]+?)( best\.pt)? @ ([0-9,]+)` \|(.*)", line)
            if not m:
                continue
            cells = [c.strip() for c in m.group(4).strip().strip("|").split("|")]
            rates = [float(c) for c in cells if NUMBER.fullmatch(c)]
            if not rates:
                continue
            rows.append({"run": m.group(1).strip(), "best": bool(m.group(2)),
                         "env_steps": int(m.group(3).replace(",", "")), "blocks": len(rates),
                         "block_episodes": int(size.group(1)) if size else None, "pooled": sum(rates) / len(rates)})
    return rows


def table(text: str) -> tuple[str, list[dict]]:
    secs = sections(text)
    curves = curve_index(secs)
    rows = block_rows(secs)
    merged: dict[str, dict] = {}
    for r in rows:
        c = curves.get(r["run"], {})
        entry = merged.setdefault(r["run"], {"run": r["run"], "variant": c.get("name"), "seed": c.get("seed"),
                                             "held_out": c.get("held_out"), "held_out_ci": c.get("held_out_ci"),
                                             "held_out_steps": c.get("held_out_steps")})
        if r["best"]:
            entry["best_pooled"], entry["best_steps"] = r["pooled"], r["env_steps"]
        else:
            entry.update(pooled=r["pooled"], env_steps=r["env_steps"], blocks=r["blocks"], block_episodes=r["block_episodes"])
    out = list(merged.values())
    lines = ["| variant (curve section) | seed | env steps | held-out 100 greedy [95%] | all seed blocks, pooled | `best.pt` (steps): pooled |",
             "|---|---:|---:|---:|---:|---:|"]
    for e in out:
        variant = e["variant"] or f"(run `{e['run']}`)"
        short = short_name(variant)
        held = "" if e.get("held_out") is None else f"{e['held_out']:.2f} [{e['held_out_ci'][0]:.2f}, {e['held_out_ci'][1]:.2f}]"
        if e.get("held_out_steps") and e.get("env_steps") and e["held_out_steps"] != e["env_steps"]:
            held += f" (at {e['held_out_steps']:,})"
        pooled = "" if "pooled" not in e else f"{e['pooled']:.3f} ({e['blocks']} x {e['block_episodes'] or '?'})"
        best = "" if "best_pooled" not in e else f"{e['best_pooled']:.3f} ({e['best_steps']:,})"
        steps = f"{e['env_steps']:,}" if e.get("env_steps") else ""
        lines.append(f"| `{short}` | {'' if e['seed'] is None else e['seed']} | {steps} | {held} | {pooled} | {best} |")
    return "\n".join(lines), out


def seed_means(rows: list[dict]) -> tuple[str, list[dict]]:
    """Variants measured on two or more seeds: mean held-out and mean pooled win rate over their seeds
    (a variant = its curve section's name without the seed), as a Markdown table and as rows."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("variant") and "pooled" in r:
            groups.setdefault(re.sub(r":s[0-9]+(:|$)", r":sN\1", r["variant"], count=1), []).append(r)
    out = []
    for name, rs in groups.items():
        seeds = sorted({r["seed"] for r in rs if r["seed"] is not None})
        if len(seeds) < 2:
            continue
        held = [r["held_out"] for r in rs if r.get("held_out") is not None]
        out.append({"variant": name, "seeds": seeds, "runs": len(rs), "pooled_mean": sum(r["pooled"] for r in rs) / len(rs),
                    "pooled_min": min(r["pooled"] for r in rs), "pooled_max": max(r["pooled"] for r in rs),
                    "held_out_mean": sum(held) / len(held) if held else None})
    lines = ["| variant | seeds | held-out 100, mean | pooled, mean (min-max) |", "|---|---|---:|---:|"]
    for e in out:
        short = short_name(e["variant"])
        held = "" if e["held_out_mean"] is None else f"{e['held_out_mean']:.3f}"
        lines.append(f"| `{short}` | {', '.join(map(str, e['seeds']))} | {held} | "
                     f"{e['pooled_mean']:.3f} ({e['pooled_min']:.3f}-{e['pooled_max']:.3f}) |")
    return "\n".join(lines), out


def span(rows: list[dict]) -> str:
    """One computed sentence: the range of the pooled win rates and the run at its top."""
    pooled = [r for r in rows if "pooled" in r]
    if not pooled:
        return "No run has a pooled win rate yet."
    top = max(pooled, key=lambda r: r["pooled"])
    reach = sum(r["pooled"] >= 0.8 for r in pooled)
    return (f"Across the {len(pooled)} runs the pooled win rate of the final checkpoint spans "
            f"{min(r['pooled'] for r in pooled):.3f}-{top['pooled']:.3f} (highest: `{top['variant'] or top['run']}`); "
            f"{reach} of them reach 0.80.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    text = (ROOT / "BENCHMARKS.md").read_text()
    tab, rows = table(text)
    means_tab, means = seed_means(rows)
    body = "\n".join([
        "### SMAX 3m: every measured variant in one table (`summary:smax:3m:variants`)",
        "",
        f"- command: `python benchmarks/summarize_smax_3m.py` (reads the sections of this file only), commit `{commit()}`",
        "- one row per run measured by `benchmarks/eval_seed_blocks.py`, in the order of those sections; `…:` stands for "
        f"`{COMMON}`, the options of the best configuration's family. Held-out = the learning-curve section's final "
        "comparison (100 greedy episodes, seeds 2000003...); pooled = mean greedy win rate over every 40-episode seed block "
        "of the `eval_seed_blocks` section (6 blocks of the run's periodic-evaluation range + 3 of the final range = 360 "
        "episodes in the newer sections); `best.pt` = the checkpoint of the best periodic evaluation on the same blocks.",
        "",
        tab,
        "",
        span(rows),
        "",
        "Variants measured on two or more seeds (final checkpoints; the same columns, averaged over the seeds):",
        "",
        means_tab,
    ])
    if not args.no_write:
        write_section("summary:smax:3m:variants", body)
    print(body)
    print(json.dumps({"rows": rows, "seed_means": means}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
