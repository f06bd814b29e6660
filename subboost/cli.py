"""``subboost``: merge experts, diagnose rank collapse and select experts from the shell.

Three commands on the library's registered methods (:data:`subboost.merging.METHODS`):

- ``subboost merge``: θ0 + α·Δm as a ``.safetensors`` file, streamed tensor by tensor
  (:func:`subboost.streaming.stream_merge`), with the method, its parameters and the inputs'
  SHA-256 in the file's metadata;
- ``subboost diagnose``: stable rank and energy ranks of every block matrix for TA and a
  method, each with and without Subspace Boosting (:func:`subboost.spectral.rank_table`);
- ``subboost select``: HO-GSVD alignment matrix (paper Eq. 7) and the k experts that
  interfere least with a pool (:mod:`subboost.hogsvd`).

Exit codes: 0 ok; 1 internal error (a bug: traceback); 2 bad input (missing or malformed
file, mismatched keys or shapes, unknown method or parameter, non-finite weights or merged
result, an output that is an input or already exists), with one line on stderr naming the
culprit; 130 interrupted by SIGINT (Ctrl-C), 143 by SIGTERM, 129 by SIGHUP (128 + the
signal number). In every failure or interruption nothing is left behind: outputs are
written to a temporary file beside the target and published only when complete
(:func:`subboost.io.atomic_path`: exclusively unless ``--overwrite``, with the umask's
mode); the temporary file and any folder created for the output are removed, an existing
output is kept intact, and inputs are only read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

EXIT_INTERNAL_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

_MERGE_EXAMPLES = """\
examples:
  # Task Arithmetic + Subspace Boosting (β = 0) of three experts, α = 0.3
  subboost merge --base zeroshot.safetensors --experts cars.safetensors dtd.safetensors \\
      eurosat.safetensors --method ta --boost 0.0 --alpha 0.3 --output merged.safetensors

  # TIES (keep 20%) + SB, from a checkpoint root in the public layout (pickled modules)
  subboost merge --root checkpoints --model ViT-B-32 --tasks Cars DTD EuroSAT GTSRB \\
      --method ties --param top_k=0.2 --boost 0.0 --alpha 1.0 --allow-pickle \\
      --output ties_sb.safetensors

  # TA + LiNeS (b = 0.5, default a) + SB
  subboost merge --base base.pt --experts a.pt b.pt --method ta --boost 0 --lines 0.5

methods: {methods}
"""

_DIAGNOSE_EXAMPLES = """\
examples:
  subboost diagnose --base zeroshot.safetensors --experts e1.safetensors e2.safetensors \\
      --method ties --boost 0.0 --format csv --output ranks.csv --plot ranks.png
  subboost diagnose --root checkpoints --model ViT-B-32 --tasks Cars DTD --allow-pickle
"""

_SELECT_EXAMPLES = """\
examples:
  # choose 5 of the other experts to add to a pool of 3 (paper Table 5)
  subboost select --root checkpoints --model ViT-B-32 --allow-pickle \\
      --tasks Cars DTD EuroSAT GTSRB MNIST RESISC45 SVHN SUN397 STL10 \\
      --pool Cars DTD EuroSAT --k 5 --output selection.json --plot alignment.png
  subboost select --base base.safetensors --experts a.safetensors b.safetensors \\
      c.safetensors d.safetensors --pool a --k 2
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2), as for every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_BAD_INPUT)


class BadInput(Exception):
    """Raised by the commands for problems with the command line itself."""


# ----------------------------------------------------------------------------- parsing


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def _beta(text: str) -> float:
    value = _finite(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"β must lie in [0, 1], got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {text}")
    return value


def _param(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    name, raw = text.split("=", 1)
    name = name.strip().replace("-", "_")
    if not name.isidentifier():
        raise argparse.ArgumentTypeError(f"bad parameter name {name!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"parameter {name} must be finite")
    return name, value


def _inputs_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("inputs (safetensors, .pt state dicts, pickled modules, or a checkpoint root)")
    g.add_argument("--base", type=Path, help="pretrained (zero-shot) checkpoint θ0")
    g.add_argument("--experts", type=Path, nargs="+", default=[], metavar="EXPERT", help="fine-tuned checkpoints θi")
    g.add_argument("--names", nargs="+", metavar="NAME", help="names of the experts (default: from the file names)")
    g.add_argument("--root", type=Path, help="checkpoint root in the public layout ({root}/{model}/{Task}Val/nonlinear_finetuned.pt, or {root}/{model}/{Task}/finetuned.pt)")
    g.add_argument("--model", help="model folder under --root, e.g. ViT-B-32")
    g.add_argument("--tasks", nargs="+", metavar="TASK", help="task names under --root, e.g. Cars DTD EuroSAT")
    g.add_argument("--allow-pickle", action="store_true", help="read pickled models in .pt files (restricted unpickler: model classes become inert placeholders, any other object is refused)")
    o = p.add_argument_group("execution")
    o.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to compute (default: cuda if available)")
    o.add_argument("--memory-budget", type=_positive_int, default=512, metavar="MB", help="memory for row blocks of large tensors (default 512)")
    o.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="CPU threads for torch (default: torch's choice; 1 helps on an oversubscribed machine)")
    o.add_argument("--quiet", action="store_true", help="no progress bars (they are shown only on a terminal anyway)")
    o.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def _method_args(p: argparse.ArgumentParser, default_boost: float | None) -> None:
    from subboost.merging import METHODS

    g = p.add_argument_group("method")
    g.add_argument("--method", default="ta", metavar="NAME", help=f"registered method: {', '.join(METHODS)} (default ta)")
    g.add_argument("--param", type=_param, action="append", default=[], metavar="NAME=VALUE",
                   help="method parameter, JSON value (e.g. top_k=0.2, k=2, lambdas=[0.3,0.4])")
    helptext = "Subspace Boosting β after the method (paper default 0.0)"
    g.add_argument("--boost", type=_beta, default=default_boost, metavar="BETA",
                   help=helptext + ("; omit for no boosting" if default_boost is None else f" (default {default_boost})"))
    g.add_argument("--boost-layers", nargs="+", choices=["attn", "mlp"], default=["attn", "mlp"], help="layer types to boost (default both)")
    g.add_argument("--boost-proj", action="store_true", help="also boost the visual projection")
    g.add_argument("--boost-route", default="auto", choices=["auto", "svd", "svd-tall", "gram", "polar"],
                   help="how SB is computed (default auto: exact fast route; svd: paper Alg. 1 verbatim)")
    g.add_argument("--attention", default="fused", choices=["fused", "qkv", "heads"],
                   help="how SB treats the Q/K/V projections: fused in_proj as one matrix (default), "
                        "Q, K, V separately, or each attention head separately (needs --num-heads or --model)")
    g.add_argument("--num-heads", type=_positive_int, default=None, metavar="N",
                   help="attention heads, for --attention heads (default: from the open_clip config of --model)")


def build_parser() -> argparse.ArgumentParser:
    """The ``subboost`` argument parser (commands merge, diagnose, select)."""
    from subboost.merging import METHODS

    from subboost import __version__

    parser = _Parser(
        prog="subboost",
        description="Model merging with Subspace Boosting: merge experts, diagnose rank collapse, select experts.",
        epilog="run 'subboost COMMAND --help' for the options and examples of each command",
    )
    parser.add_argument("--version", action="version", version=f"subboost {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    inputs = _inputs_parser()
    fmt = argparse.RawDescriptionHelpFormatter

    m = sub.add_parser("merge", parents=[inputs], formatter_class=fmt, help="merge experts into one checkpoint",
                       description="Merge experts: θm = θ0 + α·Δm, Δm = method → SB → LiNeS; written as safetensors.",
                       epilog=_MERGE_EXAMPLES.format(methods=", ".join(f"{k} ({v.summary})" for k, v in METHODS.items())))
    _method_args(m, None)
    g = m.add_argument_group("merge")
    g.add_argument("--alpha", type=_finite, default=1.0, help="merging coefficient α (default 1.0)")
    g.add_argument("--lines", type=_finite, default=None, metavar="B", help="LiNeS: scale block l by a + B·l/(L−1)")
    g.add_argument("--lines-a", type=_finite, default=None, metavar="A", help="LiNeS a (default: the multi-task default)")
    g.add_argument("--lines-order", choices=["after_boost", "before_boost"], default="after_boost",
                   help="LiNeS' default a from the boosted update (after_boost, default) or the un-boosted one")
    g.add_argument("--output", type=Path, default=Path("merged.safetensors"), metavar="OUT.safetensors",
                   help="output file (default merged.safetensors)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output (never an input)")
    g.add_argument("--no-hash", action="store_true", help="skip the SHA-256 of the inputs in the metadata")
    m.set_defaults(func=cmd_merge)

    d = sub.add_parser("diagnose", parents=[inputs], formatter_class=fmt, help="stable / energy ranks per block matrix",
                       description="Stable rank and energy rank (50%%, 30%%) per block matrix for TA and a method, each ± SB.",
                       epilog=_DIAGNOSE_EXAMPLES)
    _method_args(d, 0.0)
    g = d.add_argument_group("output")
    g.add_argument("--format", choices=["table", "csv", "json"], default="table", help="table format (default table)")
    g.add_argument("--output", type=Path, default=None, help="write the table here instead of stdout")
    g.add_argument("--plot", type=Path, default=None, metavar="PNG", help="plot stable rank per layer")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")
    d.set_defaults(func=cmd_diagnose)

    s = sub.add_parser("select", parents=[inputs], formatter_class=fmt, help="HO-GSVD alignment and expert selection",
                       description="HO-GSVD alignment matrix (paper Eq. 7; higher = less interference) and the k "
                                   "candidates that interfere least with the pool (paper Table 5).",
                       epilog=_SELECT_EXAMPLES)
    g = s.add_argument_group("selection")
    g.add_argument("--pool", nargs="*", default=[], metavar="NAME", help="experts that are always merged")
    g.add_argument("--candidates", nargs="+", metavar="NAME", help="experts to choose from (default: all others)")
    g.add_argument("--k", type=_positive_int, required=True, help="number of candidates to choose")
    g.add_argument("--pi", type=_finite, default=1e-2, help="HO-GSVD regularisation π (paper 1e-2)")
    g.add_argument("--selection", choices=["auto", "greedy", "exhaustive"], default="auto", help="search (default auto)")
    g.add_argument("--layers", nargs="+", choices=["attn", "mlp"], default=["attn", "mlp"], help="block matrices to decompose")
    g.add_argument("--output", type=Path, default=None, help="write the JSON here instead of stdout")
    g.add_argument("--plot", type=Path, default=None, metavar="PNG", help="heatmap of the alignment matrix")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")
    s.set_defaults(func=cmd_select)
    return parser


# ----------------------------------------------------------------------------- helpers


def _progress_on(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda: CUDA is not available on this machine")
    return name


@contextlib.contextmanager
def _open_inputs(args: argparse.Namespace) -> Iterator[tuple[Any, list[Any], list[str], list[Path]]]:
    """Open base and experts lazily; yields (base reader, expert readers, names, paths)."""
    from subboost.io import checkpoint_root_paths, expert_names, open_checkpoint

    if args.root is not None:
        if args.experts:
            raise BadInput("give either --experts or --root/--model/--tasks, not both")
        if not args.model or not args.tasks:
            raise BadInput("--root needs --model and --tasks")
        base_path, expert_paths = checkpoint_root_paths(args.root, args.model, args.tasks, base=args.base)
        names = list(args.names) if args.names else [t[:-3] if t.endswith("Val") else t for t in args.tasks]
    else:
        if args.base is None:
            raise BadInput("missing --base (or --root/--model/--tasks)")
        if not args.experts:
            raise BadInput("missing --experts (or --root/--model/--tasks)")
        base_path, expert_paths = args.base, list(args.experts)
        names = list(args.names) if args.names else expert_names(expert_paths)
    if len(names) != len(expert_paths):
        raise BadInput(f"--names: got {len(names)} names for {len(expert_paths)} experts")
    if len(set(names)) != len(names):
        raise BadInput(f"expert names must be unique, got {names}")
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(open_checkpoint(base_path, args.allow_pickle))
        experts = [stack.enter_context(open_checkpoint(p, args.allow_pickle)) for p in expert_paths]
        yield base, experts, names, [Path(base_path)] + [Path(p) for p in expert_paths]


def _check_output(path: Path, inputs: Sequence[Path], overwrite: bool, what: str = "--output") -> None:
    from subboost.io import same_file

    for p in inputs:
        if same_file(p, path):
            raise BadInput(f"{what} {path} is an input ({p}); refusing to overwrite an input")
    if path.exists() and not overwrite:
        raise BadInput(f"{what} {path} exists; pass --overwrite to replace it")
    if path.exists() and path.is_dir():
        raise BadInput(f"{what} {path} is a folder")


def _method_and_params(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    from subboost.streaming import check_method_params

    return args.method, check_method_params(args.method, dict(args.param))


def _boost_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = dict(layer_types=list(args.boost_layers), include_proj=bool(args.boost_proj),
                                   route=args.boost_route)
    if args.attention != "fused":
        options["attention"] = args.attention
    if args.attention == "heads":
        heads = args.num_heads
        if heads is None:
            if not getattr(args, "model", None):
                raise BadInput("--attention heads needs --num-heads (a state dict does not record the number of "
                               "attention heads), or --model naming an open_clip config")
            from subboost.boost import infer_num_heads

            try:
                heads = infer_num_heads(args.model)
            except ValueError as err:
                raise BadInput(f"--attention heads: {err} (use --num-heads)") from None
        options["num_heads"] = heads
    elif args.num_heads is not None:
        raise BadInput("--num-heads needs --attention heads")
    return options


def _plot_format(path: Path | None) -> str | None:
    """The figure format of ``--plot`` (its suffix; png without one), checked against
    matplotlib's formats before any work."""
    if path is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backend_bases import FigureCanvasBase

    fmt = path.suffix.lstrip(".").lower() or "png"
    formats = FigureCanvasBase.get_supported_filetypes()
    if fmt not in formats:
        raise BadInput(f"--plot {path}: unknown figure format '{fmt}' (use one of {', '.join(sorted(formats))})")
    return fmt


def _check_report_outputs(args: argparse.Namespace, inputs: Sequence[Path]) -> str | None:
    """Checks of ``--output`` and ``--plot`` (diagnose, select) before any work; returns the
    plot format."""
    from subboost.io import same_file

    fmt = _plot_format(args.plot)
    if args.output is not None and args.plot is not None and same_file(args.output, args.plot):
        raise BadInput(f"--output and --plot name the same file ({args.output})")
    for label, out in (("--output", args.output), ("--plot", args.plot)):
        if out is not None:
            _check_output(out, inputs, args.overwrite, label)
    return fmt


def _write_report_outputs(args: argparse.Namespace, text: str, plot: Any, fmt: str | None) -> None:
    """Write the ``--output`` text and the ``--plot`` figure (``plot(fig_path, fmt)``), each
    atomically; nothing is published unless both were written."""
    from subboost.io import atomic_path

    with contextlib.ExitStack() as stack:
        if args.plot is not None:
            plot(stack.enter_context(atomic_path(args.plot, overwrite=args.overwrite, label="--plot")), fmt)
        if args.output is not None:
            stack.enter_context(atomic_path(args.output, overwrite=args.overwrite, label="--output")).write_text(text)


def _hash_inputs(paths: Sequence[Path], names: Sequence[str], progress: bool) -> list[dict[str, str]]:
    from subboost.io import sha256_file
    from subboost.streaming import _progress

    total = sum(p.stat().st_size for p in paths)
    bar = _progress(total, "sha256", progress, unit="B")
    records = []
    for i, (p, name) in enumerate(zip(paths, ["base"] + list(names))):
        records.append(dict(role="base" if i == 0 else "expert", name=name, file=p.name, sha256=sha256_file(p, bar)))
    bar.close()
    return records


# ----------------------------------------------------------------------------- commands


def cmd_merge(args: argparse.Namespace) -> int:
    """``subboost merge``."""
    from subboost.streaming import stream_merge

    method, params = _method_and_params(args)
    device = _device(args.device)
    output: Path = args.output
    if output.suffix != ".safetensors":
        raise BadInput(f"--output must end in .safetensors, got {output}")
    if args.lines_a is not None and args.lines is None:
        raise BadInput("--lines-a needs --lines")
    with _open_inputs(args) as (base, experts, names, paths):
        _check_output(output, paths, args.overwrite)
        progress = _progress_on(args)
        meta: dict[str, str] = {"subboost.experts": json.dumps(names)}
        if not args.no_hash:
            meta["subboost.inputs"] = json.dumps(_hash_inputs(paths, names, progress))
        report = stream_merge(
            base, experts, output, method, names=names, params=params, alpha=args.alpha,
            boost_beta=args.boost, boost_options=_boost_options(args) if args.boost is not None else None,
            lines_b=args.lines, lines_a=args.lines_a, lines_order=args.lines_order, metadata=meta, device=device,
            memory_budget=args.memory_budget << 20, progress=progress, overwrite=args.overwrite,
            label="--output",
        )
    parts = [f"method={method}"] + [f"{k}={v}" for k, v in params.items()] + [f"alpha={args.alpha:g}"]
    if args.boost is not None:
        routes = report.boost["route"].value_counts().to_dict() if len(report.boost) else {}
        parts.append(f"boost={args.boost:g} ({', '.join(f'{n} {r}' for r, n in routes.items())})")
    if args.lines is not None:
        parts.append(f"lines b={args.lines:g} a={report.lines_a:.4g}")
    print(f"wrote {output} ({report.n_tensors} tensors, {report.n_experts} experts; {'; '.join(parts)}) "
          f"in {report.seconds:.1f} s")
    return 0


def _rank_rows(variant: str, key: str, matrix: Any) -> list[dict]:
    from subboost.spectral import rank_table

    table = rank_table({key: matrix})
    rows = table.to_dict("records")
    for r in rows:
        r["variant"] = variant
    return rows


def cmd_diagnose(args: argparse.Namespace) -> int:
    """``subboost diagnose``."""
    import pandas as pd

    from subboost.boost import boost_task_vector
    from subboost.streaming import block_keys, merged_deltas

    method, params = _method_and_params(args)
    fmt = _plot_format(args.plot)
    device = _device(args.device)
    beta = 0.0 if args.boost is None else args.boost
    options = _boost_options(args)
    with _open_inputs(args) as (base, experts, names, paths):
        _check_report_outputs(args, paths)
        keys = block_keys(base, options["layer_types"], options["include_proj"])
        if not keys:
            raise BadInput("no block matrices (attention / MLP weights of residual blocks) in the base")
        rows: list[dict] = []
        methods = ["ta"] if method == "ta" else ["ta", method]
        for name in methods:
            for key, delta in merged_deltas(base, experts, name, names=names, params=params if name == method else {},
                                            keys=keys, device=device, memory_budget=args.memory_budget << 20,
                                            progress=_progress_on(args)):
                rows += _rank_rows(name, key, delta)
                boosted = boost_task_vector({key: delta}, beta, **options)[key]
                rows += _rank_rows(f"{name}+sb", key, boosted)
    if not rows:
        raise BadInput("every block matrix of the merged task vectors is zero (are the experts identical to the base?)")
    table = pd.DataFrame(rows)
    front = ["variant", "key", "layer", "sublayer", "rows", "cols", "stable_rank", "energy_rank_50", "energy_rank_30"]
    table = table[[c for c in front if c in table] + [c for c in table if c not in front]]
    if args.format == "csv":
        text = table.to_csv(index=False)
    elif args.format == "json":
        text = json.dumps(dict(beta=beta, method=method, params=params, experts=names,
                               rows=json.loads(table.to_json(orient="records"))), indent=1) + "\n"
    else:
        summary = table.groupby("variant", sort=False)[["stable_rank", "energy_rank_50", "energy_rank_30"]].mean()
        text = (table.drop(columns=[c for c in ("stack", "layer_type", "max_rank") if c in table]).to_string(index=False)
                + "\n\nmean over block matrices:\n" + summary.to_string(float_format=lambda x: f"{x:.2f}") + "\n")
    _write_report_outputs(args, text, lambda path, fmt: _plot_ranks(table, path, fmt, beta), fmt)
    if args.output is not None:
        print(f"wrote {args.output} ({len(table)} rows)")
    else:
        sys.stdout.write(text)
    if args.plot is not None:
        print(f"wrote {args.plot}", file=sys.stderr if args.output is None else sys.stdout)
    return 0


def _plot_ranks(table: Any, path: Path, fmt: str, beta: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subs = list(dict.fromkeys(table["sublayer"]))
    fig, axes = plt.subplots(1, len(subs), figsize=(3.6 * len(subs), 3.2), squeeze=False, sharey=True)
    for ax, sub in zip(axes[0], subs):
        part = table[table["sublayer"] == sub]
        for variant, grp in part.groupby("variant", sort=False):
            ax.plot(grp["layer"], grp["stable_rank"], marker="o", ms=3, label=variant,
                    ls="--" if variant.endswith("+sb") else "-")
        ax.set_title(sub)
        ax.set_xlabel("layer")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("stable rank")
    axes[0][-1].legend(fontsize=7, title=f"SB β = {beta:g}", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format=fmt, dpi=150, bbox_inches="tight")
    plt.close(fig)


def cmd_select(args: argparse.Namespace) -> int:
    """``subboost select``."""
    import numpy as np
    import pandas as pd

    from subboost.streaming import block_keys, iter_task_vectors

    try:
        from subboost import hogsvd
    except ImportError as err:  # pragma: no cover - hogsvd ships with the package
        raise BadInput(f"HO-GSVD is not available: {err}") from None
    if not args.pi > 0:
        raise BadInput(f"--pi must be > 0, got {args.pi}")
    fmt = _plot_format(args.plot)
    device = _device(args.device)
    with _open_inputs(args) as (base, experts, names, paths):
        _check_report_outputs(args, paths)
        if len(experts) < 2:
            raise BadInput("an alignment matrix needs at least 2 experts")
        unknown = [p for p in list(args.pool) + list(args.candidates or []) if p not in names]
        if unknown:
            raise BadInput(f"not an expert name: {unknown} (experts: {', '.join(names)})")
        candidates = list(args.candidates) if args.candidates else [n for n in names if n not in args.pool]
        if args.k > len(candidates):
            raise BadInput(f"--k {args.k} is more than the {len(candidates)} candidates")
        keys = block_keys(base, args.layers)
        if not keys:
            raise BadInput("no block matrices (attention / MLP weights of residual blocks) in the base")
        per_layer: list[np.ndarray] = []
        used: list[str] = []
        for key, deltas in iter_task_vectors(base, experts, keys, names=names, device=device,
                                             progress=_progress_on(args), desc="HO-GSVD"):
            if all(not bool(d.any()) for d in deltas):
                continue
            res = hogsvd.alignment_matrix([{key: d} for d in deltas], keys=[key], pi=args.pi, names=names)
            per_layer.append(res.per_layer[key])
            used.append(key)
    if not per_layer:
        raise BadInput("every block matrix of the task vectors is zero")
    mean = np.mean(np.stack(per_layer), axis=0)
    mean = 0.5 * (mean + mean.T)
    np.fill_diagonal(mean, 0.0)
    frame = pd.DataFrame(mean, index=names, columns=names)
    sel = hogsvd.select_experts(frame, list(args.pool), candidates, args.k, method=args.selection)
    result = dict(
        experts=names, pool=list(args.pool), candidates=candidates, k=args.k, selected=sel.selected,
        order=sel.order, score=sel.score, mean_alignment=sel.mean_alignment, search=sel.method,
        pi=args.pi, n_matrices=len(used), alignment=[[float(x) for x in row] for row in mean],
        note="alignment: paper Eq. 7, higher = better aligned (less interference)",
    )
    text = json.dumps(result, indent=1) + "\n"
    _write_report_outputs(args, text, lambda path, fmt: _plot_alignment(frame, list(args.pool), sel.selected, path, fmt), fmt)
    if args.output is not None:
        print(f"wrote {args.output}; selected: {', '.join(map(str, sel.selected))}")
    else:
        sys.stdout.write(text)
    if args.plot is not None:
        print(f"wrote {args.plot}", file=sys.stderr if args.output is None else sys.stdout)
    return 0


def _plot_alignment(frame: Any, pool: list[str], selected: list[str], path: Path, fmt: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(frame)
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * n, 0.8 + 0.4 * n))
    im = ax.imshow(frame.to_numpy(), cmap="viridis")
    ax.set_xticks(range(n), frame.columns, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), frame.index, fontsize=8)
    for lab in ax.get_xticklabels() + ax.get_yticklabels():
        if lab.get_text() in pool:
            lab.set_fontweight("bold")
        elif lab.get_text() in selected:
            lab.set_color("tab:red")
    fig.colorbar(im, ax=ax, label="alignment (higher = less interference)")
    ax.set_title("HO-GSVD alignment (bold: pool, red: selected)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format=fmt, dpi=150, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------- entry point


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code (0 ok, 1 internal error, 2 bad input,
    130 SIGINT, 143 SIGTERM, 129 SIGHUP)."""
    from subboost.io import InputError, ReceivedSignal, interrupt_signals

    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"subboost {args.command}"
    received = ReceivedSignal()
    try:
        with interrupt_signals() as received:
            if getattr(args, "threads", None):
                import torch

                torch.set_num_threads(args.threads)  # this process is the application: its choice
            return int(args.func(args))
    except BaseException as err:
        if received.signum is not None or isinstance(err, KeyboardInterrupt):
            # native code may have turned the signal's exception into another one
            name = "SIGINT" if received.signum is None else signal_name(received.signum)
            sys.stderr.write(f"{prog}: interrupted ({name})\n")
            return received.exit_code or EXIT_INTERRUPTED
        if not isinstance(err, Exception):
            raise
        bad = isinstance(err, (BadInput, InputError, ValueError, OSError))
        if args.debug or not bad:
            raise
        sys.stderr.write(f"{prog}: error: {_one_line(err)}\n")
        return EXIT_BAD_INPUT


def signal_name(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


if __name__ == "__main__":
    sys.exit(main())
