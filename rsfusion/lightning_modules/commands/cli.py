"""The ``lightning`` / ``rsfusion`` command: a LightningCLI over the suite's models and DataModules."""
from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Literal

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from rsfusion.datamodules.checkpoint_inputs import CheckpointInputs, init_options, read_checkpoint_inputs
from rsfusion.datamodules.errors import InputError
from rsfusion.datamodules.io import read_header
from rsfusion.datamodules.raster import RasterDataModule
from rsfusion.lightning_modules.base import FusionClassifier, FusionTask
from rsfusion.lightning_modules.commands import EXTRA_HELP, run_subcommand
from rsfusion.lightning_modules.outputs.callbacks import default_callbacks
from rsfusion.lightning_modules.outputs.inference import ensure_inference_precision
from rsfusion.lightning_modules.outputs.maps import ClassificationMapWriter, ensure_map_writer
from rsfusion.lightning_modules.outputs.reporting import (
    LoggedSaveConfigCallback,
    WandbOptions,
    has_wandb_credentials,
    make_wandb_logger,
)
from rsfusion.lightning_modules.outputs.runs import (
    RUN_CHECKPOINTS,
    RUN_LOGGER,
    RunLogger,
    discard_unused_runs,
    newest_checkpoint,
    resolve_run,
)
from rsfusion.lightning_modules.registry import (
    check_known_arguments,
    checked_hyper_parameters,
    class_path_of,
    read_checkpoint,
    task_class,
)


class RSFusionCLI(LightningCLI):
    """LightningCLI whose DataModule tells the model its band counts, class count and class names.

    ``predict --ckpt_path``: the checkpoint's model class and DataModule options (patch size,
    sampling, normalisation, class names, palette, modality order...) are the defaults of the data
    options, so ``--data '{modalities: {...}}'`` alone maps a new, unlabelled scene; anything given
    on the command line or in a config wins. ``--map.*`` sets what the map carries.
    """

    checkpoint_inputs: CheckpointInputs | None = None

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.in_channels", "model.init_args.in_channels", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")
        parser.link_arguments("data.dense", "model.init_args.dense", apply_on="instantiate")
        parser.link_arguments("data.patch_size", "model.init_args.patch_size", apply_on="instantiate")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="after fit, evaluate the best checkpoint on the test set (OA/AA/kappa)")
        parser.add_argument("--map_after_fit", type=bool, default=True,
                            help="after fit, write the full-scene classification map (GeoTIFF + PNG)")
        parser.add_argument("--inference_precision", type=Literal["32", "bf16"], default="32",
                            help="full-scene prediction (predict, map after fit) in bfloat16 autocast with the "
                                 "scan in float32: faster on CPUs with bf16 units; test metrics stay float32")
        parser.add_argument("--inference_scan", type=Literal["exact", "fast"], default="exact",
                            help="full-scene prediction with the selective scan's forward-only, cache-blocked "
                                 "path (float32, scores within ~1e-5 of exact; DAS2F, M3amba, BDGF)")
        parser.add_class_arguments(WandbOptions, "wandb")
        parser.add_lightning_class_args(ClassificationMapWriter, "map")
        parser.set_defaults({"trainer.logger": RUN_LOGGER, "trainer.callbacks": RUN_CHECKPOINTS})

    def parse_arguments(self, parser, args) -> None:
        """For ``predict --ckpt_path``, parse once more with the checkpoint's options as defaults."""
        if "predict" in getattr(self, "_subcommand_parsers", {}):
            # the map writer has every prediction on disk: keeping them all in memory too would defeat
            # memory-flat prediction of large scenes (Lightning's default is True)
            self._subcommand_parsers["predict"].set_defaults(return_predictions=False)
        inputs = self._predict_checkpoint(parser, args)
        if inputs is not None:
            defaults = {"data": {"class_path": "rsfusion.datamodules.RasterDataModule", "init_args": inputs.data}}
            if inputs.model_class:
                defaults["model"] = {"class_path": inputs.model_class}
            self._subcommand_parsers["predict"].set_defaults(defaults)
            self.checkpoint_inputs = inputs
        super().parse_arguments(parser, args)
        # before Lightning reads the checkpoint's hyper-parameters: `last`/`best` must be a file by then
        subcommand = self.config.get("subcommand")
        resolve_run(self.config[subcommand] if subcommand else self.config, subcommand)
        if inputs is not None:
            given = self.config["predict"]["data"].get("init_args") or {}
            same = {k: k in given and _plain(given[k]) == _plain(v) for k, v in inputs.data.items()}
            taken = {k: v for k, v in inputs.data.items() if same[k]}
            changed = {k: given[k] for k in inputs.data if k in given and not same[k]}
            rank_zero_info(f"Data options from the checkpoint {inputs.path}: "
                           + ", ".join(f"{k}={v!r}" for k, v in taken.items()))
            if changed:
                rank_zero_info("Data options given instead of the checkpoint's: " + ", ".join(
                    f"{k}={v!r} (checkpoint: {inputs.data[k]!r})" for k, v in changed.items()))

    def _predict_checkpoint(self, parser, args) -> CheckpointInputs | None:
        """The checkpoint of a ``predict --ckpt_path`` command, read from a lenient first parse."""
        if "predict" not in getattr(self, "_subcommand_parsers", {}) or isinstance(args, dict) or \
                hasattr(args, "as_dict"):
            return None
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                peek = parser.parse_args(args, _skip_validation=True)  # --help, --print_config: printed once, later
        except (ArgumentError, SystemExit, ValueError, TypeError):
            return None  # the real parse reports it
        if peek.get("subcommand") != "predict":
            return None
        ckpt = peek["predict"].get("ckpt_path")
        if ckpt in ("last", "best"):
            ckpt = newest_checkpoint(peek["predict"]["trainer"].get("default_root_dir") or os.getcwd(), ckpt)
        if not ckpt:
            return None
        check_checkpoint_file(ckpt)
        inputs = read_checkpoint_inputs(ckpt, init_options(RasterDataModule))
        model = peek["predict"].get("model") or {}
        given = model.get("class_path") if hasattr(model, "get") else None
        if inputs.model_class is not None and given != inputs.model_class:  # a class the user typed is trusted
            inputs.model_class = class_path_of(task_class(inputs.model_class, str(ckpt)))
        return inputs

    def _parse_ckpt_path(self) -> None:
        """Lightning's own step (the checkpoint's hyper-parameters become the model's arguments), after the
        checks that keep a checkpoint from importing code or failing deep inside: the file is a readable
        checkpoint, its class is one of rsfusion's tasks (or the very class the config names) and the one
        the config builds, and every hyper-parameter is an argument of that class."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path:
            return
        check_checkpoint_file(ckpt_path)
        checkpoint = read_checkpoint(ckpt_path)
        model = self.config[subcommand].get("model") or {}
        given = model.get("class_path") if hasattr(model, "get") else None
        stored = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
        if given is not None and given == stored:  # the class the user's config names: trusted as typed
            hparams = dict(checkpoint["hyper_parameters"])
            cls_path, cls = hparams.pop("_class_path"), _resolve(given)
            hparams.pop("_instantiator", None)
        else:
            cls, hparams = checked_hyper_parameters(checkpoint, str(ckpt_path))
            cls_path = class_path_of(cls)
            if given is not None and _resolve(given) is not cls:
                raise InputError(f"{ckpt_path}: the checkpoint holds a {cls.__name__} model, the config builds "
                                 f"{given.rsplit('.', 1)[-1]}; use the run's own config.yaml, or leave --config out")
        if cls is not None:
            check_known_arguments(cls, hparams, str(ckpt_path))
        if not hparams:
            return
        model = {"class_path": cls_path, "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)

    def before_instantiate_classes(self) -> None:
        """The data split seed follows ``seed_everything`` unless ``data.init_args.seed`` is set. Plain DDP
        fails on a model with parameters that get no gradient: switch it to the variant that finds them
        (``ddp_find_unused_parameters_true``)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        follow_run_seed(config)
        if self.checkpoint_inputs is not None and self.subcommand == "predict":
            self._checkpoint_modality_order(config["data"].get("init_args") or {})
        model_class = _import_class(config["model"]["class_path"])
        if config["trainer"].get("strategy") == "ddp" and getattr(model_class, "has_unused_parameters", False):
            config["trainer"]["strategy"] = "ddp_find_unused_parameters_true"
            rank_zero_info(f"{model_class.__name__} has parameters without gradient: using strategy "
                           "ddp_find_unused_parameters_true instead of ddp")

    def _checkpoint_modality_order(self, data) -> None:
        """The model takes the modalities in the checkpoint's order: given by name, they are put in it."""
        given, order = data.get("modalities"), list(self.checkpoint_inputs.in_channels)
        if not given:
            return
        if set(given) == set(order) and list(given) != order:
            given = data["modalities"] = {name: given[name] for name in order}
            rank_zero_info(f"Modalities put in the checkpoint's order: {', '.join(order)}")
        self.checkpoint_inputs.checked(given, {name: read_header(path).bands for name, path in given.items()})

    def instantiate_trainer(self, **kwargs):
        """The configured Trainer plus the optional W&B logger, a learning-rate monitor and the test report."""
        trainer = super().instantiate_trainer(**kwargs)
        options = self._get(self.config_init, "wandb")
        if options is not None and options.enabled and not trainer.fast_dev_run:
            if any(isinstance(lg, WandbLogger) for lg in trainer.loggers):
                rank_zero_warn("--wandb.enabled: the config already has a WandbLogger; not adding a second one")
            else:
                # Inside the first logger's run directory, so W&B files sit beside config.yaml and the maps.
                save_dir = trainer.log_dir or trainer.default_root_dir
                trainer.loggers = [*trainer.loggers, make_wandb_logger(options, save_dir)]
        if trainer.loggers and not trainer.fast_dev_run and not any(
                isinstance(cb, LearningRateMonitor) for cb in trainer.callbacks):
            trainer.callbacks.append(LearningRateMonitor())
        for callback in default_callbacks(map_writer=False):  # the map writer comes from the --map options
            if not any(isinstance(cb, type(callback)) for cb in trainer.callbacks):
                trainer.callbacks.append(callback)
        if not getattr(self.datamodule, "has_validation", True):
            keep_last_epoch(trainer)
        writers = [cb for cb in trainer.callbacks if isinstance(cb, ClassificationMapWriter)]
        if len(writers) > 1:  # one in the config's trainer.callbacks: it wins over the --map options
            cli_writer = self._get(self.config_init, "map")
            trainer.callbacks.remove(cli_writer)
            rank_zero_warn("trainer.callbacks has a ClassificationMapWriter: the --map options are not used")
        return trainer

    def before_predict(self) -> None:
        if not isinstance(self.model, FusionClassifier):
            raise InputError(f"{type(self.model).__name__} has no classification output to map (BDGFPretrain: give "
                             "its checkpoint to BDGF as model.init_args.ddpm_checkpoint)")
        inputs, dm = self.checkpoint_inputs, self.datamodule
        if inputs is not None and inputs.datamodule_state and isinstance(dm, RasterDataModule):
            dm.load_state_dict(inputs.datamodule_state)  # Lightning restores it only into the same class
        ensure_map_writer(self.trainer)
        config = self.config[self.subcommand]
        ensure_inference_precision(self.trainer, config.get("inference_precision", "32"),
                                   config.get("inference_scan", "exact"))

    def after_fit(self) -> None:
        config = self.config[self.subcommand]
        if self.trainer.fast_dev_run or self.trainer.interrupted:
            return
        ckpt = evaluation_checkpoint(self.trainer)
        if ckpt is None and (self.trainer.checkpoint_callbacks or self.trainer.global_step == 0) \
                and (config.get("test_after_fit") or config.get("map_after_fit")):
            rank_zero_warn(f"the fit saved no checkpoint ({self.trainer.global_step} training steps; max_epochs 0?): "
                           "the after-fit test and map are skipped rather than run on an untrained model")
            return
        if config.get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)
        if config.get("map_after_fit"):
            ensure_map_writer(self.trainer)
            ensure_inference_precision(self.trainer, config.get("inference_precision", "32"),
                                       config.get("inference_scan", "exact"))
            self.trainer.predict(self.model, datamodule=self.datamodule, ckpt_path=ckpt, return_predictions=False)


def follow_run_seed(config) -> None:
    """``data.init_args.seed: null`` (the default) -> the run's ``seed_everything``, so a run with another
    seed also draws other random splits (``rsfusion-compare --seeds``); an explicit data seed is kept."""
    seed, data = config.get("seed_everything"), config.get("data")
    init = data.get("init_args") if data is not None and hasattr(data, "get") else None
    if isinstance(seed, int) and not isinstance(seed, bool) and init is not None and "seed" in init \
            and init["seed"] is None:
        init["seed"] = seed


def keep_last_epoch(trainer) -> None:
    """Without a validation set no ``val/*`` metric exists: a ``ModelCheckpoint(monitor="val/OA")`` would
    warn and save nothing (Lightning 2.6), an ``EarlyStopping`` on it would never stop. Drop them; the
    run keeps its last epoch (a ``last`` checkpoint is added in the same folder if none is left)."""
    trainer.limit_val_batches = 0  # no validation loop at all (not an empty one, which Lightning warns about)
    dropped = [cb for cb in trainer.callbacks if str(getattr(cb, "monitor", None) or "").startswith("val/")]
    if not dropped:
        return
    for callback in dropped:
        trainer.callbacks.remove(callback)
    if not trainer.checkpoint_callbacks and any(isinstance(cb, ModelCheckpoint) for cb in dropped):
        dirpath = next(cb.dirpath for cb in dropped if isinstance(cb, ModelCheckpoint))  # None: the run folder
        trainer.callbacks.append(ModelCheckpoint(dirpath=dirpath, filename="last", enable_version_counter=False))
    names = ", ".join(f"{type(cb).__name__}(monitor={cb.monitor!r})" for cb in dropped)
    rank_zero_info(f"No validation set (val_fraction 0, no val_labels): {names} removed; the run keeps its last epoch")


def evaluation_checkpoint(trainer) -> str | None:
    """The checkpoint the after-fit test and map use: the best one when the first checkpoint callback
    selected one on its metric, else the most recent checkpoint (the last epoch), else None (the
    in-memory weights). A path, not ``"best"``: Lightning warns about ``"best"`` with several callbacks."""
    first = trainer.checkpoint_callback
    if first is not None and first.monitor is not None and first.best_model_path:
        rank_zero_info(f"Evaluating the best checkpoint ({first.monitor}): {first.best_model_path}")
        return first.best_model_path
    for callback in trainer.checkpoint_callbacks:
        path = callback.last_model_path or (callback.best_model_path if callback.monitor is None else "")
        if path:
            rank_zero_info(f"Evaluating the last checkpoint: {path}")
            return path
    return None


def _plain(value):
    """Tuples as lists, so that options parsed from YAML compare with those saved in a checkpoint."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _import_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _resolve(path: str) -> type | None:
    """The class a config names (short names are rsfusion's tasks), or None if it does not import."""
    try:
        return task_class(path, "the config")
    except InputError:
        try:
            return _import_class(path)
        except (ImportError, AttributeError, ValueError):
            return None


def check_checkpoint_file(path) -> None:
    if not Path(path).exists():
        raise InputError(f"{path}: checkpoint not found")
    if not Path(path).is_file():
        raise InputError(f"{path}: is a folder, not a checkpoint file")


class _DropCloudTips(logging.Filter):
    """Lightning 2.6 logs an advert for its cloud loggers/registry at every Trainer: not ours to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip: For seamless cloud")


def quiet_known_noise() -> None:
    """Silence the two messages every run printed that a user can do nothing about (narrowly, by text)."""
    # Lightning 2.6's own utilities/_pytree.py builds a torch LeafSpec (deprecated by torch): Lightning's
    # code, not ours; the filter matches that one message only.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropCloudTips) for f in log.filters):
            log.addFilter(_DropCloudTips())
    show_rsfusion_log()


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (it may be replaced after setup)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


def show_rsfusion_log() -> None:
    """rsfusion's own log (downloads, map files, W&B) on stderr at INFO, as Lightning shows its own."""
    log = logging.getLogger("rsfusion")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def cli_kwargs() -> dict:
    """How the console scripts build the CLI (shared with ``rsfusion-compare`` and the sweep tests)."""
    quiet_known_noise()
    os.environ.setdefault("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR")
    if not os.environ.get("WANDB_MODE") and not has_wandb_credentials():
        # No credentials: any W&B logger (--wandb.enabled or one in a config) runs offline, never prompts.
        os.environ["WANDB_MODE"] = "offline"
    return dict(model_class=FusionTask, datamodule_class=RasterDataModule, subclass_mode_model=True,
                subclass_mode_data=True, seed_everything_default=0, save_config_callback=LoggedSaveConfigCallback,
                save_config_kwargs={"overwrite": True}, parser_kwargs={"parser_mode": "yaml"})


def main(args: list[str] | None = None) -> None:
    """``rsfusion`` with Lightning imported: a subcommand of ``COMMANDS``, or LightningCLI (the console
    scripts start at :func:`rsfusion.lightning_modules.commands.entry.main`, which imports this module only
    for the commands that need it)."""
    if run_subcommand(sys.argv[1:] if args is None else list(args)):
        return
    kwargs = cli_kwargs()
    kwargs["parser_kwargs"] = {**kwargs["parser_kwargs"], "epilog": EXTRA_HELP,
                               "description": "rsfusion: train, test and map multimodal remote-sensing classifiers"}
    RunLogger.claimed.clear()
    InputError.latest = None
    try:
        RSFusionCLI(**kwargs, args=args)
    except Exception as err:
        discard_unused_runs()  # a run that failed before training leaves no empty version_N
        # Bad input: one line naming the file and the problem, not a traceback. jsonargparse re-wraps
        # errors raised while it instantiates the DataModule, so look for ours inside its message.
        bad_input = InputError.within(err)
        if bad_input is None:
            raise
        print(f"error: {bad_input}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
