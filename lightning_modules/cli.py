"""Command line: ``python -m lightning_modules {fit,validate,test,predict} --config recipes/...yaml``.

``LightningCLI`` in subclass mode: the recipe names the task (``model.class_path``) and the data module
(``data.class_path``); ``--print_config`` shows every knob; several ``--config`` files stack, the last winning.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI


class VideoCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The number of classes and single- vs multi-label targets travel from the data to the model.
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.multilabel", "model.init_args.multilabel", apply_on="instantiate")


def main(args: list[str] | None = None, run: bool = True) -> VideoCLI:
    return VideoCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # each task owns its optimiser and schedule, as typed arguments
        args=args,
        run=run,
    )
