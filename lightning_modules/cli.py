"""The ``lightning`` / ``rsfusion`` command: a LightningCLI over the suite's models and DataModules."""
from __future__ import annotations

import importlib
import os
import sys
from typing import Literal

from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from rsfusion import datamodules  # noqa: F401  (registers the DataModules for short class names)
from rsfusion import lightning_modules  # noqa: F401  (registers the models)
from rsfusion.datamodules.io import InputError
from rsfusion.datamodules.raster import RasterDataModule
from rsfusion.lightning_modules.base import FusionClassifier
from rsfusion.lightning_modules.inference import ensure_inference_precision
from rsfusion.lightning_modules.maps import ensure_map_writer
from rsfusion.lightning_modules.reporting import (LoggedSaveConfigCallback, TestReport, WandbOptions, has_wandb_credentials,
                                         make_wandb_logger)


class RSFusionCLI(LightningCLI):
    """LightningCLI whose DataModule tells the model its band counts, class count and class names."""

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
        parser.add_class_arguments(WandbOptions, "wandb")

    def before_instantiate_classes(self) -> None:
        """Plain DDP fails on a model with parameters that get no gradient: switch it to the variant
        that finds them (``ddp_find_unused_parameters_true``)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        model_class = _import_class(config["model"]["class_path"])
        if config["trainer"].get("strategy") == "ddp" and getattr(model_class, "has_unused_parameters", False):
            config["trainer"]["strategy"] = "ddp_find_unused_parameters_true"
            rank_zero_info(f"{model_class.__name__} has parameters without gradient: using strategy "
                           "ddp_find_unused_parameters_true instead of ddp")

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
        if not any(isinstance(cb, TestReport) for cb in trainer.callbacks):
            trainer.callbacks.append(TestReport())
        return trainer

    def before_predict(self) -> None:
        ensure_map_writer(self.trainer)
        ensure_inference_precision(self.trainer, self.config[self.subcommand].get("inference_precision", "32"))

    def after_fit(self) -> None:
        config = self.config[self.subcommand]
        if self.trainer.fast_dev_run or self.trainer.interrupted:
            return
        ckpt = "best" if self.trainer.checkpoint_callback and self.trainer.checkpoint_callback.best_model_path else None
        if config.get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)
        if config.get("map_after_fit"):
            ensure_map_writer(self.trainer)
            ensure_inference_precision(self.trainer, config.get("inference_precision", "32"))
            self.trainer.predict(self.model, datamodule=self.datamodule, ckpt_path=ckpt, return_predictions=False)


def _import_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def cli_kwargs() -> dict:
    """How the console scripts build the CLI (shared with ``rsfusion-compare`` and the sweep tests)."""
    os.environ.setdefault("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR")
    if not os.environ.get("WANDB_MODE") and not has_wandb_credentials():
        # No credentials: any W&B logger (--wandb.enabled or one in a config) runs offline, never prompts.
        os.environ["WANDB_MODE"] = "offline"
    return dict(model_class=FusionClassifier, datamodule_class=RasterDataModule, subclass_mode_model=True,
                subclass_mode_data=True, seed_everything_default=0, save_config_callback=LoggedSaveConfigCallback,
                save_config_kwargs={"overwrite": True}, parser_kwargs={"parser_mode": "yaml"})


# ``rsfusion <command>`` with their own argparse entry points, dispatched before LightningCLI parses
EXTRA_COMMANDS = {"export": "rsfusion.lightning_modules.export", "evaluate": "rsfusion.lightning_modules.evaluate"}
EXTRA_HELP = ("more commands: 'rsfusion export --help' (a checkpoint as a torch.export/ONNX program that runs "
              "without rsfusion), 'rsfusion evaluate --help' (score any classification map against a label raster)")


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning`` and ``rsfusion`` console scripts (``python -m rsfusion.lightning_modules``)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in EXTRA_COMMANDS:
        importlib.import_module(EXTRA_COMMANDS[argv[0]]).main(argv[1:])
        return
    kwargs = cli_kwargs()
    kwargs["parser_kwargs"] = {**kwargs["parser_kwargs"], "epilog": EXTRA_HELP}
    try:
        RSFusionCLI(**kwargs, args=args)
    except Exception as err:
        # Bad input: one line naming the file and the problem, not a traceback. jsonargparse re-wraps
        # errors raised while it instantiates the DataModule, so look for ours inside its message.
        bad_input = err if isinstance(err, InputError) else InputError.latest
        if bad_input is None or str(bad_input) not in str(err):
            raise
        print(f"error: {bad_input}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
