"""The paper's own reported numbers, for side-by-side tables. Always labelled as the paper's.

Source: *Subspace-Boosted Model Merging* (Skorobogat, Roth, Georgescu), as transcribed in the
project's REFERENCE.md and the paper text. Absolute top-1 accuracy in percent unless noted.
These are quoted, never computed here.
"""

from __future__ import annotations

import pandas as pd

TASK_COUNTS = (8, 14, 20)

# Task order of the paper's benchmarks (first 8 / 14 / 20).
PAPER_TASKS = (
    "Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SVHN", "SUN397",
    "STL10", "OxfordIIITPet", "Flowers102", "CIFAR100", "PCAM", "FER2013",
    "CIFAR10", "Food101", "FashionMNIST", "RenderedSST2", "EMNIST", "KMNIST",
)

# Table 1 (ViT-B/32), 8 / 14 / 20 tasks.
TABLE1_VIT_B32 = {
    "Zero-shot": (48.3, 57.3, 56.1),
    "Fine-tuned": (90.5, 89.5, 90.4),
    "TA": (69.7, 65.0, 60.3),
    "TA+SB": (83.1, 75.8, 66.4),
    "TA+LiNeS+SB": (85.6, 80.8, 77.2),
    "TIES": (73.6, 67.6, 63.1),
    "TIES+SB": (81.8, 74.4, 69.8),
    "Consensus": (74.5, 70.1, 65.3),
    "Consensus+SB": (82.7, 77.1, 73.2),
}

# Table 4 (ViT-B/32), comparison to the state of the art.
TABLE4_VIT_B32 = {
    "TSV-M": (83.8, 79.5, 76.7),
    "Iso-C": (83.8, 79.1, 74.7),
    "Iso-CTS": (83.8, 80.2, 77.3),
    "TA+LiNeS+SB": (85.6, 81.7, 77.6),
}

# Table 7: β ablation for TA + SB, ViT-B/32, 8 / 14 / 20 tasks.
TABLE7_VIT_B32 = {0.00: (83.1, 75.8, 63.7), 0.01: (82.6, 75.3, 63.2), 0.02: (82.0, 75.2, 66.4)}

# Table 3 (ViT-B/16, 8 tasks, TA + SB): (a) β, (b) layer types.
TABLE3_BETA = {0.00: 87.7, 0.01: 87.4, 0.02: 87.2}
TABLE3_LAYERS = {"mlp": 86.5, "attn": 83.9, "both": 87.7}

# Table 2 (T5): 8 QA tasks / 7 NLP tasks.
TABLE2_T5 = {
    "Zero-shot": (33.1, 44.9), "Fine-tuned": (80.7, 85.9), "TA": (63.8, 71.9), "TIES": (63.0, 71.6),
    "Consensus": (68.6, 73.5), "TA+LiNeS": (67.6, 76.4), "SB": (75.3, 83.0),
}

# Table 5: expert selection (pool / external accuracy); Table 10: 8 of 20 evaluated on 20.
TABLE5 = {"Random": (72.9, 47.6), "HO-GSVD": (75.7, 47.6)}
TABLE10 = {"Random": 67.5, "Random (std)": 2.3, "HO-GSVD": 69.7}

# Supp. G.1, after Eq. 32: "We set π to 10^{-2} by default" (HO-GSVD's regularisation).
HOGSVD_PI = 1e-2

# Sizes of the expert-selection experiments (Sec. 5.3, Table 5, Fig. 5a; Supp. H, Table 10):
# Fig. 5a decomposes 8 task vectors with their average; Table 5 merges a pool of 3 experts with
# 5 chosen of 14 candidates (random baseline: mean of 10 draws) and scores them also on 3
# external tasks; Table 10 merges 8 chosen of all 20 (random baseline: 20 draws).
SELECTION_SIZES = {"spectra_tasks": 8, "pool": 3, "candidates": 14, "external": 3, "select_k": 5,
                   "table5_draws": 10, "table10_k": 8, "table10_draws": 20}

# Table 9: Higher-Order SB against the SB variants, absolute accuracy, 8 / 14 / 20 tasks.
TABLE9_VIT_B32 = {
    "TA+SB+LiNeS": (85.6, 80.8, 77.2),
    "TIES+SB+LiNeS": (83.8, 79.1, 75.9),
    "CSM+SB+LiNeS": (84.4, 80.3, 77.2),
    "Higher-Order SB+LiNeS": (84.5, 79.8, 75.6),
}
TABLE9_VIT_B16 = {
    "TA+SB+LiNeS": (88.8, 84.7, 80.0),
    "TIES+SB+LiNeS": (87.4, 83.3, 79.7),
    "CSM+SB+LiNeS": (87.6, 84.2, 80.0),
    "Higher-Order SB+LiNeS": (88.5, 84.7, 79.1),
}
# Table 10, normalised accuracy [%] (the absolute column is TABLE10).
TABLE10_NORMALIZED = {"Random": 72.5, "HO-GSVD": 75.2}

# Exponents the propositions predict (Supp. E): Prop. 1's decay of the task-specific part
# (Eq. 15), Prop. 3's growth of the common / unique ratio (Eq. 26-28), and the N^gamma test's
# collapse exponents of the head and the tail of the spectrum (Supp. E.4).
PROP_EXPONENTS = {"prop1_unique": -0.5, "prop3_ratio": 0.5, "e4_head_gamma": 1.0, "e4_tail_gamma": 0.5}

# Table 6: seconds to merge 20 tasks (ViT-B/32, B/16, L/14), on the authors' GPUs.
TABLE6_SECONDS = {
    "TA": (0.2, 0.28, 1.0), "Consensus": (1.8, 2.4, 20.2), "TIES": (6.3, 4.3, 25.6),
    "SB": (9.7, 10.5, 40.1), "TSV-M": (62.0, 63.0, 210.0),
}


def paper_table(table: dict, columns=TASK_COUNTS, label: str = "paper") -> pd.DataFrame:
    """A paper table as a DataFrame whose column names say they are the paper's."""
    df = pd.DataFrame(table).T
    df.columns = [f"{label} {c}" for c in columns][: df.shape[1]]
    df.index.name = "method"
    return df


# open_clip name → how the paper writes it
PAPER_MODELS = {"ViT-B-32": "ViT-B/32", "ViT-B-16": "ViT-B/16", "ViT-L-14": "ViT-L/14"}


def comparable_label(paper_model: str, run_model: str | None) -> str | None:
    """Column label for a paper table measured on ``paper_model`` (open_clip name) beside a run
    on ``run_model``: ``"paper ViT-B/32"`` when the run used the same architecture, or when
    ``run_model`` is ``None`` (the mini zoo, where the paper's numbers are shown for reference);
    ``None`` (show no paper column) for any other real model."""
    if run_model is not None and run_model != paper_model:
        return None
    return f"paper {PAPER_MODELS.get(paper_model, paper_model)}"


def paper_table_for(table: dict, paper_model: str, run_model: str | None, columns=TASK_COUNTS) -> pd.DataFrame:
    """:func:`paper_table` labelled by :func:`comparable_label`; an empty table (no columns, so
    a join adds nothing) when the run's model is not the paper's."""
    label = comparable_label(paper_model, run_model)
    if label is None:
        return pd.DataFrame(index=pd.Index([], name="method"))
    return paper_table(table, columns, label=label)


# ---------------------------------------------------------------------------------------------
# Other publications' measurements of fine-tuned CLIP ViT task vectors, quoted for the mini
# zoo's calibration (:mod:`subboost.calibration`). Each entry names its source; where a
# publication states a quantity only in a figure, no number is transcribed here.

# Ilharco et al. 2023, "Editing models with task arithmetic" (ICLR), experimental setup of the
# image-classification task vectors (CLIP ViT-B/32, B/16, L/14; 8 tasks): the expert recipe.
ILHARCO2023_SOURCE = "Ilharco et al. 2023, Editing models with task arithmetic (ICLR), Appendix: experimental setup"
FINETUNE_RECIPE_ILHARCO2023 = {
    "optimizer": "AdamW", "learning_rate": 1e-5, "weight_decay": 0.1, "batch_size": 128, "steps": 2000,
    "warmup_steps": 200, "schedule": "cosine", "head": "frozen zero-shot head",
}
# The same paper, Sec. "Discussion" (figure of pairwise cosine similarities between the task
# vectors of different tasks): task vectors of different tasks are close to orthogonal. The
# values are only plotted; no number is transcribed.
ILHARCO2023_COSINE_SOURCE = 'Ilharco et al. 2023, Discussion ("similarity between task vectors"), figure of pairwise cosine similarities'

# Wang, Dimitriadis et al. 2024 (TALL masks / Consensus), repository nik-dim/tall_masks, file
# finetune.py and src/utils/args.py: the recipe of the checkpoints the paper merges (its
# Sec. 5 "Implementation Details": "checkpoints provided by Wang et al. (2024b)").
TALL_MASKS_SOURCE = "nik-dim/tall_masks, finetune.py and src/utils/args.py (recipe of the paper's checkpoints)"
FINETUNE_RECIPE_TALL_MASKS = {
    "optimizer": "AdamW", "learning_rate": 1e-5, "weight_decay": 0.1, "batch_size": 128, "warmup_steps": 500,
    "schedule": "cosine", "grad_clip_norm": 1.0, "head": "frozen zero-shot head", "trained": "whole image encoder",
}
# epochs per dataset in that finetune.py (ViT-B/32 batch 128)
FINETUNE_EPOCHS_TALL_MASKS = {
    "Cars": 35, "DTD": 76, "EuroSAT": 12, "GTSRB": 11, "MNIST": 5, "RESISC45": 15, "SUN397": 14, "SVHN": 4,
    "CIFAR10": 6, "CIFAR100": 6, "STL10": 60, "Food101": 4, "Flowers102": 147, "FER2013": 10, "PCAM": 1,
    "OxfordIIITPet": 82, "RenderedSST2": 39, "EMNIST": 2, "FashionMNIST": 5, "KMNIST": 5,
}

# Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in Model Merging"
# (CVPR), abstract: layer task matrices are low-rank; TSV-Compress keeps each to about 10% of
# its original size and retains about 99% of the accuracy (CLIP ViT, 8/14/20 tasks).
TSV2025_SOURCE = "Gargiulo et al. 2025, Task Singular Vectors (CVPR), abstract and Sec. on TSV-Compress"
TSV_COMPRESS = {"storage_fraction": 0.10, "accuracy_retained": 0.99}

# This paper, Supp. "Hyperparameters": the merging-coefficient grid of TA, TIES, Consensus and
# their +SB variants (after Wang et al. 2024c). The chosen α per setting is not reported.
ALPHA_GRID_SOURCE = "Subspace-Boosted Model Merging, Supp. (Implementation details, Hyperparameters)"
ALPHA_GRID_TA = tuple(round(0.1 * i, 1) for i in range(1, 11))

# This paper, Sec. 3 (Fig. 2d, ViT-B/16) and Supp. D (Fig. 7): as more models are merged with TA
# (N = 4, 8, 14, 20) "the stable rank decreases for a large majority of sublayers". Plotted
# only; no per-layer number is transcribed.
STABLE_RANK_TREND_SOURCE = "Subspace-Boosted Model Merging, Sec. 3 Fig. 2(d) and Supp. D Fig. 7 (ViT-B/16, TA)"
STABLE_RANK_TASK_COUNTS = (4, 8, 14, 20)
TABLE1_SOURCE = "Subspace-Boosted Model Merging, Table 1 (ViT-B/32, absolute top-1 %)"
