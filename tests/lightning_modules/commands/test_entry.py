"""The console scripts start at ``commands/entry.py``: subcommands that need no Lightning never import it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120)


def test_datasets_and_sweep_run_without_importing_lightning():
    out = _python("import sys\n"
                  "from rsfusion.lightning_modules.commands.entry import main\n"
                  "main(['datasets'])\n"
                  "try:\n"
                  "    main(['sweep', '--help'])\n"
                  "except SystemExit as exit_:\n"
                  "    assert exit_.code == 0, exit_.code\n"
                  "heavy = ('lightning', 'transformers', 'torchmetrics')\n"
                  "print('imported:', sorted(m for m in heavy if m in sys.modules))")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| Houston2013 | HSI 144, LiDAR DSM 1 |" in out.stdout and "usage: rsfusion sweep" in out.stdout
    assert out.stdout.strip().endswith("imported: []")


def test_the_console_script_is_the_entry_and_reaches_lightningcli_for_the_rest():
    script = Path(sys.executable).parent / "rsfusion"
    if not script.exists():
        pytest.skip("console script 'rsfusion' not installed (pip install -e .)")
    assert "commands.entry import main" in script.read_text(), \
        f"{script} predates commands/entry.py: reinstall (pip install -e .)"
    out = subprocess.run([str(script), "datasets"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "| Trento |" in out.stdout, out.stderr[-3000:]
    out = _python("import sys\n"
                  "from rsfusion.lightning_modules.commands.entry import main\n"
                  "try:\n"
                  "    main(['fit', '--help'])\n"
                  "except SystemExit as exit_:\n"
                  "    print('exit', exit_.code, 'lightning' in sys.modules)")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "--test_after_fit" in out.stdout and out.stdout.strip().endswith("exit 0 True")
