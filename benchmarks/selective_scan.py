"""Selective-scan speed: every available backend vs mamba-ssm's ``selective_scan_ref`` algorithm.

For each shape the models use and each backend (plus the baseline: mamba-ssm's ``selective_scan_ref``
algorithm run through autograd, :func:`mamba_ssm_ref_algorithm`: einsum-materialised deltaA / deltaB_u and
a Python loop over L; tests/test_selective_scan.py checks it against rsfusion.kernels.selective_scan_ref,
the suite's one reference), prints forward and forward+backward wall time, peak
extra memory, and speed-ups against the reference. Inputs follow VMamba's SS2D call: 4 groups for
B/C, D, delta_bias and softplus, no z, float32, the mamba test distribution.

Every (shape, backend) runs in a fresh subprocess, so CPU peak memory is the rise of the process's
maximum resident set over its resident set just before the first call. On CUDA it is
``torch.cuda.max_memory_allocated`` above the inputs, and the Triton/CUDA ratio is printed (goal:
Triton within 1.5x of mamba-ssm's kernel).

    python benchmarks/selective_scan.py                 # all shapes, available backends
    python benchmarks/selective_scan.py --repeats 3 --ref-long   # also the slow L=1024 reference backward
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# (batch, dim, L, N): SS2D at 11x11 patches with d_state 16; d_state 1 (VMamba v2) at ssm_ratio 2;
# a long sequence (32x32 map); M3amba's grouped 4-direction scan of a 32x32 map (little work per step).
SHAPES = [(16, 384, 121, 16), (64, 768, 121, 1), (8, 192, 1024, 16), (16, 128, 1024, 4)]
GROUPS = 4
REFERENCE = "ref"


def mamba_ssm_ref_algorithm(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """mamba-ssm's ``selective_scan_ref`` for real A and grouped B/C (no z): the timing baseline.

    Its autograd backward is quadratic in L (each step reads a slice of the materialised tensors).
    """
    import torch
    import torch.nn.functional as F

    dtype_in = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta, threshold=20.0)
    batch, dim, length = u.shape
    B = B.float().repeat_interleave(dim // B.shape[1], dim=1)  # (batch, dim, N, L)
    C = C.float().repeat_interleave(dim // C.shape[1], dim=1)
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A.float()))
    deltaB_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)
    x = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for i in range(length):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        ys.append(torch.einsum("bdn,bdn->bd", x, C[:, :, :, i]))
    out = torch.stack(ys, dim=2)
    if D is not None:
        out = out + u * D.float()[..., None]
    return out.to(dtype_in)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _make_inputs(shape, device):
    import torch

    batch, dim, length, nstate = shape
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "u": torch.randn(batch, dim, length, generator=gen),
        "delta": 0.5 * torch.rand(batch, dim, length, generator=gen),
        "A": -0.5 * torch.rand(dim, nstate, generator=gen),
        "B": torch.randn(batch, GROUPS, nstate, length, generator=gen),
        "C": torch.randn(batch, GROUPS, nstate, length, generator=gen),
        "D": torch.randn(dim, generator=gen),
        "delta_bias": 0.5 * torch.rand(dim, generator=gen),
    }
    return {k: v.to(device).requires_grad_() for k, v in inputs.items()}


def _worker(shape, backend, repeats, with_backward, threads):
    """Runs in a subprocess; returns a dict of timings (s) and peak memory (bytes)."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    from rsfusion.kernels import selective_scan

    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = _make_inputs(shape, device)
    if backend == REFERENCE:
        def scan():
            return mamba_ssm_ref_algorithm(**inputs, delta_softplus=True)
    else:
        def scan():
            return selective_scan(**inputs, delta_softplus=True, backend=backend)
    grad = torch.randn(shape[:3], device=device)

    def forward_backward():
        torch.autograd.grad(scan(), list(inputs.values()), grad)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(fn, count):
        times = []
        for _ in range(count):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return times

    result = {}
    if device == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes()
    jobs = [("fwd", scan)] + ([("fwd_bwd", forward_backward)] if with_backward else [])
    for name, fn in jobs:
        first = timed(fn, 1)  # also the warm-up (Triton compiles here)
        if device == "cuda":
            result[f"{name}_mem"] = torch.cuda.max_memory_allocated() - base
        else:
            result[f"{name}_mem"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        times = timed(fn, repeats - 1) if repeats > 1 else first
        result[name] = min(times)
        result[f"{name}_median"] = statistics.median(times)
    result["device"] = device
    return result


def _run_worker(shape, backend, repeats, with_backward, threads):
    args = [sys.executable, __file__, "--worker", json.dumps([shape, backend, repeats, with_backward, threads])]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt_time(seconds):
    return "-" if seconds is None else (f"{seconds * 1e3:8.1f} ms" if seconds < 10 else f"{seconds:8.1f} s ")


def _fmt_mem(nbytes):
    return "-" if nbytes is None else f"{max(nbytes, 0) / 2 ** 20:7.0f} MB"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (min is reported)")
    parser.add_argument("--ref-repeats", type=int, default=2, help="timed runs for the slow reference")
    parser.add_argument("--ref-long", action="store_true",
                        help="also time the reference backward at L >= 1024 (quadratic in L: minutes on a CPU)")
    parser.add_argument("--backends", default=None, help="comma-separated subset, e.g. torch,triton")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, str(REPO))
        shape, backend, repeats, with_backward, threads = json.loads(args.worker)
        print(json.dumps(_worker(tuple(shape), backend, repeats, with_backward, threads)))
        return

    sys.path.insert(0, str(REPO))
    import torch

    from rsfusion.kernels import available_backends

    backends = available_backends() if args.backends is None else args.backends.split(",")
    threads = args.threads or torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, load average {os.getloadavg()[0]:.1f}, device "
          f"{'cuda: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}; "
          f"backends {backends}; B/C groups {GROUPS}, D + delta_bias + softplus, float32; "
          f"min of {args.repeats} runs ({args.ref_repeats} for the reference)")
    header = (f"| {'shape (batch, dim, L, N)':26} | {'backend':9} | {'fwd':>11} | {'fwd+bwd':>11} | "
              f"{'peak mem fwd':>12} | {'peak mem fwd+bwd':>16} | {'fwd speed-up':>12} | {'fwd+bwd speed-up':>16} |")
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for shape in SHAPES:
        rows = {}
        ref_backward = args.ref_long or shape[2] < 1024
        rows[REFERENCE] = _run_worker(shape, REFERENCE, args.ref_repeats, ref_backward, args.threads)
        for backend in backends:
            rows[backend] = _run_worker(shape, backend, args.repeats, True, args.threads)
        ref = rows[REFERENCE]
        for name, row in rows.items():
            label = "mamba ref" if name == REFERENCE else name
            if "error" in row:
                print(f"| {str(shape):26} | {label:9} | error: {row['error']}")
                continue

            def speedup(key):
                if name == REFERENCE or key not in ref or key not in row:
                    return "-"
                return f"{ref[key] / row[key]:.1f}x"

            print(f"| {str(shape):26} | {label:9} | {_fmt_time(row.get('fwd')):>11} | "
                  f"{_fmt_time(row.get('fwd_bwd')):>11} | {_fmt_mem(row.get('fwd_mem')):>12} | "
                  f"{_fmt_mem(row.get('fwd_bwd_mem')):>16} | "
                  f"{speedup('fwd'):>12} | {speedup('fwd_bwd'):>16} |")
        if "cuda" in rows and "triton" in rows and "error" not in rows["cuda"] and "error" not in rows["triton"]:
            print(f"  triton / mamba-ssm cuda: fwd {rows['triton']['fwd'] / rows['cuda']['fwd']:.2f}x, "
                  f"fwd+bwd {rows['triton']['fwd_bwd'] / rows['cuda']['fwd_bwd']:.2f}x (goal <= 1.5x)")


if __name__ == "__main__":
    main()
