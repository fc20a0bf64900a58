"""The ``lightning`` / ``rsfusion`` command: a LightningCLI over the suite's models and DataModules."""
from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

import datamodules  # noqa: F401  (registers the DataModules for short class names)
import lightning_modules  # noqa: F401  (registers the models)
from datamodules.io import InputError
from datamodules.raster import RasterDataModule
from lightning_modules.base import FusionClassifier
from lightning_modules.maps import ensure_map_writer


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

    def before_predict(self) -> None:
        ensure_map_writer(self.trainer)

    def after_fit(self) -> None:
        config = self.config[self.subcommand]
        if self.trainer.fast_dev_run or self.trainer.interrupted:
            return
        ckpt = "best" if self.trainer.checkpoint_callback and self.trainer.checkpoint_callback.best_model_path else None
        if config.get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)
        if config.get("map_after_fit"):
            ensure_map_writer(self.trainer)
            self.trainer.predict(self.model, datamodule=self.datamodule, ckpt_path=ckpt, return_predictions=False)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning`` and ``rsfusion`` console scripts (``python -m lightning_modules``)."""
    os.environ.setdefault("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR")
    try:
        RSFusionCLI(FusionClassifier, RasterDataModule, subclass_mode_model=True, subclass_mode_data=True,
                           seed_everything_default=0, save_config_kwargs={"overwrite": True},
                           parser_kwargs={"parser_mode": "yaml"}, args=args)
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
