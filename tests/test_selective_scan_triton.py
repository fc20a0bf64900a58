"""Triton backend of rsfusion.kernels.selective_scan against the literal oracle, forward and backward.

With a GPU the tests run the compiled kernels here. Without one they need the Triton interpreter,
and TRITON_INTERPRET=1 must be set before triton itself is first imported (triton's own
``tl.zeros``/``tl.sum`` helpers are @jit functions defined at import time): so in a plain CPU run
this module re-runs itself in a subprocess with the flag set, and the other test modules of the
pytest process are left untouched.
"""
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not importable: the Triton backend cannot be tested")

from rsfusion.kernels import dispatch, resolve_backend, selective_scan  # noqa: E402


def _load_sibling(name):
    """The oracle and input helpers of test_selective_scan.py, however the tests directory is imported."""
    spec = importlib.util.spec_from_file_location(f"_selective_scan_oracle_{name}", Path(__file__).with_name(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


helpers = _load_sibling("test_selective_scan.py")
INTERPRET = not torch.cuda.is_available()
DEVICE = "cpu" if INTERPRET else "cuda"
RUN_HERE = not INTERPRET or os.environ.get("TRITON_INTERPRET") == "1"
runs_here = pytest.mark.skipif(not RUN_HERE, reason="run by test_triton_tests_in_interpreter_subprocess")
N_TESTS_HERE = 8  # tests below marked runs_here (the subprocess must pass all of them)


@pytest.mark.skipif(RUN_HERE, reason="the Triton tests run directly in this process")
def test_triton_tests_in_interpreter_subprocess():
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
                            cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) == N_TESTS_HERE, report


@pytest.fixture(scope="module")
def scan_triton():
    return importlib.import_module("rsfusion.kernels.scan_triton")


def _on_device(inputs):
    return {k: v.to(DEVICE) for k, v in inputs.items()}


def triton_scan(**kwargs):
    return selective_scan(**kwargs, backend="triton")


# (batch, dim, L, N, groups (None = 3-D B/C), extras D/z/delta_bias, softplus, chunk between saved states,
#  TILE: BLOCK_D * BLOCK_N cap; 32 at N = 16 gives two channel blocks per group, summed for dB/dC)
CASES = {
    "grouped-extras-softplus-3-chunks": (2, 4, 19, 3, 2, True, True, 8, 128),
    "plain-L1-N1-batch1": (1, 2, 1, 1, None, False, False, 4, 128),
    "grouped-N16-extras-2-blocks-per-group": (2, 8, 20, 16, 2, True, False, 8, 32),
    "plain-extras-L-not-multiple-of-chunk": (1, 2, 13, 4, None, True, True, 5, 128),
}


@runs_here
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_oracle_forward_and_backward(case, scan_triton, monkeypatch):
    batch, dim, length, nstate, groups, extras, softplus, chunk, tile = CASES[case]
    monkeypatch.setattr(scan_triton, "CHUNK", chunk)
    monkeypatch.setattr(scan_triton, "TILE", tile)
    inputs = helpers.make_inputs(batch, dim, length, nstate, groups, extras)
    grad_out = torch.randn(batch, dim, length, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out, last, grads = helpers.run_with_grads(triton_scan, _on_device(inputs), grad_out.to(DEVICE),
                                              delta_softplus=softplus)
    ref_out, ref_last, ref_grads = helpers.oracle_with_grads(inputs, grad_out, softplus)
    assert out.shape == (batch, dim, length) and last.shape == (batch, dim, nstate)
    helpers.assert_close(out.cpu(), ref_out, "out")
    helpers.assert_close(last.cpu(), ref_last, "last_state")
    assert set(grads) == set(inputs)
    for name in inputs:
        assert grads[name].shape == inputs[name].shape and grads[name].dtype == inputs[name].dtype, name
        helpers.assert_close(grads[name].cpu(), ref_grads[name], f"grad {name}", rtol=2e-4, atol=2e-4)


@runs_here
def test_triton_long_sequence_in_chunks_matches_oracle(scan_triton):
    inputs = helpers.make_inputs(1, 2, 1030, 4, None, extras=True)
    grad_out = torch.randn(1, 2, 1030, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out, last, grads = helpers.run_with_grads(triton_scan, _on_device(inputs), grad_out.to(DEVICE),
                                              delta_softplus=True)
    ref_out, ref_last, ref_grads = helpers.oracle_with_grads(inputs, grad_out, True)
    assert scan_triton.CHUNK < 1030  # the default chunking splits this sequence
    helpers.assert_close(out.cpu(), ref_out, "out")
    helpers.assert_close(last.cpu(), ref_last, "last_state")
    for name in inputs:
        helpers.assert_close(grads[name].cpu(), ref_grads[name], f"grad {name}", rtol=2e-4, atol=2e-4)


@runs_here
def test_triton_half_precision_in_and_out(scan_triton):
    inputs = helpers.make_inputs(1, 4, 9, 2, groups=2, extras=True, dtype=torch.float16)
    leaves = {k: v.to(DEVICE).requires_grad_() for k, v in inputs.items()}
    out = triton_scan(**leaves, delta_softplus=True)
    assert out.dtype == torch.float16
    helpers.assert_close(out.cpu(), helpers.oracle(**inputs, delta_softplus=True)[0], "out", rtol=1e-2, atol=1e-2)
    out.float().sum().backward()
    for name, leaf in leaves.items():
        assert leaf.grad.dtype == leaf.dtype and torch.isfinite(leaf.grad).all(), name


@runs_here
def test_auto_never_picks_triton_for_cpu_tensors(scan_triton, monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("triton", torch.device(DEVICE)) == "triton"


@runs_here
def test_launch_config_keeps_channel_blocks_inside_groups(scan_triton):
    # (dim, groups, N) -> BLOCK_D: a power of two dividing dim / groups with BLOCK_D * BLOCK_N <= TILE.
    expected = {(384, 4, 16): 8, (768, 4, 1): 64, (12, 1, 16): 4, (6, 3, 1): 2, (9, 3, 5): 1}
    for (dim, groups, nstate), block_d in expected.items():
        got_d, block_n, num_warps = scan_triton._launch_config(dim, groups, nstate)
        assert (got_d, block_n) == (block_d, max(1, 1 << (nstate - 1).bit_length())), (dim, groups, nstate)
        assert num_warps >= 1
