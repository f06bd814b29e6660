"""Probe expert fine-tuning recipes on a few tasks of a built zoo (calibration, not a benchmark).

Fine-tunes a handful of experts from an already built zoo's base with other recipes (learning
rate, steps, batch, warm-up, weight decay), without writing into the zoo, and measures the
calibration quantities of :mod:`subboost.calibration` that one expert (or a few) already
determine: test accuracy, ‖Δ‖/‖θ0‖, the share of ‖ΔW‖F² at 10% storage, the accuracy kept when
the block matrices are truncated to 10% of their size, and the pairwise cosine between the
probed experts. Usage::

    SUBBOOST_ZOO_ROOT=/work/zoo_cache python benchmarks/zoo_recipe_probe.py --profile ci \\
        --tasks 0 3 5 7 --recipe lr=5e-4,steps=150 --recipe lr=1e-4,steps=300,wd=0.1

Prints one row per (recipe, task) and one summary row per recipe; ``--csv`` writes them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from subboost import calibration as C
from subboost.checkpoints import load_state_dict
from subboost.taskvector import apply_task_vector, task_vector
from subboost.zoo import tasks as T
from subboost.zoo.build import architecture, get_config, register, zoo_dir
from subboost.zoo.model import create_model
from subboost.zoo.train import finetune, predict
from subboost.zoo_common import torch_settings

KEYS = {"lr": "finetune_lr", "steps": "finetune_steps", "batch": "finetune_batch", "warmup": "finetune_warmup",
        "wd": "finetune_weight_decay"}


def parse_recipe(text: str) -> dict:
    out = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in KEYS:
            raise SystemExit(f"--recipe: unknown key '{key}' (known: {', '.join(KEYS)})")
        out[KEYS[key]] = float(value) if key in ("lr", "wd") else int(value)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="ci")
    ap.add_argument("--root", default=None)
    ap.add_argument("--tasks", type=int, nargs="+", default=[0, 3, 5, 7], help="task indices")
    ap.add_argument("--recipe", action="append", required=True, help="k=v,... with keys " + ", ".join(KEYS))
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    base_cfg = get_config(args.profile)
    out = zoo_dir(base_cfg, args.root)
    name = register(base_cfg, out)
    base_file = out / name / f"{base_cfg.tasks[0]}Val" / "nonlinear_zeroshot.pt"
    if not base_file.is_file():
        print(f"error: no base at {base_file}", file=sys.stderr)
        return 2
    base_state = load_state_dict(base_file)
    model = create_model(name, architecture(base_cfg), out / "model_configs")
    model.load_state_dict(base_state)
    model.eval()
    rows = []
    tasks = [base_cfg.tasks[i] for i in args.tasks]
    with torch_settings(1):
        for text in args.recipe:
            cfg = get_config(base_cfg, **parse_recipe(text))
            vectors = {}
            for task in tasks:
                head = load_state_dict(out / name / f"head_{task}Val.pt")["weight"]
                xtr, ytr = T.generate(task, cfg.n_train, "train", cfg.seed, cfg.image_size)
                t0 = time.perf_counter()
                state = finetune(model, head, xtr, ytr, steps=cfg.finetune_steps, batch_size=cfg.finetune_batch,
                                 lr=cfg.finetune_lr, weight_decay=cfg.finetune_weight_decay,
                                 warmup=cfg.finetune_warmup, seed=cfg.seed * 1000 + T.TASK_NAMES.index(task),
                                 progress=False)
                seconds = time.perf_counter() - t0
                delta = task_vector(base_state, state, name=task)
                vectors[task] = delta
                x, y = T.generate(task, cfg.n_test, "test", cfg.seed, cfg.image_size)
                expert = create_model(name, architecture(cfg), out / "model_configs")
                expert.load_state_dict(state)
                ft = float((predict(expert.visual, head, x) == y).float().mean())
                zs = float((predict(model.visual, head, x) == y).float().mean())
                trunc = C.truncate_task_vector(delta)
                expert.load_state_dict(apply_task_vector(base_state, trunc, 1.0))
                kept = float((predict(expert.visual, head, x) == y).float().mean())
                blocks = C.block_table(base_state, {task: delta})
                rows.append(dict(recipe=text, task=task, zeroshot=zs, finetuned=ft, truncated=kept,
                                 retained=kept / ft if ft > 0 else float("nan"),
                                 relative_size=C.relative_size(base_state, delta),
                                 energy_at_10pct=float(blocks.energy_at_k.mean()),
                                 rank_fraction_99=float(blocks.rank_fraction_energy.mean()),
                                 seconds=seconds))
                print(pd.DataFrame(rows[-1:]).to_string(index=False, header=len(rows) == 1), flush=True)
            pairs = C.off_diagonal(C.pairwise_cosine(vectors)) if len(vectors) > 1 else pd.Series([float("nan")])
            rows.append(dict(recipe=text, task="(mean)", **{c: float(pd.DataFrame(rows[-len(tasks):])[c].mean())
                                                            for c in ("zeroshot", "finetuned", "truncated", "retained",
                                                                      "relative_size", "energy_at_10pct",
                                                                      "rank_fraction_99", "seconds")},
                             cosine_mean=float(pairs.mean()), cosine_max=float(pairs.max())))
    df = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 3):
        print(df[df.task == "(mean)"].to_string(index=False))
    if args.csv:
        df.to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
