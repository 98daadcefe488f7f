"""Environment suites behind one protocol; each adapter is imported only when used.

``make_env("smax:3m")``, ``make_env("flatland:5_agents")``, ``make_env("mamujoco:Humanoid-9|8")``.
"""
from __future__ import annotations

import importlib

from mabl.envs.base import EnvSpec, MissingDependencyError, MultiAgentEnv, TimeStep
from mabl.errors import ConfigError, one_of

# suite name -> module implementing ``TASKS`` (tuple of task names) and ``make(task, seed, **options)``
SUITES = {
    "smax": "mabl.envs.smax",
    "flatland": "mabl.envs.flatland",
    "mamujoco": "mabl.envs.mamujoco",
}


def parse_env_name(name: str) -> tuple[str, str]:
    if not isinstance(name, str) or ":" not in name:
        raise ConfigError(
            f"bad env name {name!r}: expected SUITE:TASK with SUITE one of {', '.join(SUITES)} (e.g. smax:3m)"
        )
    suite, task = name.split(":", 1)
    if suite not in SUITES:
        raise one_of("env suite", suite, SUITES)
    return suite, task


def suite_module(suite: str):
    return importlib.import_module(SUITES[suite])


def make_env(name: str, seed: int = 0, **options) -> MultiAgentEnv:
    """Build the adapter for ``SUITE:TASK``; unknown tasks raise a one-line :class:`ConfigError`."""
    suite, task = parse_env_name(name)
    mod = suite_module(suite)
    if task not in mod.TASKS:
        unbuildable = getattr(mod, "UNBUILDABLE", {})
        if task in unbuildable:
            raise ConfigError(
                f"{suite} map {task!r} cannot be built: {unbuildable[task]}; available: {', '.join(mod.TASKS)}"
            )
        raise one_of(f"{suite} task", task, mod.TASKS)
    return mod.make(task, seed=seed, **options)


__all__ = ["EnvSpec", "TimeStep", "MultiAgentEnv", "MissingDependencyError", "make_env", "parse_env_name", "SUITES"]
