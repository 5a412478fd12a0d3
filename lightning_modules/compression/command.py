"""``python -m lightning_modules compress``: progressive block drop of a trained task, round by round.

One YAML recipe drives it: the task's own recipe (``model``, ``data``, ``trainer``: what the recovery fits use)
stacked with a block-drop recipe (``compress``: the ``BlockDrop`` settings), e.g.

    python -m lightning_modules compress --config recipes/tad_thumos_videomae_s.yaml \\
        --config recipes/blockdrop_thumos_videomae_s.yaml --compress.checkpoint runs/.../last.ckpt

Each round scores every candidate drop of the current model on the scoring subset (``compress.metric``),
removes the chosen block for good, recovers with a Lightning fit (LoRA + norms + patch embedding + head by
default, with the alignment losses against the teacher), merges the LoRA and evaluates. Everything lands in
``compress.out_dir``::

    rounds.json, report.md, report.png      one record per round (round 0 = the uncompressed model)
    round_K/choice.json                      candidate scores and the chosen block(s)
    round_K/recovery/                        the recovery fit's run directory (last.ckpt every epoch)
    round_K/model.pt                         the merged model after recovery
    relu/                                    the optional ReLU stage (``relu_stage``): recovery, model.pt
    compressed.ckpt, compressed.yaml         the kept model, loadable by ``validate --config <task recipe>
                                             --config compressed.yaml --ckpt_path compressed.ckpt``
    compressed_relu.ckpt, compressed_relu.yaml   the ReLU stage's model, loadable the same way
    wandb/                                   the per-round table and summary, when the recipe logs to W&B

Every file is written atomically, and each step is skipped when its file exists: killed at any point, the same
command resumes at the round, and inside a recovery at the epoch, it reached.
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse import ActionConfigFile, Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_modules.callbacks import ValidationSchedule
from lightning_modules.cli import as_list, place_checkpoints, place_loggers, without_pretrained
from lightning_modules.compression.checks import (
    record_source,
    refuse_several_processes,
    refuse_uncompressible,
)
from lightning_modules.compression.report import (
    finish_wandb,
    kept_round,
    log_to_wandb,
    markdown,
    plot,
    seeds_report,
    write_json,
)
from lightning_modules.compression.scoring import HIGHER_IS_BETTER, score_candidates
from lightning_modules.compression.settings import BlockDrop, resolve_out_dir
from lightning_modules.compression.task import Alignment, Compressible
from lightning_modules.runs import (
    SIGTERM_EXIT,
    AtomicCheckpointIO,
    LastCheckpoint,
    RunDirectory,
    RunState,
    new_run_id,
)
from models.blockdrop import (
    ActivationSparsity,
    block_ids,
    choose_block,
    drop_blocks,
    droppable_blocks,
    prepare_recovery,
    set_mlp_activation,
)
from models.flops import count_macs
from models.lora import merge_lora
from models.torch_files import read_own_checkpoint


def save_atomic(obj: Any, path: Path) -> None:
    AtomicCheckpointIO().save_checkpoint(obj, path)


def build_parser() -> LightningArgumentParser:
    parser = LightningArgumentParser(
        prog="python -m lightning_modules compress", description=__doc__.split("\n")[0], env_prefix="COMPRESS"
    )
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="recipe(s) in YAML; later ones win")
    parser.add_argument("--seed_everything", type=int | bool | None, default=0)
    parser.add_argument(
        "--seeds", type=list[int] | None, default=None, help="run once per seed, then mean / std"
    )
    parser.add_lightning_class_args(L.Trainer, "trainer")
    parser.add_lightning_class_args(L.LightningModule, "model", subclass_mode=True)
    parser.add_lightning_class_args(L.LightningDataModule, "data", subclass_mode=True)
    parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
    parser.link_arguments("data.multilabel", "model.init_args.multilabel", apply_on="instantiate")
    parser.add_class_arguments(BlockDrop, "compress")
    return parser


class Compressor:
    def __init__(self, parser: LightningArgumentParser, cfg: Namespace):
        self.parser = parser
        self.cfg = cfg
        settings = cfg.compress.as_dict()
        settings["alignment"] = Alignment(**(settings.get("alignment") or {}))
        self.settings = BlockDrop(**settings)
        self.out = Path(self.settings.out_dir)
        refuse_uncompressible(cfg.model, self.settings.alignment)
        if not Path(self.settings.checkpoint).is_file():
            raise FileNotFoundError(
                f"compress.checkpoint {self.settings.checkpoint} not found: give the trained task's Lightning "
                "checkpoint (e.g. runs/<recipe>/<run id>/checkpoints/last.ckpt)"
            )
        refuse_several_processes(cfg.trainer)
        record_source(self.out, Path(self.settings.checkpoint))

    # ------------------------------------------------------------------------------------------ building

    @property
    def compression_id(self) -> str:
        """This compression's id (kept in ``compress.json``): with the round, the W&B id of each recovery run."""
        path = self.out / "compress.json"
        if not path.is_file():
            write_json(path, {"id": new_run_id()})
        return json.loads(path.read_text())["id"]

    def fresh(
        self, data: dict[str, Any] | None = None, run: RunDirectory | None = None
    ) -> tuple[Any, Any, dict]:
        """A new task, data module and trainer arguments from the recipe (data overrides applied; loggers and
        checkpoints pointed at ``run``)."""
        cfg = copy.deepcopy(self.cfg)
        for key, value in (data or {}).items():
            cfg.data.init_args[key] = value
        without_pretrained(cfg.model)  # every task built here takes its weights from a checkpoint
        if run is not None:
            place_loggers(cfg.trainer, run, wandb_id=f"{self.compression_id}-{run.root.name}")
            place_checkpoints(cfg.trainer, run, fit=True)
        else:
            cfg.trainer.logger = False
            cfg.trainer.callbacks = []
        init = self.parser.instantiate_classes(cfg)
        return init.model, init.data, dict(init.trainer)

    def data_module(self, data: dict[str, Any] | None = None) -> L.LightningDataModule:
        """A new data module from the recipe (``data`` overrides applied), without building a task: scoring
        evaluates every candidate on its own data module, and a task of the recipe's size costs seconds."""
        cfg = copy.deepcopy(self.cfg)
        for key, value in (data or {}).items():
            cfg.data.init_args[key] = value
        cfg.model = None
        cfg.trainer.logger = False
        cfg.trainer.callbacks = []
        return self.parser.instantiate_classes(cfg).data

    def load(self, task: Compressible, source: Path | None) -> Compressible:
        """Give ``task`` (fresh from the recipe) the weights of ``source`` (a round's model.pt) or, for None, of
        the uncompressed checkpoint; LoRA merged, dropped blocks removed."""
        if source is None:
            state = read_own_checkpoint(self.settings.checkpoint)
            task.load_state_dict(state["state_dict"])  # as trained (LoRA layers included, if any)
            merge_lora(task)
            return task
        saved = read_own_checkpoint(source)
        merge_lora(task)
        if saved["dropped"]:
            drop_blocks(task.block_stack(), saved["dropped"])
        if saved.get("mlp_activation", "gelu") != "gelu":
            set_mlp_activation(task.block_stack(), saved["mlp_activation"])
        task.load_state_dict(saved["state_dict"])
        return task

    def model_file(self, k: int | str) -> Path | None:
        return None if k == 0 else self.out / ("relu" if k == "relu" else f"round_{k}") / "model.pt"

    # ---------------------------------------------------------------------------------------- measuring

    @staticmethod
    def ready(dm: L.LightningDataModule, task: Compressible, batch: dict[str, Any]) -> dict[str, Any]:
        """A loader batch as the task sees it in a Trainer: on its device, normalised by the data module."""
        return dm.on_after_batch_transfer(move_data_to_device(batch, task.device), 0)

    def trainer(self, root: Path, **kwargs: Any) -> L.Trainer:
        t = self.cfg.trainer
        return L.Trainer(
            accelerator=t.accelerator, devices=1, precision=t.precision, logger=False, enable_checkpointing=False,
            default_root_dir=str(root), enable_model_summary=False, **kwargs,
        )  # fmt: skip

    def evaluate(self, task: Compressible, data: dict[str, Any] | None, root: Path) -> float:
        dm = self.data_module(data)
        results = self.trainer(root, enable_progress_bar=False).validate(task, datamodule=dm, verbose=False)
        key = self.settings.score_key
        if key not in results[0]:
            raise KeyError(f"compress.score_key {key!r} was not logged; the task logs {sorted(results[0])}")
        return float(results[0][key])

    def costs(self, task: Compressible) -> dict[str, float]:
        dm = self.data_module()
        dm.setup("validate")
        inputs = task.cost_inputs(self.ready(dm, task, next(iter(dm.val_dataloader()))))
        task.eval()
        out = {"gmacs": count_macs(task, *inputs) / 1e9}
        if self.settings.latency_repeats > 0:
            times = []
            with torch.inference_mode():
                for _ in range(self.settings.latency_repeats + 1):
                    start = time.perf_counter()
                    task(*inputs)
                    times.append(time.perf_counter() - start)
            out["latency_ms"] = 1e3 * min(times[1:])
        return out

    def sparsity(self, task: Compressible) -> float:
        """Share of the MLP hidden activations that are exactly zero, over one window or clip of each of the
        first ``sparsity_batches`` evaluation batches."""
        dm = self.data_module()
        dm.setup("validate")
        task.eval()
        with torch.inference_mode(), ActivationSparsity(task.block_stack()) as counted:
            for batch in _take(dm.val_dataloader(), self.settings.sparsity_batches):
                task(*task.cost_inputs(self.ready(dm, task, batch)))
        return counted.ratio

    # ------------------------------------------------------------------------------------------- rounds

    def choose(self, task: Compressible, k: int) -> dict[str, Any]:
        s = self.settings
        stack = task.block_stack()
        count = s.max_blocks if s.one_shot else 1
        if s.blocks is not None:
            return {
                "chosen": list(s.blocks[: s.max_blocks] if s.one_shot else [s.blocks[k - 1]]),
                "scores": {},
            }
        if s.metric == "random":
            rng = random.Random(s.seed * 1000 + k)
            return {"chosen": rng.sample(droppable_blocks(stack), count), "scores": {}}
        root = self.out / f"round_{k}" / "scoring"
        if s.metric == "map":
            scores = score_candidates(task, "map", evaluate=lambda t: self.evaluate(t, s.score_data, root))
        else:
            dm = self.data_module(s.score_data)
            dm.setup("validate")
            batches = [self.ready(dm, task, b) for b in _take(dm.val_dataloader(), s.score_batches)]
            scores = score_candidates(task, s.metric, batches=batches)
        higher = HIGHER_IS_BETTER[s.metric]
        order = sorted(scores, key=lambda b: (-scores[b] if higher else scores[b], b))
        chosen = order[:count] if s.one_shot else [choose_block(scores, higher)]
        return {"chosen": chosen, "scores": {str(b): v for b, v in scores.items()}}

    def recover(
        self,
        task: Compressible,
        teacher: Compressible | None,
        folder: Path,
        epochs: int,
        schedule_epochs: float | None = None,
    ) -> dict[str, Any]:
        """Fine-tune ``task`` (its recovery run directory in ``folder``; resumed if one is there) for ``epochs``
        of a schedule over ``schedule_epochs`` (None: the settings'); with ``keep: best`` the task ends with the
        weights of its best validated epoch."""
        s = self.settings
        trainable = prepare_recovery(
            task, task.block_stack(), s.recovery, s.head_trainable, s.lora_rank, s.lora_init
        )
        info = {"trainable_params": sum(p.numel() for p in trainable)}
        if (s.recovery == "none" and not s.head_trainable) or epochs == 0:
            return info
        if s.lr is not None:
            task.optimizer_settings = replace(task.optimizer_settings, lr=s.lr)
        if s.backbone_lr is not None and hasattr(task, "backbone_lr"):
            task.backbone_lr = s.backbone_lr
        schedule = {"warmup_epochs": s.warmup_epochs, "epochs": schedule_epochs or s.schedule_epochs}
        task.schedule_settings = replace(
            task.schedule_settings, **{k: v for k, v in schedule.items() if v is not None}
        )
        aligned = teacher is not None and (
            s.alignment.feature or s.alignment.prediction or s.alignment.segment
        )
        task.set_teacher(teacher if aligned else None, s.alignment)
        run = RunDirectory(folder, "recovery")
        _, dm, trainer_args = self.fresh(run=run)
        trainer_args.update(default_root_dir=str(run.path), max_epochs=epochs, check_val_every_n_epoch=1)
        callbacks = [
            c for c in trainer_args.get("callbacks") or [] if not isinstance(c, ValidationSchedule)
        ]
        callbacks.append(ValidationSchedule(s.eval_first_epoch, s.eval_every))
        best = None
        if s.keep == "best":
            best = ModelCheckpoint(
                run.checkpoints / "best", filename="best", monitor=s.score_key, mode="max", save_top_k=1,
                save_weights_only=True,
            )  # fmt: skip
            callbacks.append(best)
        # On SIGTERM the recovery keeps its last epoch's checkpoint: the re-run then equals the uninterrupted run.
        state = RunState(run.checkpoints, save_on_sigterm=False)
        trainer_args["callbacks"] = [*callbacks, LastCheckpoint(run.checkpoints), state]
        trainer = L.Trainer(**trainer_args)
        if type(trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO":
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        resume = run.resume_checkpoint()
        if resume is not None:
            rank_zero_info(f"{folder.name}: resuming the recovery from {resume}")
        trainer.fit(task, datamodule=dm, ckpt_path=str(resume) if resume else None)
        finish_wandb()  # else the next fit's W&B logger would write into this round's run
        task.set_teacher(None)
        info["recovery_epochs"] = trainer.current_epoch
        if best is not None:
            if not best.best_model_path:
                raise RuntimeError(
                    f"{folder.name}: keep: best found no validated {s.score_key} in the recovery; validate at least "
                    "once (eval_first_epoch <= epochs)"
                )
            saved = read_own_checkpoint(best.best_model_path)
            task.load_state_dict(saved["state_dict"])
            info["kept_epoch"] = int(saved["epoch"]) + 1
            info["kept_score"] = float(best.best_model_score)
        return info

    def run(self) -> list[dict[str, Any]]:
        s = self.settings
        records_file = self.out / "rounds.json"
        records: list[dict[str, Any]] = json.loads(records_file.read_text()) if records_file.is_file() else []
        if not records:
            task = self.load(self.fresh()[0], None)
            record = {"round": 0, "dropped": [], "kept": block_ids(task.block_stack())}
            record["score"] = self.evaluate(task, None, self.out / "round_0")
            record.update(self.costs(task))
            records.append(record)
            write_json(records_file, records)
            self.report(records)
        relu = [r for r in records if r["round"] == "relu"]  # a finished run's ReLU stage, kept below
        records = [r for r in records if r["round"] != "relu"]
        base = records[0]
        limit = min(s.max_blocks, len(s.blocks)) if s.blocks is not None else s.max_blocks
        while True:
            last = records[-1]
            accepted = [r for r in records if not r.get("rejected")]
            if (
                last.get("rejected")
                or len(accepted[-1]["dropped"]) >= limit
                or (s.one_shot and len(records) > 1)
            ):
                break
            if s.macs_target is not None and last["gmacs"] <= s.macs_target * base["gmacs"]:
                break
            if s.latency_target is not None and last["latency_ms"] <= s.latency_target * base["latency_ms"]:
                break
            k = len(records)
            records.append(self.one_round(k, accepted[-1]))
            if s.score_tolerance is not None and records[-1]["score"] < base["score"] - s.score_tolerance:
                records[-1]["rejected"] = True
            write_json(records_file, records)
            self.report(records)
        if s.relu_stage:
            kept = kept_round(records)
            records.append(
                relu[0] if relu and relu[0]["from_round"] == kept["round"] else self.relu_round(kept)
            )
            write_json(records_file, records)
            self.report(records)
        self.export(records)
        log_to_wandb(
            as_list(self.cfg.trainer.logger),
            records,
            self.out,
            f"{self.compression_id}-rounds",
            self.out.name,
        )
        return records

    def relu_round(self, kept: dict[str, Any]) -> dict[str, Any]:
        """The supplement's sparse model: the kept round's model with ReLU MLPs, recovered as a round is, with the
        MLP activation sparsity of both."""
        s = self.settings
        folder = self.out / "relu"
        source = self.model_file(kept["round"])
        model_file, info_file = folder / "model.pt", folder / "recovery.json"
        if model_file.is_file():
            dropped = read_own_checkpoint(model_file)["dropped"]
            if dropped != kept["dropped"]:
                raise RuntimeError(
                    f"{model_file} is the ReLU stage of a model without blocks {dropped}, but the compression now "
                    f"keeps round {kept['round']} (without {kept['dropped']}): remove {folder} to redo the stage"
                )
        else:
            L.seed_everything(s.seed + 1000, verbose=False)
            student = self.load(self.fresh()[0], source)
            set_mlp_activation(student.block_stack(), "relu")
            teacher = None
            if s.recovery != "none" or s.head_trainable:
                teacher = self.load(self.fresh()[0], None if s.teacher == "original" else source)
            info = self.recover(
                student, teacher, folder, s.epochs if s.relu_epochs is None else s.relu_epochs
            )
            merge_lora(student)
            state = {"state_dict": student.state_dict(), "dropped": kept["dropped"], "mlp_activation": "relu"}
            write_json(info_file, info)  # first: the model file is what marks the stage done
            save_atomic(state, model_file)
        student = self.load(self.fresh()[0], model_file)
        record = {"round": "relu", "from_round": kept["round"], "dropped": kept["dropped"]}
        record.update(kept=block_ids(student.block_stack()), **json.loads(info_file.read_text()))
        record["score"] = self.evaluate(student, None, folder)
        record.update(self.costs(student))
        record["sparsity"] = self.sparsity(student)
        record["sparsity_gelu"] = self.sparsity(self.load(self.fresh()[0], source))
        rank_zero_info(f"ReLU stage: {s.score_key} {record['score']:.4f}, MLP sparsity "
                       f"{record['sparsity_gelu']:.4f} -> {record['sparsity']:.4f}")  # fmt: skip
        return record

    def one_round(self, k: int, previous: dict[str, Any]) -> dict[str, Any]:
        s = self.settings
        folder = self.out / f"round_{k}"
        source = self.model_file(previous["round"])
        choice_file = folder / "choice.json"
        if not choice_file.is_file():
            L.seed_everything(s.seed + k, verbose=False)
            current = self.load(self.fresh()[0], source)
            write_json(choice_file, self.choose(current, k))
        choice = json.loads(choice_file.read_text())
        dropped = [*previous["dropped"], *choice["chosen"]]
        model_file = folder / "model.pt"
        info_file = folder / "recovery.json"
        if not model_file.is_file():
            L.seed_everything(s.seed + k, verbose=False)
            student = self.load(self.fresh()[0], source)
            drop_blocks(student.block_stack(), choice["chosen"])
            teacher = None
            if s.recovery != "none" or s.head_trainable:
                teacher_source = None if s.teacher == "original" else source
                teacher = self.load(self.fresh()[0], teacher_source)
            first = k == 1 and s.first_round_epochs is not None
            epochs = s.first_round_epochs if first else s.epochs
            schedule_epochs = s.first_round_schedule_epochs if k == 1 else None
            info = self.recover(student, teacher, folder, epochs, schedule_epochs)
            merge_lora(student)
            write_json(info_file, info)  # first: the model file is what marks the round recovered
            save_atomic({"state_dict": student.state_dict(), "dropped": dropped}, model_file)
        student = self.load(self.fresh()[0], model_file)
        record = {"round": k, "dropped": dropped, "kept": block_ids(student.block_stack()), **choice}
        record.update(json.loads(info_file.read_text()))
        record["score"] = self.evaluate(student, None, folder)
        record.update(self.costs(student))
        rank_zero_info(f"round {k}: dropped {choice['chosen']} -> {s.score_key} {record['score']:.4f}, "
                       f"{record['gmacs']:.2f} GMACs")  # fmt: skip
        return record

    # ------------------------------------------------------------------------------------------- output

    def report(self, records: list[dict[str, Any]]) -> None:
        (self.out / "report.md").write_text(markdown(records, self.settings.score_key))
        plot(records, self.settings.score_key, self.out / "report.png")

    def export(self, records: list[dict[str, Any]]) -> None:
        """``compressed.ckpt`` + ``.yaml`` from the kept round; ``compressed_relu.*`` from the ReLU stage."""
        kept = kept_round(records)
        exports = [("compressed", kept["round"], "gelu")]
        exports += [("compressed_relu", "relu", "relu") for r in records if r["round"] == "relu"]
        for name, source, activation in exports:
            task = self.load(self.fresh()[0], self.model_file(source))
            state = {
                "state_dict": task.state_dict(),
                "pytorch-lightning_version": L.__version__,
                "dropped": kept["dropped"],
            }
            save_atomic(state, self.out / f"{name}.ckpt")
            (self.out / f"{name}.yaml").write_text(task.compressed_config(kept["dropped"], activation))


def _take(loader: Any, count: int | None):
    for i, batch in enumerate(loader):
        if count is not None and i >= count:
            return
        yield batch


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]] | dict[int, list[dict[str, Any]]]:
    """Run the compression; with ``--seeds 0 1 2`` once per seed (``<out_dir>/seed_<s>``, ``compress.seed`` = s),
    then the mean and standard deviation of each round's score (``seeds.md``). A SIGTERM stops it with status
    143 (a re-run of the same command continues where it stopped)."""
    try:
        return _compress(argv)
    except SIGTERMException:
        raise SystemExit(SIGTERM_EXIT) from None


def _compress(argv: Sequence[str] | None) -> list[dict[str, Any]] | dict[int, list[dict[str, Any]]]:
    parser = build_parser()
    cfg = parser.parse_args(argv)
    cfg.compress.out_dir = resolve_out_dir(cfg.compress.out_dir)
    if cfg.seed_everything is not False and cfg.seed_everything is not None:
        L.seed_everything(cfg.seed_everything, verbose=False)
    if not cfg.seeds:
        records = Compressor(parser, cfg).run()
        print((Path(cfg.compress.out_dir) / "report.md").read_text())
        return records
    out = Path(cfg.compress.out_dir)
    runs = {}
    for seed in cfg.seeds:
        one = copy.deepcopy(cfg)
        one.compress.seed = seed
        one.compress.out_dir = str(out / f"seed_{seed}")
        runs[seed] = Compressor(parser, one).run()
        print(f"seed {seed}:\n" + (out / f"seed_{seed}" / "report.md").read_text())
    print(seeds_report(out, runs, cfg.compress.score_key))
    return runs
