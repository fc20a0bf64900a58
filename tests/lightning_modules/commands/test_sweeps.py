"""Every W&B sweep file expands (as ``wandb agent`` does) into a command line rsfusion's CLI accepts."""
from __future__ import annotations

import contextlib
import io

import pytest
import yaml

from rsfusion.lightning_modules.commands.cli import main
from rsfusion.lightning_modules.commands.sweeps import agent_command, load_sweep, sample_parameters
from tests.conftest import ROOT

SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))


def _print_config(argv: list[str], monkeypatch) -> dict:
    """Parse a CLI invocation without running it; the fully resolved config as a dict."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["rsfusion"])  # pytest's own arguments are not the CLI's
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main([*argv, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


def _lookup(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def test_every_model_has_a_sweep():
    names = {path.stem for path in SWEEPS}
    assert {"baseline_synthetic", "m3amba_synthetic", "das2f_synthetic"} <= names
    if (ROOT / "configs" / "bdgf_synthetic.yaml").exists():
        assert "bdgf_synthetic" in names


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_expands_into_a_valid_cli_invocation(path, monkeypatch):
    sweep = load_sweep(path)
    assert sweep["program"] == "rsfusion" and sweep["method"] == "bayes"
    assert sweep["metric"] == {"name": "val/OA", "goal": "maximize"}  # the key FusionClassifier logs
    assert sweep["early_terminate"]["type"] == "hyperband"
    config_file = sweep["command"][sweep["command"].index("--config") + 1]
    assert (ROOT / config_file).exists(), config_file

    params = sample_parameters(sweep, seed=1)
    argv = agent_command(sweep, params)
    assert argv[:3] == ["/usr/bin/env", "rsfusion", "fit"]
    for key, value in params.items():
        assert f"--{key}={value}" in argv
    config = _print_config(argv[2:], monkeypatch)
    assert config["wandb"]["enabled"] is True
    for key, value in params.items():
        assert _lookup(config, key) == pytest.approx(value) if isinstance(value, float) else _lookup(config,
                                                                                                     key) == value


def test_nested_dict_keys_override_one_entry_and_keep_the_rest(monkeypatch):
    sweep = load_sweep(ROOT / "configs" / "sweeps" / "das2f_synthetic.yaml")
    base = yaml.safe_load((ROOT / "configs" / "das2f_synthetic.yaml").read_text())
    params = {"model.init_args.lr": 0.0123, "model.init_args.fusion": "concat", "data.init_args.patch_size": 16}
    config = _print_config(agent_command(sweep, params)[2:], monkeypatch)
    assert config["model"]["init_args"]["lr"] == 0.0123 and config["model"]["init_args"]["fusion"] == "concat"
    # untouched keys keep the base config's values
    assert config["model"]["init_args"]["d_model"] == base["model"]["init_args"]["d_model"]
    assert config["data"]["init_args"]["normalization"] == "minmax_global"


def test_a_misspelt_parameter_is_rejected_by_the_cli(monkeypatch):
    sweep = load_sweep(ROOT / "configs" / "sweeps" / "baseline_synthetic.yaml")
    argv = agent_command(sweep, {"model.init_args.learning_rate": 0.1})
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["rsfusion"])
    with contextlib.redirect_stderr(io.StringIO()) as err, pytest.raises(SystemExit) as exit_info:
        main([*argv[2:], "--print_config"])
    assert exit_info.value.code != 0 and "learning_rate" in err.getvalue()


def test_sampling_follows_the_distributions():
    sweep = {"parameters": {"a": {"values": [1, 2, 3]}, "b": {"distribution": "log_uniform_values", "min": 1e-4,
                                                                 "max": 1e-2},
                            "c": {"min": 2, "max": 5}, "d": {"value": "x"}}}
    draws = [sample_parameters(sweep, seed) for seed in range(200)]
    assert {d["a"] for d in draws} == {1, 2, 3} and {d["d"] for d in draws} == {"x"}
    assert all(1e-4 <= d["b"] <= 1e-2 for d in draws) and {d["c"] for d in draws} == {2, 3, 4, 5}
    # log-uniform: about half of the draws below the geometric mean 1e-3
    assert 70 < sum(d["b"] < 1e-3 for d in draws) < 130
    assert sample_parameters(sweep, 7) == sample_parameters(sweep, 7)


def test_bad_sweep_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"method": "bayes", "metric": {"name": "val/OA", "goal": "maximize"},
                                   "parameters": {"model.init_args.lr": {"values": [0.1]}},
                                   "command": ["${env}", "${program}", "fit"]}))
    with pytest.raises(ValueError, match=r"command must be a list containing \$\{program\} and \$\{args\}"):
        load_sweep(bad)
    bad.write_text(yaml.safe_dump({"method": "bayes", "metric": {"name": "val/OA"}, "parameters": {},
                                   "command": ["${program}", "${args}"]}))
    with pytest.raises(ValueError, match="metric needs a name and a goal"):
        load_sweep(bad)
