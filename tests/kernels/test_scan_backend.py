"""A model's scan_backend, given on the command line, reaches every selective_scan call (issue 13, target 7)."""
from __future__ import annotations

import pytest

from rsfusion.lightning_modules.commands.cli import main
from tests.conftest import tiny_config

TINY_CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                 patch_size=8, projection_dim=8)
# config -> (data overrides, model overrides): the smallest runs of each model with a selective scan
MODELS = {
    "m3amba_synthetic": (dict(scene_height=24, scene_width=24, train_per_class=4, patch_size=8, batch_size=4),
                         dict(dims=16, depth=1, d_state=2, ssm_ratio=1.0, drop_path_rate=0.0, clip_config=TINY_CLIP)),
    "das2f_synthetic": (dict(scene_height=24, scene_width=24, train_per_class=8, patch_size=4, batch_size=16),
                        dict(d_model=16, d_state=4, dt_rank=4, head_hidden=16)),
}


@pytest.mark.parametrize("config", list(MODELS))
@pytest.mark.parametrize("override, env, expected", [
    (["--model.init_args.scan_backend", "torch"], None, ("torch", "torch")),
    ([], "torch", ("auto", "torch")),  # the default 'auto' follows RSFUSION_SCAN_BACKEND
])
def test_scan_backend_from_the_command_line_reaches_selective_scan(tmp_path, monkeypatch, scan_backend_calls,
                                                                   config, override, env, expected):
    if env is None:
        monkeypatch.delenv("RSFUSION_SCAN_BACKEND", raising=False)
    else:
        monkeypatch.setenv("RSFUSION_SCAN_BACKEND", env)
    path = tiny_config(tmp_path, config, *MODELS[config])
    main(["validate", "--config", str(path), *override, "--trainer.limit_val_batches", "1"])
    assert scan_backend_calls and set(scan_backend_calls) == {expected}


@pytest.mark.parametrize("config", list(MODELS))
def test_unknown_scan_backend_is_a_one_line_error_on_the_command_line(tmp_path, capsys, config):
    path = tiny_config(tmp_path, config, *MODELS[config])
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", str(path), "--model.init_args.scan_backend", "gpu"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: model.init_args.scan_backend must be one of ('auto', 'cuda', 'triton', 'torch'), got 'gpu'")
