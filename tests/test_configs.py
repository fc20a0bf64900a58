"""Every shipped config parses with the project's LightningCLI (no data needed for --print_config)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rsfusion.lightning_modules.cli import main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


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
