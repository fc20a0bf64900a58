"""``rsfusion export``: a checkpoint as a self-contained program (torch ExportedProgram or ONNX).

The exported module takes the RAW modality patches (or tiles) as float32 tensors, one positional
input per modality in the DataModule's order, (B, C, p r, p r) with r the modality's resolution ratio
(PAN at 4x for DAS2F), plus BDGF's feature-bank patches (B, F, p, p) when the model is guided, and
returns class probabilities: (B, K) for pixel sampling, (B, K, p, p) for tile sampling. The
DataModule's fitted normalisation (clipping, offset/scale, PCA) from the checkpoint is embedded, so
the caller feeds raw values; raw nodata is NOT handled: mask those pixels yourself (training fills
them with a constant after normalisation, and no label or map pixel is ever produced there).

The program runs without rsfusion (plain ``torch.export.load(path).module()(...)`` or onnxruntime):
the graph is traced with the selective scan's torch backend, so no Triton / mamba-ssm call is in it.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rsfusion.datamodules.errors import InputError
from rsfusion.datamodules.feature_bank import FEATURE_KEY
from rsfusion.datamodules.io import read_header
from rsfusion.datamodules.scene import Normalizer, grid_ratios
from rsfusion.kernels import ENV_VAR, scan_torch
from rsfusion.lightning_modules.networks.das2f import PAN_TO_MS
from rsfusion.lightning_modules.registry import check_known_arguments, checked_hyper_parameters, read_checkpoint

ONNX_HINT = 'pip install "rsfusion[export]"'


class RawNormalization(nn.Module):
    """:meth:`rsfusion.datamodules.scene.Normalizer.apply` in torch for (B, C, H, W): clip, offset/scale, PCA."""

    def __init__(self, normalizer: Normalizer):
        super().__init__()
        s = normalizer.stats
        as_buffer = lambda v: torch.as_tensor(np.asarray(v, dtype=np.float32)).view(1, -1, 1, 1)  # noqa: E731
        self.register_buffer("lo", as_buffer(s.lo))
        self.register_buffer("hi", as_buffer(s.hi))
        self.register_buffer("offset", as_buffer(s.offset))
        self.register_buffer("scale", as_buffer(s.scale))
        self.has_pca = normalizer.pca is not None
        if self.has_pca:
            mean, axes, std = normalizer.pca
            self.register_buffer("pca_mean", as_buffer(mean))
            self.register_buffer("pca_weight", torch.from_numpy(np.asarray(axes / std[:, None], dtype=np.float32)))

    @property
    def out_channels(self) -> int:
        return self.pca_weight.shape[0] if self.has_pca else self.offset.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.minimum(torch.maximum(x.float(), self.lo), self.hi)
        x = (x - self.offset) / self.scale
        if self.has_pca:
            x = torch.einsum("kc,bchw->bkhw", self.pca_weight, x - self.pca_mean)
        return x


class ProbabilityModel(nn.Module):
    """Raw modality tensors (positional, in ``inputs`` order) -> normalised batch -> class probabilities."""

    def __init__(self, classifier: nn.Module, normalizers: dict[str, Normalizer], extra_inputs: list[str]):
        super().__init__()
        self.classifier = classifier.eval()
        self.modalities = list(normalizers)
        self.extra_inputs = list(extra_inputs)
        self.normalize = nn.ModuleDict({name: RawNormalization(n) for name, n in normalizers.items()})

    @property
    def inputs(self) -> list[str]:
        return self.modalities + self.extra_inputs

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        batch = {name: self.normalize[name](x) for name, x in zip(self.modalities, tensors)}
        for name, x in zip(self.extra_inputs, tensors[len(self.modalities):]):
            batch[name] = x.float()
        # forward = the scores prediction uses (BDGF: log of the mean branch probabilities, which
        # softmax turns back into those probabilities)
        return self.classifier(batch).softmax(1)


# ------------------------------------------------------------------------------ from a checkpoint
def _datamodule_state(checkpoint: dict) -> dict:
    for value in checkpoint.values():
        if isinstance(value, dict) and "normalizers" in value:
            return value
    return {}


def load_checkpoint(path: str | Path):
    """(classifier in eval mode, checkpoint dict) of a ``lightning fit`` checkpoint, or a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    checkpoint = read_checkpoint(path)
    model_class, hparams = checked_hyper_parameters(checkpoint, str(path))  # a name lookup: nothing imported
    check_known_arguments(model_class, hparams, str(path))
    InputError.latest = None
    try:
        model = model_class.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except Exception as err:
        bad_input = InputError.within(err)  # e.g. a missing CLIP source, re-wrapped by jsonargparse
        if bad_input is None:
            raise
        raise bad_input from None
    return model.eval(), checkpoint


def input_ratios(model, checkpoint: dict, given: dict[str, int] | None = None) -> dict[str, int]:
    """Each modality's resolution ratio to the reference grid: ``given``, else the checkpoint's
    DataModule rasters (when they are still on disk), else DAS2F's PAN at 4x, else 1."""
    ratios = {name: 1 for name in model.in_channels}
    state = _datamodule_state(checkpoint)
    paths = (checkpoint.get("datamodule_hyper_parameters") or {}).get("modalities") or {}
    found = None
    if "ratios" in state:
        found = {k: int(v) for k, v in state["ratios"].items()}
    elif paths:
        try:
            found = grid_ratios({n: read_header(p) for n, p in paths.items()})
        except InputError:  # the training rasters are not on this machine
            found = None
    if found is not None:
        ratios.update({k: v for k, v in found.items() if k in ratios})
    elif type(model).__name__ == "DAS2F":
        ratios[model.pan_key] = PAN_TO_MS
    for name, ratio in (given or {}).items():
        if name not in ratios:
            raise InputError(f"--ratio {name}={ratio}: no modality {name!r} (the model has {list(ratios)})")
        ratios[name] = int(ratio)
    return ratios


def build_program_module(model, checkpoint: dict) -> ProbabilityModel:
    """The model wrapped with its checkpoint's normalisation (and BDGF's feature-bank input)."""
    state = _datamodule_state(checkpoint).get("normalizers")
    if not state:
        raise InputError("the checkpoint has no normalisation statistics (was it saved by lightning fit with a "
                         "RasterDataModule?)")
    normalizers = {name: Normalizer.from_state({k: np.asarray(v) for k, v in state[name].items()})
                   for name in model.in_channels if name in state}
    missing = [name for name in model.in_channels if name not in normalizers]
    if missing:
        raise InputError(f"the checkpoint has no normalisation statistics for modalities {missing}")
    extra = [FEATURE_KEY] if getattr(model, "guide_slices", None) else []
    return ProbabilityModel(model, normalizers, extra)


def example_inputs(model, program: ProbabilityModel, ratios: dict[str, int], batch: int = 2,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
    """Raw-scale random inputs of the exported program's shapes (offset + scale x N(0, 1))."""
    p = model.patch_size
    out = []
    for name in program.modalities:
        norm = program.normalize[name]
        side = p * ratios[name]
        raw = torch.randn(batch, norm.offset.shape[1], side, side, generator=generator)
        out.append(norm.offset + norm.scale * raw)
    for _ in program.extra_inputs:
        out.append(torch.randn(batch, model.bank_channels, p, p, generator=generator))
    return tuple(out)


MAX_BATCH = 1 << 16  # the exported programs' batch dimension is dynamic up to this


def _time_major_one_copy(x: torch.Tensor) -> torch.Tensor:
    """``rsfusion.kernels.layout.time_major`` (batch, ..., L) -> contiguous (L, batch, ...), as one copy."""
    return x.reshape(-1, x.shape[-1]).t().contiguous().view(x.shape[-1], *x.shape[:-1])


@contextlib.contextmanager
def traceable_scan():
    """Trace the selective scan's pure-torch path (never Triton / mamba-ssm), with its time-major
    transposes as one copy: their cache blocking is a Python loop over batch x channel rows, which
    would fix the batch size in the graph."""
    before = os.environ.get(ENV_VAR), scan_torch.time_major
    os.environ[ENV_VAR] = "torch"
    scan_torch.time_major = _time_major_one_copy
    try:
        yield
    finally:
        scan_torch.time_major = before[1]
        if before[0] is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = before[0]


def _dynamic_batch(inputs) -> tuple:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return (tuple({0: batch} for _ in inputs),)


def export_program(program: ProbabilityModel, inputs: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """``torch.export`` with a dynamic batch dimension (the scan's torch backend traced)."""
    with traceable_scan(), torch.no_grad():
        return torch.export.export(program, inputs, dynamic_shapes=_dynamic_batch(inputs), strict=False)


def to_onnx(program: ProbabilityModel, inputs: tuple[torch.Tensor, ...], output: Path) -> None:
    """ONNX through torch's dynamo exporter; any failure becomes one line saying why. onnxscript's graph
    optimiser is skipped: on the scan's unrolled time loop it takes minutes (onnxruntime optimises the
    graph itself when it loads it)."""
    missing = [m for m in ("onnx", "onnxscript") if not _importable(m)]
    if missing:
        raise InputError(f"ONNX export needs {' and '.join(missing)}: {ONNX_HINT}")

    names = program.inputs
    try:
        with traceable_scan(), torch.no_grad(), warnings.catch_warnings(), \
                contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(program, inputs, dynamo=True, input_names=names,
                                             output_names=["probabilities"], verbose=False, optimize=False,
                                             dynamic_shapes=_dynamic_batch(inputs))
            onnx_program.save(str(output))
    except Exception as err:  # noqa: BLE001  (the exporter raises many kinds; the user needs the reason)
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise InputError(f"{type(program.classifier).__name__} cannot be exported to ONNX ({reason}); "
                         "--format torch works") from None


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def metadata(model, program: ProbabilityModel, ratios: dict[str, int]) -> dict:
    """What a user of the exported file needs to know (written beside it as ``<output>.json``)."""
    p = model.patch_size
    shapes = {name: [None, program.normalize[name].offset.shape[1], p * ratios[name], p * ratios[name]]
              for name in program.modalities}
    for name in program.extra_inputs:
        shapes[name] = [None, model.bank_channels, p, p]
    out_shape = [None, model.num_classes] + ([p, p] if model.sampling == "tile" else [])
    return {"model": type(model).__name__, "inputs": shapes, "input_order": program.inputs,
            "output": {"probabilities": out_shape}, "class_names": list(model.class_names),
            "patch_size": p, "ratios": ratios, "normalisation": "embedded (raw values in; mask raw nodata yourself)"}


def export_checkpoint(ckpt_path: str | Path, fmt: str, output: str | Path,
                      ratios: dict[str, int] | None = None) -> dict:
    """Export ``ckpt_path`` to ``output`` (``fmt`` ``torch`` -> .pt2, ``onnx`` -> .onnx); returns the metadata."""
    output = Path(output)
    if fmt == "onnx":  # fail before the (slow) checkpoint load when the packages are missing
        missing = [m for m in ("onnx", "onnxscript") if not _importable(m)]
        if missing:
            raise InputError(f"ONNX export needs {' and '.join(missing)}: {ONNX_HINT}")
    model, checkpoint = load_checkpoint(ckpt_path)
    program = build_program_module(model, checkpoint)
    ratios = input_ratios(model, checkpoint, ratios)
    inputs = example_inputs(model, program, ratios, generator=torch.Generator().manual_seed(0))
    output.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torch":
        torch.export.save(export_program(program, inputs), str(output))
    else:
        to_onnx(program, inputs, output)
    info = metadata(model, program, ratios)
    output.with_name(output.name + ".json").write_text(json.dumps(info, indent=1))
    return info


def _parse_ratio(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected MODALITY=RATIO (e.g. pan=4), got {text!r}")
    return name, int(value)


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="rsfusion export",
        description="Export a checkpoint as a program that runs without rsfusion: normalisation embedded, "
                    "raw modality patches in, class probabilities out (torch.export .pt2 or ONNX).")
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by lightning/rsfusion fit")
    parser.add_argument("--format", choices=["torch", "onnx"], default="torch",
                        help="torch: torch.export ExportedProgram (.pt2); onnx: ONNX via torch's dynamo exporter")
    parser.add_argument("--output", required=True, help="model.pt2 or model.onnx (metadata beside it as .json)")
    parser.add_argument("--ratio", action="append", type=_parse_ratio, default=[], metavar="MODALITY=R",
                        help="resolution ratio of a finer modality to the reference grid (default: from the "
                             "training rasters if still on disk; DAS2F's PAN 4)")
    opts = parser.parse_args(args)
    try:
        info = export_checkpoint(opts.ckpt_path, opts.format, opts.output, dict(opts.ratio))
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    shapes = ", ".join(f"{name} {tuple('B' if d is None else d for d in s)}" for name, s in info["inputs"].items())
    out = tuple("B" if d is None else d for d in info["output"]["probabilities"])
    print(f"{info['model']} exported to {opts.output} ({opts.format}): inputs {shapes} (raw values) -> "
          f"probabilities {out}")


if __name__ == "__main__":
    main()
