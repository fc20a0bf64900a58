"""W&B sweep files (``configs/sweeps/*.yaml``) -> the command line a ``wandb agent`` runs.

A sweep's parameters are flat LightningCLI keys (``model.init_args.lr``, ``data.init_args.patch_size``)
and its ``command`` is ``[${env}, ${program}, fit, --config, configs/<model>_<dataset>.yaml, ${args}]``
with ``program: rsfusion``. The agent expands ``${args}`` to ``--key=value`` per parameter; this module
does the same expansion with wandb's own helpers, so a sweep can be checked (and a trial reproduced)
without a W&B server::

    rsfusion sweep configs/sweeps/das2f_synthetic.yaml --seed 3

Each trial is an ordinary run of the base config: its outputs go to ``<default_root_dir>/trial_<W&B run
id>`` (the agent sets ``WANDB_SWEEP_ID`` and ``WANDB_RUN_ID``; see :mod:`rsfusion.lightning_modules.outputs.runs`),
so trials and parallel agents never share a checkpoint folder and no config is rewritten.
"""
from __future__ import annotations

import argparse
import math
import random
import shlex
from pathlib import Path
from typing import Any

import yaml
from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

METHODS = ("grid", "random", "bayes")
GOALS = ("maximize", "minimize")


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read a sweep YAML and check what the W&B server would reject (and what rsfusion relies on)."""
    path = Path(path)
    sweep = yaml.safe_load(path.read_text())
    if not isinstance(sweep, dict):
        raise ValueError(f"{path}: a sweep file must be a YAML mapping")
    if sweep.get("method") not in METHODS:
        raise ValueError(f"{path}: method must be one of {METHODS}, got {sweep.get('method')!r}")
    metric = sweep.get("metric") or {}
    if sweep["method"] == "bayes" and (not metric.get("name") or metric.get("goal") not in GOALS):
        raise ValueError(f"{path}: metric needs a name and a goal in {GOALS} for bayes search")
    command = sweep.get("command")
    if not isinstance(command, list) or "${args}" not in command or "${program}" not in command:
        raise ValueError(f"{path}: command must be a list containing ${{program}} and ${{args}}")
    params = sweep.get("parameters")
    if not isinstance(params, dict) or not params:
        raise ValueError(f"{path}: parameters must be a non-empty mapping")
    for name, spec in params.items():
        if not isinstance(spec, dict) or not ({"value", "values"} & spec.keys() or {"min", "max"} <= spec.keys()):
            raise ValueError(f"{path}: parameter {name!r} needs value, values, or min and max")
    return sweep


def _draw(name: str, spec: dict[str, Any], rng: random.Random) -> Any:
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return rng.choice(spec["values"])
    low, high = spec["min"], spec["max"]
    kind = spec.get("distribution") or ("int_uniform" if isinstance(low, int) and isinstance(high, int) else "uniform")
    if kind == "int_uniform":
        return rng.randint(low, high)
    if kind == "uniform":
        return rng.uniform(low, high)
    if kind == "log_uniform_values":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    if kind == "q_uniform":
        q = spec.get("q", 1)
        return round(rng.uniform(low, high) / q) * q
    raise ValueError(f"parameter {name!r}: distribution {kind!r} is not supported by this expander")


def sample_parameters(sweep: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """One value per parameter, as a random-search agent would draw it."""
    rng = random.Random(seed)
    return {name: _draw(name, spec, rng) for name, spec in sweep["parameters"].items()}


def agent_command(sweep: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """The argv ``wandb agent`` runs for these parameter values (same macro expansion as the agent)."""
    template = create_sweep_command(list(sweep["command"]))
    macros = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    macros.update(env=["/usr/bin/env"], interpreter=["python"], program=[sweep.get("program", "rsfusion")])
    argv: list[str] = []
    for chunk in map(str, template):
        if chunk.startswith("${") and chunk.endswith("}"):
            argv += macros.get(chunk[2:-1]) or []
        else:
            argv.append(chunk)
    return argv


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rsfusion sweep", description=__doc__.split("\n")[0])
    parser.add_argument("sweep", help="a configs/sweeps/*.yaml file")
    parser.add_argument("--seed", type=int, default=0, help="which random draw of the parameters")
    args = parser.parse_args(argv)
    sweep = load_sweep(args.sweep)
    print(shlex.join(agent_command(sweep, sample_parameters(sweep, args.seed))))


if __name__ == "__main__":
    main()
