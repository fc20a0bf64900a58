"""Triton backend of rsfusion.kernels.selective_scan against the reference (selective_scan_ref), forward and backward.

With a GPU the tests run the compiled kernels here. Without one they need the Triton interpreter,
and TRITON_INTERPRET=1 must be set before triton itself is first imported (triton's own
``tl.zeros``/``tl.sum`` helpers are @jit functions defined at import time): so in a plain CPU run
this module re-runs itself in a subprocess with the flag set, and the other test modules of the
pytest process are left untouched.
"""
import importlib
import importlib.util
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not importable: the Triton backend cannot be tested")

from rsfusion.kernels import dispatch, resolve_backend, selective_scan  # noqa: E402
from tests.conftest import ROOT, assert_close, make_inputs, oracle, oracle_with_grads, run_with_grads  # noqa: E402

INTERPRET = not torch.cuda.is_available()
DEVICE = "cpu" if INTERPRET else "cuda"
RUN_HERE = not INTERPRET or os.environ.get("TRITON_INTERPRET") == "1"
runs_here = pytest.mark.skipif(not RUN_HERE, reason="run by test_triton_tests_in_interpreter_subprocess")
N_TESTS_HERE = 16  # tests that run in the subprocess: those marked runs_here and the unmarked ones


@pytest.mark.skipif(RUN_HERE, reason="the Triton tests run directly in this process")
def test_triton_tests_in_interpreter_subprocess():
    repo = ROOT
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                             str(Path(__file__))], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
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
    inputs = make_inputs(batch, dim, length, nstate, groups, extras)
    grad_out = torch.randn(batch, dim, length, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out, last, grads = run_with_grads(triton_scan, _on_device(inputs), grad_out.to(DEVICE),
                                              delta_softplus=softplus)
    ref_out, ref_last, ref_grads = oracle_with_grads(inputs, grad_out, softplus)
    assert out.shape == (batch, dim, length) and last.shape == (batch, dim, nstate)
    assert_close(out.cpu(), ref_out, "out")
    assert_close(last.cpu(), ref_last, "last_state")
    assert set(grads) == set(inputs)
    for name in inputs:
        assert grads[name].shape == inputs[name].shape and grads[name].dtype == inputs[name].dtype, name
        assert_close(grads[name].cpu(), ref_grads[name], f"grad {name}", rtol=2e-4, atol=2e-4)


@runs_here
def test_triton_long_sequence_in_chunks_matches_oracle(scan_triton):
    inputs = make_inputs(1, 2, 1030, 4, None, extras=True)
    grad_out = torch.randn(1, 2, 1030, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out, last, grads = run_with_grads(triton_scan, _on_device(inputs), grad_out.to(DEVICE),
                                              delta_softplus=True)
    ref_out, ref_last, ref_grads = oracle_with_grads(inputs, grad_out, True)
    assert scan_triton.CHUNK < 1030  # the default chunking splits this sequence
    assert_close(out.cpu(), ref_out, "out")
    assert_close(last.cpu(), ref_last, "last_state")
    for name in inputs:
        assert_close(grads[name].cpu(), ref_grads[name], f"grad {name}", rtol=2e-4, atol=2e-4)


@runs_here
def test_triton_half_precision_in_and_out(scan_triton):
    inputs = make_inputs(1, 4, 9, 2, groups=2, extras=True, dtype=torch.float16)
    leaves = {k: v.to(DEVICE).requires_grad_() for k, v in inputs.items()}
    out = triton_scan(**leaves, delta_softplus=True)
    assert out.dtype == torch.float16
    assert_close(out.cpu(), oracle(**inputs, delta_softplus=True)[0], "out", rtol=1e-2, atol=1e-2)
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


@runs_here
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_self_check_passes_so_auto_keeps_triton(dtype, scan_triton, monkeypatch, caplog):
    """The self-check on the real kernels (here in the interpreter, on a GPU compiled): Triton is kept."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "_triton_health", {})
    monkeypatch.setattr(dispatch, "_triton_preferred", lambda device: True)  # as auto on a GPU
    inputs = make_inputs(1, 4, 7, 2, groups=2, extras=True, dtype=dtype)
    with caplog.at_level(logging.INFO, logger="rsfusion.kernels"):
        assert dispatch._triton_self_check(torch.device(DEVICE), dtype) is None
        out = selective_scan(**_on_device(inputs), delta_softplus=True)
    assert dispatch._triton_health == {(str(torch.device(DEVICE)), dtype): None}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("passed their self-check" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(out, triton_scan(**_on_device(inputs), delta_softplus=True), rtol=0, atol=0)


# ---------------------------------------------------------------- the self-check with a broken Triton path
def _scan_inputs(dtype=torch.float32):
    inputs = make_inputs(2, 4, 9, 3, groups=2, extras=True, dtype=dtype)
    return {k: v.to(DEVICE) for k, v in inputs.items()}


def _raising_kernel(*args, **kwargs):
    raise RuntimeError("PTX assembly failed: unsupported GPU architecture sm_999\n(long compiler log)")


def _wrong_output(*args, **kwargs):
    return dispatch._torch_backend(*args, **kwargs) + 0.1


def _wrong_gradient(*args, **kwargs):
    out = dispatch._torch_backend(*args, **kwargs)
    return out + 0.5 * (out - out.detach())  # same values, gradients x 1.5


def _nan_output(*args, **kwargs):
    return dispatch._torch_backend(*args, **kwargs) * float("nan")


@pytest.fixture
def broken_triton(monkeypatch):
    """Install a Triton launcher (counting its calls) that auto would use for these tensors."""
    calls = []

    def install(kernel):
        def launcher(*args, **kwargs):
            calls.append(1)
            return kernel(*args, **kwargs)

        monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
        monkeypatch.setattr(dispatch, "_triton_health", {})
        monkeypatch.setattr(dispatch, "_triton_scan", lambda: launcher)
        monkeypatch.setattr(dispatch, "_triton_preferred", lambda device: True)  # as auto on a GPU
        monkeypatch.setattr(dispatch, "_triton_runs_on", lambda device: True)
        return calls

    return install


def _self_check_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "rsfusion.kernels" and r.levelno == logging.WARNING]


def test_auto_falls_back_to_torch_once_when_the_triton_kernel_raises(broken_triton, caplog, monkeypatch):
    calls = broken_triton(_raising_kernel)
    inputs = _scan_inputs()
    expected = selective_scan(**inputs, delta_softplus=True, backend="torch")
    with caplog.at_level(logging.INFO, logger="rsfusion.kernels"):
        outs = [selective_scan(**inputs, delta_softplus=True) for _ in range(3)]
        assert resolve_backend("auto", torch.device(DEVICE), torch.float32) == "torch"
    assert all(torch.equal(out, expected) for out in outs)
    (warning,) = _self_check_warnings(caplog)
    assert warning == (f"selective_scan: the Triton kernels failed their self-check on {torch.device(DEVICE)} "
                       "(float32): RuntimeError: PTX assembly failed: unsupported GPU architecture sm_999; using the "
                       "torch backend instead (RSFUSION_SCAN_BACKEND=triton forces Triton and shows the error)")
    assert len(calls) == 1  # checked once, then never called again
    with pytest.raises(RuntimeError, match="PTX assembly failed"):
        selective_scan(**inputs, delta_softplus=True, backend="triton")
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")  # forcing Triton through the environment is explicit too
    with pytest.raises(RuntimeError, match="PTX assembly failed"):
        selective_scan(**inputs, delta_softplus=True)


@pytest.mark.parametrize("kernel, reason", [
    (_wrong_output, r"output differs from the torch backend by 0\.1 \(tolerance 0\.002 \+ 0\.0006 x \|value\|\)"),
    (_wrong_gradient, r"gradient of u differs from the torch backend by [0-9.e-]+ \(tolerance 0\.02 \+ 0\.003 x"),
    (_nan_output, r"output is not finite \(88 of 88 values\)"),
])
def test_auto_falls_back_to_torch_when_the_triton_kernel_is_wrong(broken_triton, caplog, kernel, reason):
    calls = broken_triton(kernel)
    inputs = _scan_inputs()
    expected = selective_scan(**inputs, delta_softplus=True, backend="torch")
    with caplog.at_level(logging.WARNING, logger="rsfusion.kernels"):
        first = selective_scan(**inputs, delta_softplus=True)
        second = selective_scan(**inputs, delta_softplus=True)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    (warning,) = _self_check_warnings(caplog)
    assert re.search(r"failed their self-check on \S+ \(float32\): " + reason, warning), warning
    assert len(calls) == 1
    # explicit triton is not second-guessed: the kernel runs and the user gets its own numbers
    explicit = selective_scan(**inputs, delta_softplus=True, backend="triton")
    assert len(calls) == 2 and (kernel is _wrong_gradient or not torch.equal(explicit, expected))


def test_self_check_is_cached_per_device_and_dtype(broken_triton, caplog):
    calls = broken_triton(_wrong_output)
    with caplog.at_level(logging.WARNING, logger="rsfusion.kernels"):
        for dtype in (torch.float32, torch.float64, torch.float32, torch.float64):
            out = selective_scan(**_scan_inputs(dtype), delta_softplus=True)
            assert out.dtype == dtype
    assert len(calls) == 2 and len(_self_check_warnings(caplog)) == 2
    assert set(dispatch._triton_health) == {(str(torch.device(DEVICE)), torch.float32),
                                            (str(torch.device(DEVICE)), torch.float64)}


def test_self_check_runs_under_inference_mode(broken_triton):
    """The first scan of a run may be in validation or prediction (inference mode): the check still works."""
    calls = broken_triton(_wrong_gradient)
    inputs = {k: v.detach() for k, v in _scan_inputs().items()}
    with torch.inference_mode():
        out = selective_scan(**inputs, delta_softplus=True)
    assert len(calls) == 1 and dispatch._triton_health[(str(torch.device(DEVICE)), torch.float32)].startswith(
        "gradient of u differs")
    torch.testing.assert_close(out, selective_scan(**inputs, delta_softplus=True, backend="torch"), rtol=0, atol=0)
