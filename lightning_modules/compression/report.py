"""What the compress command shows of its rounds: the markdown table, the plot, the seeds table, and W&B.

A record is one round's dict (``rounds.json``): ``round``, ``dropped``, ``kept``, ``score``, ``gmacs``, and when
measured ``latency_ms``, ``trainable_params``, ``chosen``, ``rejected``. The optional ReLU stage's record has
``round: "relu"`` and the MLP activation sparsity before (``sparsity_gelu``) and after (``sparsity``).
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.loggers import WandbLogger

from lightning_modules.cli import class_of

#: Columns of the per-round table (markdown report and the W&B table).
COLUMNS = (
    "round", "dropped", "blocks kept", "score", "GMACs", "MACs ratio", "latency (ms)", "trainable params",
    "MLP sparsity",
)  # fmt: skip
#: The summary W&B gets from a compression (what a sweep over compress optimises).
SUMMARY_KEYS = ("compress/score", "compress/score_change", "compress/macs_ratio", "compress/blocks_dropped")


def write_json(path: Path, content: Any) -> None:
    """Write JSON atomically (temporary file, then rename): a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    tmp.write_text(json.dumps(content, indent=2))
    os.replace(tmp, path)


def kept_round(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The round the compression keeps: the last one not rejected by the score tolerance."""
    return [r for r in records if not r.get("rejected") and r["round"] != "relu"][-1]


def table_rows(records: list[dict[str, Any]]) -> list[list[Any]]:
    """One row per record, in ``COLUMNS`` order (score in percent; missing measurements as None)."""
    base = records[0]
    rows = []
    for r in records:
        label = f"{r['round']} (rejected)" if r.get("rejected") else str(r["round"])
        rows.append([
            label, r.get("chosen"), len(r["kept"]), round(100 * r["score"], 4), round(r["gmacs"], 4),
            round(r["gmacs"] / base["gmacs"], 4), r.get("latency_ms"), r.get("trainable_params"), r.get("sparsity"),
        ])  # fmt: skip
    return rows


def markdown(records: list[dict[str, Any]], score_key: str) -> str:
    columns = [score_key if c == "score" else c for c in COLUMNS]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table_rows(records):
        cells = []
        for column, value in zip(COLUMNS, row, strict=True):
            if value is None:
                cells.append("-")
            elif column in ("score", "GMACs"):
                cells.append(f"{value:.2f}")
            elif column == "MACs ratio":
                cells.append(f"{value:.3f}")
            elif column == "latency (ms)":
                cells.append(f"{value:.1f}")
            elif column == "MLP sparsity":
                cells.append(f"{100 * value:.2f}%")
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    relu = [r for r in records if r["round"] == "relu"]
    if relu:
        r = relu[0]
        text += (
            f"\nReLU stage (round {r['from_round']}'s model with ReLU MLPs, fine-tuned): MLP activations exactly "
            f"zero {100 * r['sparsity_gelu']:.2f}% with GELU -> {100 * r['sparsity']:.2f}% with ReLU; "
            f"{score_key} {100 * r['score']:.2f}.\n"
        )
    return text


def plot(records: list[dict[str, Any]], score_key: str, path: Path) -> None:
    """Score and GMACs per round (the ReLU stage's model, if any, as a separate marker after the rounds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r for r in records if r["round"] != "relu"]
    x = [r["round"] for r in rounds]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [100 * r["score"] for r in rounds], "o-", color="tab:blue", label=score_key)
    for r in rounds:
        if r.get("rejected"):
            ax.annotate("rejected", (r["round"], 100 * r["score"]), textcoords="offset points", xytext=(4, 4))
    relu = [r for r in records if r["round"] == "relu"]
    if relu:
        ax.plot([x[-1] + 0.5], [100 * relu[0]["score"]], "D", color="tab:green", label="ReLU stage")
    ax.set_xlabel("round (blocks dropped)")
    ax.set_ylabel(score_key, color="tab:blue")
    ax.set_xticks(x)
    ax.legend(loc="lower left", fontsize=8)
    twin = ax.twinx()
    twin.plot(x, [r["gmacs"] for r in rounds], "s--", color="tab:orange")
    twin.set_ylabel("GMACs", color="tab:orange")
    ax.set_title("progressive block drop")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(records: list[dict[str, Any]]) -> dict[str, float]:
    """The compression's outcome as W&B summary values (``SUMMARY_KEYS``): the kept round's score, its change
    from the uncompressed model (points of the score, x100), MACs ratio and blocks dropped."""
    base, kept = records[0], kept_round(records)
    return {
        "compress/score": kept["score"],
        "compress/score_change": 100 * (kept["score"] - base["score"]),
        "compress/macs_ratio": kept["gmacs"] / base["gmacs"],
        "compress/blocks_dropped": float(len(kept["dropped"])),
    }


def finish_wandb() -> None:
    """End the process's active W&B run, if any: Lightning's ``WandbLogger`` reuses an active run instead of
    starting the one its ``id`` names."""
    import wandb

    if wandb.run is not None:
        wandb.finish()


def log_to_wandb(
    loggers: list[Namespace], records: list[dict[str, Any]], save_dir: Path, run_id: str, name: str
) -> bool:
    """Log the per-round table (``compress/rounds``) and ``summary`` to W&B, in one run ``run_id``, through the
    recipe's first W&B logger config (its class and settings; ``save_dir`` and ``id`` replaced). Returns False
    when the recipe has no W&B logger."""
    configs = [lg for lg in loggers if issubclass(class_of(lg.class_path), WandbLogger)]
    if not configs:
        return False
    config = configs[0]
    finish_wandb()
    args = {**config.init_args.as_dict(), "save_dir": str(save_dir), "id": run_id, "name": name}
    logger = class_of(config.class_path)(**args)
    rows = [[json.dumps(v) if isinstance(v, list) else v for v in row] for row in table_rows(records)]
    logger.log_table("compress/rounds", columns=list(COLUMNS), data=rows)
    logger.log_metrics(summary(records))
    logger.experiment.finish()
    return True


def seeds_report(out: Path, runs: dict[int, list[dict[str, Any]]], key: str) -> str:
    """Mean and standard deviation over seeds of each round's score (rounds every seed reached), as markdown."""
    runs = {seed: [r for r in records if r["round"] != "relu"] for seed, records in runs.items()}
    rounds = min(len(r) for r in runs.values())
    lines = [f"| round | {key} mean | std | seeds | blocks dropped per seed |", "|---|---|---|---|---|"]
    for k in range(rounds):
        scores = [100 * r[k]["score"] for r in runs.values()]
        std = statistics.stdev(scores) if len(scores) > 1 else 0.0
        dropped = "; ".join(f"{seed}: {r[k]['dropped']}" for seed, r in runs.items())
        lines.append(f"| {k} | {statistics.mean(scores):.2f} | {std:.2f} | {len(scores)} | {dropped} |")
    text = "\n".join(lines) + "\n"
    (out / "seeds.md").write_text(text)
    write_json(out / "seeds.json", {str(seed): r for seed, r in runs.items()})
    return text
