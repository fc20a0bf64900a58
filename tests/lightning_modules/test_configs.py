"""Every shipped config parses with the project's LightningCLI (no data needed for --print_config)."""
from __future__ import annotations

import pytest
import yaml

from rsfusion.lightning_modules.commands.cli import main
from tests.conftest import CONFIGS as CONFIG_DIR

CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_parses(config, capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(config), "--print_config"])
    assert done.value.code in (None, 0)
    resolved = yaml.safe_load(capsys.readouterr().out)
    source = yaml.safe_load(config.read_text())
    assert resolved["model"]["class_path"].split(".")[-1] == source["model"]["class_path"].split(".")[-1]
    assert resolved["data"]["class_path"].split(".")[-1] == source["data"]["class_path"].split(".")[-1]
    assert resolved["seed_everything"] == 0


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_configs_take_the_run_folder_defaults_of_the_cli(config, capsys):
    """No config repeats the logger and checkpoints (BDGF's stage 1 keeps only ``last``: it has no val/OA)."""
    source = yaml.safe_load(config.read_text())["trainer"]
    assert "logger" not in source and "dirpath" not in config.read_text()
    assert source["default_root_dir"] == f"runs/{config.stem.removesuffix('_template')}"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--print_config"])
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert trainer["logger"]["class_path"] == "rsfusion.lightning_modules.outputs.runs.RunLogger"
    assert trainer["logger"]["init_args"]["save_dir"] is None  # = default_root_dir
    checkpoints = [(cb["init_args"]["filename"], cb["init_args"]["monitor"]) for cb in trainer["callbacks"]]
    stage_1 = source.get("callbacks") is not None
    assert checkpoints == ([("last", None)] if stage_1 else [("best-{epoch:02d}", "val/OA"), ("last", None)])
    assert all(cb["init_args"]["dirpath"] is None for cb in trainer["callbacks"])
