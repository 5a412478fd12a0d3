"""Command line: ``python -m lightning_modules {fit,validate,test,predict} --config recipes/...yaml``.

``LightningCLI`` in subclass mode: the recipe names the task (``model.class_path``) and the data module
(``data.class_path``); ``--print_config`` shows every knob; several ``--config`` files stack, the last winning.

Each run gets one directory, ``<trainer.default_root_dir>/<run id>/`` (see ``lightning_modules.runs``): the
CLI points the loggers, the checkpoints, Lightning's HPC checkpoints and the saved config there, and ``fit``
resumes from the run's newest checkpoint when the run id already exists (``--resume auto``, the default).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_modules.callbacks import ProgressReport, RunModelSummary
from lightning_modules.runs import (
    RUN_ID_ENV,
    SIGTERM_EXIT,
    AtomicCheckpointIO,
    LastCheckpoint,
    RunCSVLogger,
    RunDirectory,
    RunLock,
    RunState,
    resolve_run_id,
)
from lightning_modules.weights import missing_weights_message


def class_of(class_path: str) -> type:
    """The class a config's ``class_path`` names."""
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def as_list(value: Any) -> list:
    """A trainer config's ``logger`` / ``callbacks`` value as a list (None and booleans: empty)."""
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, list) else [value]


class RunConfigCallback(SaveConfigCallback):
    """Saves the whole recipe as run (model, data, trainer) to the run directory and into the W&B run config."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                lg.experiment.config.update(self.config.as_dict(), allow_val_change=True)


class VideoCLI(LightningCLI):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.lock: RunLock | None = None
        try:
            super().__init__(*args, **kwargs)  # runs the subcommand
        finally:
            if self.lock is not None:
                self.lock.release()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The number of classes and single- vs multi-label targets travel from the data to the model.
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.multilabel", "model.init_args.multilabel", apply_on="instantiate")
        parser.add_argument(
            "--run_id", type=Optional[str], default=None,
            help="Run directory name under trainer.default_root_dir; default: the SLURM job id, else a new time "
            "stamp. Re-running fit with an existing run id resumes it.",
        )  # fmt: skip
        parser.add_argument(
            "--resume", type=Literal["auto", "never"], default="auto",
            help="fit with an existing run id: 'auto' continues from its newest checkpoint (last.ckpt or an HPC "
            "checkpoint); 'never' refuses to reuse the directory.",
        )  # fmt: skip

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self._raw_args = (
            list(sys.argv[1:] if args is None else args) if not isinstance(args, dict | Namespace) else []
        )
        if any(arg in ("-h", "--help") for arg in self._raw_args):
            from lightning_modules import catalogue

            catalogue.import_all()  # the help lists them as the known subclasses of model and data
        with warnings.catch_warnings():
            # Lightning warns whenever args are given while sys.argv has any: here they are the command line
            # itself (python -m lightning_modules passes its argv on) or a program's deliberate call.
            warnings.filterwarnings("ignore", "LightningCLI's args parameter is intended", UserWarning)
            super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Lightning replaces the model's arguments with the checkpoint's hyperparameters (so the architecture
        matches the weights); model arguments given on the command line then still win, as a user expects of
        e.g. ``validate --ckpt_path ... --model.init_args.early_exit=true``."""
        subcommand = self.config.get("subcommand")
        before = self.config[subcommand].model.clone() if subcommand else None
        super()._parse_ckpt_path()
        overrides = _model_overrides(self._raw_args)
        # Only when the checkpoint changed the model's arguments: otherwise the first parse already honoured the
        # command line (re-parsing would apply a list append twice and reorder it against later --config files).
        if overrides and subcommand and self.config[subcommand].model != before:
            self.config = self.parser.parse_args([subcommand, *overrides], namespace=self.config)

    def instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        self._check_pretrained(cfg)
        super().instantiate_classes()

    def _check_pretrained(self, cfg: Namespace) -> None:
        """A missing pretrained file stops the command in one line naming it and where to get it (it surfaced as a
        double traceback ending in "Does not validate against any of the Union subtypes"). With a checkpoint to
        load (``--ckpt_path``, or a resumed run) the weights come from it and the file is not read."""
        model = cfg.get("model")
        init = model.get("init_args") if isinstance(model, Namespace) else None
        path = init.get("pretrained") if isinstance(init, Namespace) else None
        if not path:
            return
        if cfg.get("ckpt_path"):
            init.pretrained = None  # the checkpoint holds every weight the task has
            return
        if not Path(str(path)).exists():
            configs = cfg.get("config") or []
            raise SystemExit(missing_weights_message(str(path), str(configs[0]) if configs else None))

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand
        root = cfg.trainer.default_root_dir
        if root is None:
            configs = cfg.get("config") or []
            root = f"runs/{Path(str(configs[-1])).stem}" if configs else "runs/default"
        launching = RUN_ID_ENV not in os.environ  # not a DDP rank this process's launcher started
        self.run = RunDirectory(Path(root), resolve_run_id(cfg.run_id))
        if self.subcommand is not None:
            self.run.check_writable()
        cfg.run_id = self.run.run_id
        os.environ[RUN_ID_ENV] = self.run.run_id  # DDP ranks started by this process inherit it
        cfg.trainer.default_root_dir = str(self.run.path)
        self._place_loggers(cfg)
        self._place_checkpoints(cfg)
        if self.subcommand is None:
            return
        self.trainer_defaults["callbacks"] = default_callbacks(cfg.trainer, fit=self.subcommand == "fit")
        if self.subcommand != "fit":
            # A validate/test/predict run sharing a fit's run id keeps the fit's config.yaml.
            self.save_config_kwargs["config_filename"] = f"config_{self.subcommand}.yaml"
            if cfg.ckpt_path is None:
                rank_zero_warn_line(untrained_message(self.subcommand, cfg))
            return
        if launching and int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
            self.lock = RunLock(self.run.path)
            self.lock.acquire()  # refuses while another fit of this run lives
            for part in self.run.remove_stale_parts():
                rank_zero_info(f"removed {part}, left by a checkpoint write that was killed")
        if cfg.ckpt_path is None:
            previous = self.run.resume_checkpoint()
            if previous is not None and cfg.resume == "never":
                raise FileExistsError(
                    f"run directory {self.run.path} already holds {previous}: pass --resume auto to continue it, "
                    "or a new --run_id"
                )
            if previous is not None:
                cfg.ckpt_path = str(previous)
                rank_zero_info(f"resuming run {self.run.run_id} from {previous}")
        if cfg.trainer.enable_checkpointing is not False:
            self.trainer_defaults["callbacks"] += [LastCheckpoint(self.run.checkpoints), RunState(self.run.checkpoints)]

    def _place_loggers(self, cfg: Namespace) -> None:
        place_loggers(cfg.trainer, self.run)

    def _place_checkpoints(self, cfg: Namespace) -> None:
        place_checkpoints(cfg.trainer, self.run, fit=self.subcommand == "fit")

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO":
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


def without_pretrained(node: Any) -> None:
    """Set every ``pretrained`` weight file of a model config to None, wherever the task keeps it (a model whose
    weights all come from a checkpoint)."""
    if isinstance(node, Namespace):
        for key in list(node.keys()):
            if key == "pretrained" or key.endswith(".pretrained"):
                node[key] = None
            else:
                without_pretrained(node[key])
    elif isinstance(node, list):
        for item in node:
            without_pretrained(item)


def untrained_message(subcommand: str, cfg: Namespace) -> str:
    """What a validate / test / predict without ``--ckpt_path`` runs with, in one line."""
    init = cfg.model.get("init_args") if isinstance(cfg.get("model"), Namespace) else None
    pretrained = init.get("pretrained") if isinstance(init, Namespace) else None
    what = (
        f"only the backbone comes from {pretrained}, the rest of the model is untrained"
        if pretrained
        else "the model has its initial, untrained weights"
    )
    return f"{subcommand} without --ckpt_path: {what}; pass --ckpt_path <the trained checkpoint>"


@rank_zero_only
def rank_zero_warn_line(message: str) -> None:
    """A warning as one line on the console (``warnings.warn`` adds the calling file and source line)."""
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def default_callbacks(trainer: Namespace, fit: bool) -> list[L.Callback]:
    """What a trainer config gets unless it names its own: ``ProgressReport`` (plain lines in a batch log; Lightning
    would draw its tqdm bar into the file) and, in fit, ``RunModelSummary`` (no "Total FLOPs: 0")."""
    named = [class_of(cb.class_path) for cb in as_list(trainer.callbacks)]
    out: list[L.Callback] = []
    if trainer.enable_progress_bar is not False and not any(issubclass(c, ProgressBar) for c in named):
        out.append(ProgressReport())
    if fit and trainer.enable_model_summary is not False and not any(issubclass(c, ModelSummary) for c in named):
        out.append(RunModelSummary())
    return out


def place_loggers(trainer: Namespace, run: RunDirectory, wandb_id: str | None = None) -> None:
    """Point the CSV and W&B loggers of a trainer config at ``run`` (its directory; W&B run id = ``wandb_id``,
    by default the run id)."""
    loggers = as_list(trainer.logger)
    for i, lg in enumerate(loggers):
        cls = class_of(lg.class_path)
        if issubclass(cls, CSVLogger) and not issubclass(cls, RunCSVLogger):
            loggers[i] = lg = Namespace(
                class_path=f"{RunCSVLogger.__module__}.RunCSVLogger", init_args=Namespace()
            )
            cls = RunCSVLogger
        if issubclass(cls, (RunCSVLogger, WandbLogger)):
            lg.init_args.save_dir = str(run.path)
        if issubclass(cls, WandbLogger):
            lg.init_args.id = wandb_id or run.run_id
    if loggers:
        trainer.logger = loggers if isinstance(trainer.logger, list) else loggers[0]


def place_checkpoints(trainer: Namespace, run: RunDirectory, fit: bool) -> None:
    """Point a trainer config's ModelCheckpoints at ``run``'s checkpoint folder; in fit, last.ckpt is
    ``LastCheckpoint``'s alone."""
    for cb in as_list(trainer.callbacks):
        if issubclass(class_of(cb.class_path), ModelCheckpoint):
            if cb.init_args.get("dirpath") is None:
                cb.init_args.dirpath = str(run.checkpoints)
            if fit and cb.init_args.get("save_last"):
                cb.init_args.save_last = False  # LastCheckpoint writes last.ckpt every epoch instead


def _model_overrides(args: list[str]) -> list[str]:
    """The ``--model...`` arguments of a command line, each with its value (``--model.x=1`` or ``--model.x 1``)."""
    out = []
    for i, arg in enumerate(args):
        if arg.startswith(("--model.", "--model=")) or arg == "--model":
            out.append(arg)
            if "=" not in arg and i + 1 < len(args):
                out.append(args[i + 1])
    return out


def main(
    args: list[str] | None = None,
    run: bool = True,
    prog: str | None = None,
    descriptions: dict[str, str] | None = None,
) -> VideoCLI:
    """Run the Lightning CLI on ``args`` (default: the command line). ``prog`` and ``descriptions`` (subcommand ->
    text) shape its help."""
    parser_kwargs: dict[str, Any] = {"prog": prog} if prog else {}
    for name, text in (descriptions or {}).items():
        parser_kwargs[name] = {"description": text}
    launching = RUN_ID_ENV not in os.environ  # the process that starts DDP ranks, not one of them
    try:
        return VideoCLI(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=RunConfigCallback,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,  # each task owns its optimiser and schedule, as typed arguments
            args=args,
            run=run,
            parser_kwargs=parser_kwargs or None,
        )
    except SIGTERMException:
        # Lightning ends a SIGTERM-stopped fit with status 0; the checkpoint is saved, report the interruption.
        raise SystemExit(SIGTERM_EXIT) from None
    finally:
        if launching:
            os.environ.pop(RUN_ID_ENV, None)


def resolved_config(args: list[str]) -> dict[str, Any]:
    """The configuration the CLI would run with for ``args`` (a subcommand, ``--config`` files and overrides),
    as ``--print_config`` prints it: nothing is instantiated. A wrong config raises ``SystemExit`` with the
    parser's message on stderr, as on the command line."""
    import yaml

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main([*args, "--print_config"])
        except SystemExit as done:
            if done.code not in (0, None):
                raise
    return yaml.safe_load(out.getvalue())
