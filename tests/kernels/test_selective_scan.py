"""rsfusion.kernels.selective_scan (torch backend, dispatch, validation) against the reference, selective_scan_ref."""
import importlib.util
import logging
import math
import sys
import types

import pytest
import torch

from rsfusion import kernels
from rsfusion.kernels import selective_scan, selective_scan_ref
from rsfusion.kernels.dispatch import ENV_VAR, _mamba_selective_scan_fn, check_backend, resolve_backend
from tests.conftest import GRAD_NAMES, ROOT, assert_close, make_inputs, oracle, oracle_with_grads, run_with_grads


def assert_torch_backend_matches_oracle(inputs, grad_out, softplus, rtol=1e-4, atol=1e-4):
    """The torch backend's output, last state and every input gradient equal the float64 oracle's."""
    out, last, grads = run_with_grads(selective_scan, inputs, grad_out, delta_softplus=softplus, backend="torch")
    ref_out, ref_last, ref_grads = oracle_with_grads(inputs, grad_out, softplus)
    assert_close(out, ref_out, "out")
    assert_close(last, ref_last, "last_state")
    assert set(grads) == set(inputs)
    for name in inputs:
        assert grads[name].shape == inputs[name].shape, name
        assert_close(grads[name], ref_grads[name], f"grad {name}", rtol=rtol, atol=atol)
    return out, last, grads


# (batch, dim, L, N, groups (None = 3-D B/C), extras D/z/delta_bias, softplus)
CASES = {
    "plain-N1-L1-batch1": (1, 4, 1, 1, None, False, False),
    "plain-N16-odd-L": (2, 6, 37, 16, None, False, True),
    "grouped-N16-all-extras": (2, 8, 45, 16, 2, True, True),
    "grouped-N1-extras-no-softplus": (3, 6, 19, 1, 3, True, False),
    "long-L-batch1": (1, 4, 1031, 16, 2, True, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_torch_backend_matches_oracle_forward_and_backward(case):
    batch, dim, length, nstate, groups, extras, softplus = CASES[case]
    inputs = make_inputs(batch, dim, length, nstate, groups, extras)
    grad_out = torch.randn(batch, dim, length, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out, last, grads = run_with_grads(selective_scan, inputs, grad_out, delta_softplus=softplus, backend="torch")
    ref_out, ref_last, ref_grads = oracle_with_grads(inputs, grad_out, softplus)
    assert out.shape == (batch, dim, length) and out.dtype == torch.float32
    assert last.shape == (batch, dim, nstate) and last.dtype == torch.float32
    assert_close(out, ref_out, "out")
    assert_close(last, ref_last, "last_state")
    assert set(grads) == (set(GRAD_NAMES) if extras else {"u", "delta", "A", "B", "C"})
    for name in inputs:
        assert grads[name].shape == inputs[name].shape, name
        # A, delta_bias and D sum over batch and L (1031 steps in the long case): relative tolerance.
        assert_close(grads[name], ref_grads[name], f"grad {name}", rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("extras", [(), ("D",), ("delta_bias",), ("D", "delta_bias")])
@pytest.mark.parametrize("softplus", [False, True])
def test_fused_skip_bias_and_softplus_each_match_oracle(extras, softplus):
    """D, delta_bias and softplus run inside the torch core's chunk loop: each alone and together."""
    full = make_inputs(2, 8, 37, 1, groups=4, extras=True, seed=4)
    inputs = {k: v for k, v in full.items() if k in ("u", "delta", "A", "B", "C", *extras)}
    if softplus:  # both sides of its threshold of 20, and negative inputs
        inputs["delta"] = inputs["delta"] * 60 - 10
    grad_out = torch.randn(2, 8, 37, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert_torch_backend_matches_oracle(inputs, grad_out, softplus, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("b_groups,c_groups", [(4, None), (2, 3)])
def test_mixed_b_c_layouts_match_oracle(b_groups, c_groups):
    """B and C with different layouts: 3-D C with a 4-group B; 2-group B with a 3-group C (dim 12)."""
    inputs = make_inputs(2, 12, 23, 4, groups=b_groups, extras=False)
    C = make_inputs(2, 12, 23, 4, groups=c_groups, extras=False, seed=5)["C"]
    inputs["C"] = C
    grad_out = torch.randn(2, 12, 23, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert_torch_backend_matches_oracle(inputs, grad_out, False)


def test_reference_matches_the_recurrence_worked_by_hand():
    """Two steps, one channel, N = 1, every option: the formulas of rsfusion/kernels/reference.py's docstring."""
    u, delta, b, c, z = [1.0, 2.0], [0.3, -0.4], [1.5, -2.0], [0.5, 3.0], [0.7, -1.2]
    a, d, bias = -0.8, 0.25, 0.1
    dts = [math.log1p(math.exp(x + bias)) for x in delta]
    h1 = dts[0] * b[0] * u[0]
    h2 = math.exp(dts[1] * a) * h1 + dts[1] * b[1] * u[1]
    silu = [x / (1 + math.exp(-x)) for x in z]
    expected = [(c[0] * h1 + d * u[0]) * silu[0], (c[1] * h2 + d * u[1]) * silu[1]]

    def t(values):
        return torch.tensor(values, dtype=torch.float64).view(1, 1, -1)

    out, last = selective_scan_ref(t(u), t(delta), torch.tensor([[a]], dtype=torch.float64), t(b), t(c),
                                   D=torch.tensor([d], dtype=torch.float64), z=t(z),
                                   delta_bias=torch.tensor([bias], dtype=torch.float64), delta_softplus=True,
                                   return_last_state=True)
    assert out.dtype == last.dtype == torch.float64
    torch.testing.assert_close(out.view(-1), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last.view(-1), torch.tensor([h2], dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_the_benchmark_baseline_mamba_ssm_algorithm_matches_the_reference():
    """benchmarks/selective_scan.py times mamba-ssm's einsum-materialised algorithm: same values and gradients."""
    spec = importlib.util.spec_from_file_location("_benchmark_selective_scan",
                                                  ROOT / "benchmarks" / "selective_scan.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    inputs = make_inputs(2, 8, 23, 5, groups=4, extras=True)
    inputs.pop("z")  # the benchmark's VMamba-style call has no gate
    grad_out = torch.randn(2, 8, 23, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    out = benchmark.mamba_ssm_ref_algorithm(**leaves, delta_softplus=True)
    (out.double() * grad_out).sum().backward()
    ref_out, _, ref_grads = oracle_with_grads(inputs, grad_out, True)
    assert_close(out, ref_out, "out")
    for name, leaf in leaves.items():
        assert_close(leaf.grad, ref_grads[name], f"grad {name}")


def test_reference_computes_float32_and_half_inputs_in_float32():
    inputs = make_inputs(2, 4, 9, 3, groups=2, extras=True, dtype=torch.bfloat16)
    out, last = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    ref_out, ref_last = oracle(**inputs, delta_softplus=True)
    assert_close(last, ref_last, "last_state", rtol=1e-5, atol=1e-5)  # the same upcast inputs, float32 vs 64
    assert_close(out, ref_out, "out", rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("groups,extras", [(None, False), (2, True)])
def test_torch_backend_gradcheck_float64(groups, extras):
    inputs = make_inputs(2, 4, 7, 3, groups, extras, dtype=torch.float64)
    names = list(inputs)
    leaves = [inputs[k].requires_grad_() for k in names]

    def fn(*tensors):
        return selective_scan(**dict(zip(names, tensors)), delta_softplus=extras, backend="torch")

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computed_in_float32_and_returned_in_input_dtype(dtype):
    inputs = make_inputs(2, 4, 20, 8, groups=2, extras=True, dtype=dtype)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    out, last = selective_scan(**leaves, delta_softplus=True, return_last_state=True, backend="torch")
    assert out.dtype == dtype and last.dtype == torch.float32
    ref_out, ref_last = oracle(**inputs, delta_softplus=True)  # the same half inputs, upcast
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.float16 else {"rtol": 2e-2, "atol": 5e-2}
    assert_close(out, ref_out, "out", **tol)
    assert_close(last, ref_last, "last_state", rtol=1e-4, atol=1e-4)  # the state is never rounded
    out.float().sum().backward()
    for name, leaf in leaves.items():
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype, name


def _graph_size(tensor):
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_fn for next_fn, _ in node.next_functions)
    return len(seen)


def test_torch_backend_graph_does_not_grow_with_length():
    sizes = []
    for length in (3, 300):
        inputs = {k: v.requires_grad_() for k, v in make_inputs(1, 4, length, 2, groups=2).items()}
        sizes.append(_graph_size(selective_scan(**inputs, delta_softplus=True, backend="torch")))
    assert sizes[0] == sizes[1] < 30


def test_torch_backend_stays_float32_under_autocast():
    inputs = make_inputs(2, 8, 20, 4, groups=2, extras=True)
    expected = selective_scan(**inputs, delta_softplus=True, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = selective_scan(**inputs, delta_softplus=True, backend="torch")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("nstate", [3, 6])
@pytest.mark.parametrize("loop_max_n", [0, 64])
def test_torch_backend_state_sum_strategies_match_oracle(monkeypatch, nstate, loop_max_n):
    """Both ways of summing over N (an addcmul loop for small N; a matmul, or a product-sum for the
    per-channel A weight, for large N) give the oracle's values and gradients, over several chunks."""
    monkeypatch.setattr("rsfusion.kernels.scan_torch._LOOP_MAX_N", loop_max_n)
    inputs = make_inputs(2, 8, 37, nstate, groups=2, extras=True)
    grad_out = torch.randn(2, 8, 37, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert_torch_backend_matches_oracle(inputs, grad_out, True)


def test_torch_backend_is_stable_when_decays_underflow():
    """Spec §5.1: delta * A down to -960 (exp underflows to 0 in float32 and float64) mixed with
    near-1 decays stays finite and matches the oracle, values and gradients."""
    inputs = make_inputs(2, 8, 41, 16, groups=2, extras=False, seed=4)
    gen = torch.Generator().manual_seed(6)
    inputs["A"] = -torch.linspace(1.0, 16.0, 16).repeat(8, 1)
    big = 20.0 + 40.0 * torch.rand(2, 8, 41, generator=gen)
    tiny = 1e-4 * torch.rand(2, 8, 41, generator=gen)
    inputs["delta"] = torch.where(torch.rand(2, 8, 41, generator=gen) < 0.3, big, tiny)
    grad_out = torch.randn(2, 8, 41, dtype=torch.float64, generator=gen)
    assert (inputs["delta"][..., None] * inputs["A"][:, None, :]).min() < -900  # really underflows
    out, last, grads = assert_torch_backend_matches_oracle(inputs, grad_out, False, rtol=2e-4, atol=2e-4)
    assert torch.isfinite(out).all() and torch.isfinite(last).all()
    for name in inputs:
        assert torch.isfinite(grads[name]).all(), name


def test_torch_backend_accepts_non_contiguous_inputs():
    """A transposed A (dim, N) and a permuted-memory u give the oracle's values and gradients."""
    inputs = make_inputs(2, 8, 40, 4, groups=2, extras=True)
    inputs["A"] = inputs["A"].t().contiguous().t()
    inputs["u"] = inputs["u"].transpose(0, 1).contiguous().transpose(0, 1)
    assert not inputs["A"].is_contiguous() and not inputs["u"].is_contiguous()
    grad_out = torch.randn(2, 8, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    assert_torch_backend_matches_oracle(inputs, grad_out, True)


def test_last_state_carries_no_gradient_and_out_is_unchanged():
    inputs = make_inputs(1, 4, 9, 2)
    plain = selective_scan(**inputs, backend="torch")
    out, last = selective_scan(**inputs, return_last_state=True, backend="torch")
    assert torch.equal(plain, out)
    assert not last.requires_grad or last.grad_fn is None


def _base(**overrides):
    inputs = make_inputs(2, 4, 5, 3, groups=2, extras=True)
    inputs.update(overrides)
    return inputs


@pytest.mark.parametrize("overrides,match", [
    ({"A": torch.randn(4, 3, dtype=torch.complex64)}, "complex A"),
    ({"u": torch.randn(2, 4)}, "u must be"),
    ({"delta": torch.randn(2, 4, 6)}, "delta must"),
    ({"A": torch.randn(5, 3)}, "A must be"),
    ({"B": torch.randn(2, 3, 6)}, "B must be"),
    ({"C": torch.randn(2, 3, 3, 5)}, "groups, which do not divide"),
    ({"D": torch.randn(3)}, "D must be"),
    ({"delta_bias": torch.randn(4, 1)}, "delta_bias must be"),
    ({"z": torch.randn(2, 4, 4)}, "z must"),
    ({"B": torch.randn(2, 2, 3, 5, device="meta")}, "B is on meta"),
    ({"u": torch.randint(0, 3, (2, 4, 5))}, "floating-point"),
])
def test_bad_inputs_raise_clear_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        selective_scan(**_base(**overrides), backend="torch")


def test_unknown_backend_and_bad_env_var_raise(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        selective_scan(**_base(), backend="cuda_fast")
    monkeypatch.setenv(ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=ENV_VAR):
        selective_scan(**_base())


def test_check_backend_accepts_what_runs_here_and_refuses_the_rest(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "triton")  # the environment variable is resolved per call, never checked here
    assert check_backend("auto") == "auto" and check_backend("torch") == "torch"
    with pytest.raises(ValueError, match=r"^must be one of \('auto', 'cuda', 'triton', 'torch'\), got 'Torch'$"):
        check_backend("Torch")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device and this machine has none"):
            check_backend("cuda")


def test_auto_falls_back_to_torch_on_cpu_and_logs_once(monkeypatch, caplog):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr("rsfusion.kernels.dispatch._logged_backends", set())
    inputs = _base()
    with caplog.at_level(logging.INFO, logger="rsfusion.kernels"):
        assert resolve_backend("auto", torch.device("cpu")) == "torch"
        first = selective_scan(**inputs)
        second = selective_scan(**inputs)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, selective_scan(**inputs, backend="torch"))
    messages = [r.getMessage() for r in caplog.records if r.name == "rsfusion.kernels"]
    assert len(messages) == 1 and "'torch' backend" in messages[0]


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "torch")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        selective_scan(**_base())
    monkeypatch.setenv(ENV_VAR, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="triton"):
        selective_scan(**_base())
    # An explicit argument wins over the environment variable.
    assert resolve_backend("torch", torch.device("cpu")) == "torch"


@pytest.fixture
def fresh_mamba_probe():
    _mamba_selective_scan_fn.cache_clear()
    yield
    _mamba_selective_scan_fn.cache_clear()


def test_missing_or_broken_mamba_ssm_never_raises(monkeypatch, tmp_path, fresh_mamba_probe):
    # 1) Released mamba-ssm without its extension: `import mamba_ssm` raises ModuleNotFoundError.
    monkeypatch.setitem(sys.modules, "selective_scan_cuda", None)  # import -> ModuleNotFoundError
    assert _mamba_selective_scan_fn() is None
    # 2) An extension built against another torch: the import raises OSError ("undefined symbol").
    _mamba_selective_scan_fn.cache_clear()
    monkeypatch.delitem(sys.modules, "selective_scan_cuda")
    (tmp_path / "selective_scan_cuda.py").write_text("raise OSError('selective_scan_cuda.so: undefined symbol')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _mamba_selective_scan_fn() is None
    assert kernels.available_backends("cpu") == ["torch"]
    out = selective_scan(**_base(), backend="auto")
    torch.testing.assert_close(out, selective_scan(**_base(), backend="torch"))
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        selective_scan(**_base(), backend="cuda")


def test_installed_mamba_ssm_is_detected_but_never_gets_cpu_tensors(monkeypatch, fresh_mamba_probe):
    calls = []
    extension = types.ModuleType("selective_scan_cuda")
    interface = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    interface.selective_scan_fn = lambda *args, **kwargs: calls.append(args)
    monkeypatch.setitem(sys.modules, "selective_scan_cuda", extension)
    for name in ("mamba_ssm", "mamba_ssm.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", interface)
    assert _mamba_selective_scan_fn() is interface.selective_scan_fn
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    selective_scan(**_base())
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        selective_scan(**_base(), backend="cuda")
    assert calls == []


def test_cuda_backend_forwards_mamba_arguments(monkeypatch):
    """The call into mamba-ssm's selective_scan_fn (device check bypassed: no GPU in CI)."""
    received = {}

    def fake_selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        received.update(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                        delta_softplus=delta_softplus, return_last_state=return_last_state)
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)

    monkeypatch.setattr("rsfusion.kernels.dispatch._mamba_selective_scan_fn", lambda: fake_selective_scan_fn)
    monkeypatch.setattr("rsfusion.kernels.dispatch.resolve_backend", lambda backend, device, dtype=None: "cuda")
    inputs = make_inputs(2, 4, 6, 3, groups=None, extras=True, dtype=torch.float16)
    inputs["delta"] = inputs["delta"].float()  # mamba's op needs delta in u's dtype: cast for it
    out, last = selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend="cuda")
    assert received["delta"].dtype == torch.float16 and received["B"].dtype == torch.float16
    assert received["D"].dtype == torch.float32 and received["delta_bias"].dtype == torch.float32
    assert received["delta_softplus"] is True and received["return_last_state"] is True
    assert out.dtype == torch.float16 and last.shape == (2, 4, 3)
    ref_out, _ = oracle(**inputs, delta_softplus=True)
    assert_close(out, ref_out, "out", rtol=1e-2, atol=1e-2)
