"""Command line: thin sub-commands that parse options and call one function each."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from defungi.config import RULES
from defungi.errors import DefungiError
from defungi.results.schema import to_dict
from defungi.results.trust import DEFAULT_ABSTAIN, DEFAULT_COVERAGE
from defungi.utils import check_output, fewer_collections

log = logging.getLogger("defungi")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Dotted config overrides from the common training flags and --set KEY=VALUE."""
    values = {
        "data.split": args.split,
        "data.image_size": args.image_size,
        "data.seed": args.seed,
        "train.model": getattr(args, "model", None),
        "train.epochs": args.epochs,
        "train.batch_size": args.batch_size,
        "train.lr": args.lr,
        "train.device": args.device,
        "data.cv_folds": getattr(args, "cv_folds", None),
        "train.pretrained": True if args.pretrained else None,
        "train.weights": args.weights,
    }
    for item in args.set or []:
        if "=" not in item:
            raise DefungiError(f"--set wants KEY=VALUE (e.g. train.optimizer=sgd), got '{item}'")
        key, value = item.split("=", 1)
        values[key.strip()] = value.strip()
    return values


def _add_config_flags(p: argparse.ArgumentParser, model: bool = True) -> None:
    """The options every training command shares (a study trains its own model: no --model)."""
    p.add_argument(
        "--data",
        help="folder of class folders, or a .zip of one (default: $DEFUNGI_DATA, the cached release, or fetch it)",
    )
    _add_profile(p)
    split_help = "grouped: no specimen in two parts (default); random: as the published study"
    p.add_argument("--split", choices=["grouped", "random"], help=split_help)
    if model:
        from defungi.models import list_models  # the registry's names load without torch

        p.add_argument(
            "--model",
            help=f"{', '.join(list_models())}, any timm model name, or pretrained ones joined by + "
            "(efficientnet-lite0+efficientnet-lite2: their features side by side under one head)",
        )
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--image-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1")
    p.add_argument("--pretrained", action="store_true", help="start from the model's ImageNet weights (head replaced)")
    p.add_argument("--weights", metavar="PATH", help="start from weights in a file (a state dict or a checkpoint)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any config key, e.g. --set train.optimizer=sgd (repeatable)",
    )


def _add_profile(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--profile",
        default="quick",
        help="quick (2-core CPU: the main job in 3 hours), full (quick before that budget), paper (GPU, 224 px), "
        "transfer, or a lab's own .toml file (its name: its profile key, else its file's)",
    )


def _config(args: argparse.Namespace, leave_out: Sequence[str] = ()) -> Any:
    from defungi.config import load_config
    from defungi.data.scan import resolve_data

    overrides = {k: v for k, v in _overrides(args).items() if k not in leave_out}
    overrides["data.root"] = str(resolve_data(args.data))
    return load_config(args.profile, overrides)


def _decoding_ahead(config: Any, out: str | None) -> contextlib.AbstractContextManager[None]:
    """A new run's images decoding in other processes while this one imports torch and the rest
    (seconds of one core; data.cache.decoding_ahead). Nothing for --resume, a finished run, a rank of
    torchrun (each would decode), nor where the data cannot be read: the job says why, in its turn."""
    from defungi.data.cache import decoding_ahead
    from defungi.data.scan import scan
    from defungi.layout import RunLayout

    if config is None or not config.data.root or "WORLD_SIZE" in os.environ or RunLayout(Path(out)).metrics.exists():
        return contextlib.nullcontext()
    try:
        return decoding_ahead(scan(config.data.root), config.data.image_size)
    except DefungiError:
        return contextlib.nullcontext()


# options a resumed run takes from its own config.json
RESUME_FIXED = ("data", "split", "model", "epochs", "batch_size", "lr", "image_size", "seed", "device", "set")
RESUME_FIXED += ("cv_folds", "weights", "pretrained")


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume:
        fixed = [k for k, v in vars(args).items() if k in RESUME_FIXED and v not in (None, False)]
        given = [f"--{'cv' if k == 'cv_folds' else k.replace('_', '-')}" for k in fixed]
        if given or args.out:
            raise DefungiError(
                f"--resume continues {args.resume} with the config it was started with; drop "
                f"{', '.join(given + (['--out'] if args.out else []))} (or train into a new --out)"
            )
    elif not args.out:
        raise DefungiError("give --out RUN_DIR (or --resume RUN_DIR)")
    config = None if args.resume else _config(args)
    with _decoding_ahead(config, args.out):
        from defungi.jobs import resume_job, train_job
        from defungi.report.page import metrics_line

        record = resume_job(Path(args.resume)) if config is None else train_job(config, Path(args.out))
    if record is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    metrics = record.metrics
    scores = metrics.reported
    what = f"{metrics.protocol.cv('cross-validation')}, out of fold" if metrics.kind == "cv" else metrics.reported_name
    print(metrics_line(f"{metrics.model} {what}, per image", scores))
    if scores.samples is not None:
        print(metrics_line(f"{metrics.model} {what}, per specimen", scores.samples))
    print(f"run folder: {record.path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from defungi.jobs import evaluate_job
    from defungi.report.page import metrics_line
    from defungi.report.reliability import card_table

    evaluation, folder = evaluate_job(
        Path(args.run_dir),
        Path(args.data),
        Path(args.out) if args.out else None,
        args.tta,
        args.prior_weight,
        _answer_settings(args),
        args.group_by,
    )
    if args.json:
        print(json.dumps({k: v for k, v in to_dict(evaluation).items() if k != "excluded"}, indent=2))
        return 0
    scores = evaluation.scores
    print(metrics_line(f"{args.run_dir} on {args.data}, per image", scores))
    if scores.samples is not None:
        print(metrics_line(f"{args.run_dir} on {args.data}, per specimen", scores.samples))
    print("per class (images):")
    for c, row in scores.per_class.items():
        print(f"  {c:>6}  precision {row.precision:.3f}  recall {row.recall:.3f}  F1 {row.f1:.3f}  n={row.support}")
    for unit, check in evaluation.sets.items():
        low, high = check.coverage_interval
        print(
            f"sets at {evaluation.level:.0%}, per {unit}: coverage {check.coverage:.3f} [{low:.3f}, {high:.3f}], "
            f"mean size {check.mean_size:.2f}, sets of one class {check.singleton_share:.0%} (n={check.n})"
        )
    for check in evaluation.promises:
        print(f"selective answers at {check.target_accuracy:.0%}: {check.summary()}")
    if evaluation.selective is not None and evaluation.selective not in evaluation.promises:
        print(f"selective answers at {evaluation.selective.target_accuracy:.0%}: {evaluation.selective.summary()}")
    if evaluation.ood is not None:
        print(evaluation.ood.summary())
    for unit, c in evaluation.calibration.items():
        print(
            f"calibration per {unit} (T={c.temperature:.2f}): ECE {c.raw.ece:.3f} raw, {c.calibrated.ece:.3f} "
            f"calibrated; NLL {c.nll_raw:.3f} raw, {c.nll_calibrated:.3f} calibrated (n={c.n})"
        )
    if evaluation.card:
        print("model card check:")
        print(card_table(evaluation.card).text())
    print(f"excluded {len(evaluation.excluded)} images; report: {folder / 'report.html'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from defungi.serve.format import format_predictions
    from defungi.serve.predict import predict_files

    result = predict_files(
        args.run_dir,
        args.paths,
        args.backend,
        args.tta,
        args.prior_weight,
        _answer_settings(args),
        args.by_specimen,
        args.group_by,
    )
    print(format_predictions(result, args.format), end="")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from defungi.serve.export import export_onnx

    result = export_onnx(args.run_dir, args.out, args.opset)
    print(
        f"wrote {result.path} (ONNX opset {result.opset}); largest difference to PyTorch on "
        f"{result.checked_on}: {result.max_abs_diff:.1e}"
    )
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from defungi.serve.explain import explain

    check_output(Path(args.out), "--out")
    written = explain(args.run_dir, args.images, args.out, args.target, tta=args.tta, prior_weight=args.prior_weight)
    print(f"{len(written)} explanation figures in {args.out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from defungi.serve.web import serve

    serve(args.run_dir, args.host, args.port)
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from defungi.data.scan import fetch

    if args.dest:
        check_output(Path(args.dest), "--dest")
    root = fetch(args.dest, args.url)
    print(f"DeFungi release ready: {root}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from defungi.data.scan import default_cache_dir
    from defungi.data.store import COMPUTED, cache_parts, clear

    root = default_cache_dir()
    parts = cache_parts(root)
    for name, size, files in parts:
        print(f"{name:<9} {size / 2**20:9.1f} MB  {files:6d} files  {root / name}")
    print(f"{'total':<9} {sum(p[1] for p in parts) / 2**20:9.1f} MB  (set DEFUNGI_CACHE to move it)")
    if args.clear:
        for name in COMPUTED:
            clear(root / name)
        print(f"cleared: {', '.join(COMPUTED)} (the next run decodes and computes features again)")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from defungi.data.scan import resolve_data
    from defungi.jobs import audit_job

    check_output(Path(args.out), "--out")
    print(f"audit: {audit_job(resolve_data(args.dir), Path(args.out), args.variance_threshold)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from defungi.config import load_config
    from defungi.data.scan import resolve_data
    from defungi.jobs import main_job

    config = load_config(args.profile, {"data.root": str(resolve_data(args.data))})
    page, table = main_job(config, Path(args.out), profile=args.profile)
    print(table.markdown())
    print(f"report: {page}")
    return 0


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ruled(key: str, kind: type[int] | type[float] = float) -> Callable[[str], Any]:
    """An option's parser for a value of the config key: read as kind, refused as config.RULES[key]
    refuses it (its fix named), so that an option and its key accept the same values."""
    rule = RULES[key]

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}': {rule.fix}") from None
        if not rule.ok(value):
            raise argparse.ArgumentTypeError(f"'{text}': {rule.fix}")
        return value

    return parse


def _ruled_list(key: str, kind: type[int] | type[float] = float) -> Callable[[str], list[Any]]:
    """A comma-separated list of values of the config key, one or more (see _ruled)."""
    one = _ruled(key, kind)

    def parse(text: str) -> list[Any]:
        values = [one(v.strip()) for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"'{text}': give one value or more, comma-separated ({RULES[key].fix})")
        return values

    return parse


def _share(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:  # also NaN
        raise argparse.ArgumentTypeError(f"{text}: give a confidence between 0 and 1")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:  # also NaN
        raise argparse.ArgumentTypeError(f"{text}: give a share of the data in (0, 1], e.g. 0.2")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text}: give a TCP port from 1 to 65535, e.g. 8000")
    return value


def _study(name: str) -> str:
    from defungi.jobs import study_names  # the studies' registry, imported once a study command is parsed

    if name not in study_names():
        raise argparse.ArgumentTypeError(f"unknown study '{name}'; known: {', '.join(study_names())}")
    return name


def _seconds(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"'{text}': give a whole number of seconds, 1 or more, e.g. 30")
    return int(text)


def cmd_curve(args: argparse.Namespace) -> int:
    from defungi.jobs import curve_job
    from defungi.report.search import curve_summary

    check_output(Path(args.out), "--out")
    result = curve_job(_config(args), Path(args.out), args.fraction, args.sizes, args.cv)
    print(curve_summary(result, Path(args.out)))
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from defungi.jobs import grid_job
    from defungi.report.search import grid_summary

    grid = {"train.batch_size": args.batch_sizes, "train.lr": args.lrs} | _grid_axes(args.param or [])
    check_output(Path(args.out), "--out")
    result = grid_job(_config(args), Path(args.out), args.fraction, grid, args.storage, args.heartbeat)
    print(grid_summary(result, Path(args.out)))
    return 0


def _grid_axes(items: list[str]) -> dict[str, list[Any]]:
    """--param KEY=V1,V2 as grid axes: numbers or words (what Optuna can queue; no lists or tables)."""
    axes = {}
    for item in items:
        key, _, values = item.partition("=")
        try:
            if not key or not values:
                raise ValueError(item)
            axes[key] = [json.loads(v) if v[:1].isdigit() or v[:1] == "-" else v for v in values.split(",")]
        except ValueError:  # json.JSONDecodeError is one
            raise DefungiError(
                f"--param {item}: give KEY=V1,V2 with numbers or words, e.g. train.weight_decay=0.01,0.05"
            ) from None
    return axes


def cmd_study(args: argparse.Namespace) -> int:
    from defungi.jobs import study_job

    options = {k: v for k, v in _overrides(args).items() if k.split(".")[0] == "study"}  # the study's, not the run's
    out = Path(args.out or f"runs/study-{args.name}")
    check_output(out, "--out")
    config = _config(args, leave_out=list(options))
    print(f"report: {study_job(args.name, config, out, options, profile=args.profile)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from defungi.jobs import compare_job, redraw_job, report_job, study_dirs

    for folder in args.folders:
        check_output(Path(folder), "report")
    if args.compare or not args.folders:
        check_output(Path(args.out), "--out")
    if args.compare:
        print(f"report: {compare_job([Path(d) for d in args.compare], Path(args.out))}")
        return 0
    for folder in args.folders:
        print(f"{folder}: {', '.join(str(p) for p in redraw_job(Path(folder)))}")
    if not args.folders:
        studies = [Path(d) for d in args.studies] if args.studies else study_dirs(Path("runs"))
        plan_path = studies[0].parent / "plan.json"  # the main job's, beside its study folders
        print(f"report: {report_job(studies, Path(args.out), [Path(r) for r in args.runs], plan_path)}")
    return 0


Commands = argparse._SubParsersAction  # what add_subparsers returns (argparse gives it no public name)

PRIOR_HELP = (
    "weight of the training class frequencies in the decision, 0..1 "
    "(default: as trained; 0 treats the classes as equally common)"
)


def _train_parser(sub: Commands) -> None:
    """defungi train: one model into a run folder (or --resume it)."""
    p = sub.add_parser("train", help="train one model into a run folder")
    _add_config_flags(p)
    p.add_argument("--out", help="run folder to create")
    p.add_argument(
        "--cv", dest="cv_folds", type=int, metavar="K", help="K-fold cross-validation (grouped unless --split random)"
    )
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its folder")
    p.set_defaults(func=cmd_train)


def _evaluate_parser(sub: Commands) -> None:
    """defungi evaluate: a trained run scored on a labelled folder."""
    p = sub.add_parser(
        "evaluate", help="answer a labelled folder as a lab would; score the answers, sets and refusals (report.html)"
    )
    p.add_argument("run_dir")
    p.add_argument("--data", required=True, help="folder of class folders (images the model never saw)")
    p.add_argument(
        "--out",
        help="where to write metrics.json, the tables, figures and report.html (default: RUN_DIR/evaluations/NAME)",
    )
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average the 8 flips/rotations (default: as trained)",
    )
    p.add_argument("--prior-weight", type=_ruled("train.prior_weight"), default=None, help=PRIOR_HELP)
    _add_group_by(p)
    _add_answer_options(p)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=cmd_evaluate)


def _predict_parser(sub: Commands) -> None:
    """defungi predict: class and probabilities per image, or per specimen."""
    p = sub.add_parser("predict", help="class and probabilities for images or folders")
    p.add_argument("run_dir")
    p.add_argument("paths", nargs="+")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument(
        "--by-specimen",
        "--by-sample",
        dest="by_specimen",
        action="store_true",
        help="one decision per specimen (its images pooled by the run's train.specimen_rule; default: the mean); "
        "--by-sample is the same",
    )
    _add_group_by(p)
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--prior-weight", type=_ruled("train.prior_weight"), default=None, help=PRIOR_HELP)
    _add_answer_options(p)
    p.add_argument(
        "--backend",
        choices=["torch", "onnx"],
        default="torch",
        help="onnx: onnxruntime on RUN_DIR/model.onnx (or a .onnx file) from 'defungi export', without torch",
    )
    p.set_defaults(func=cmd_predict)


def _add_group_by(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--group-by",
        default="name",
        metavar="name|folder|REGEX",
        help="what makes a specimen: DeFungi names (H1_100a_3 -> H1_100; default), one folder each, or a regex on "
        "the file name (its first group)",
    )


def _add_answer_options(p: argparse.ArgumentParser) -> None:
    """How answers are given (serve.predict.Answers): the sets' level, abstention, a target accuracy."""
    p.add_argument(
        "--coverage",
        type=_share,
        default=DEFAULT_COVERAGE,
        metavar="L",
        help=f"prediction sets that hold the true class with probability L (default {DEFAULT_COVERAGE:g}; "
        "the levels the run calibrated)",
    )
    p.add_argument(
        "--abstain",
        type=_share,
        default=DEFAULT_ABSTAIN,
        metavar="P",
        help="answer an image 'uncertain' below this calibrated confidence and leave it out of its specimen's "
        f"decision (0..1; default {DEFAULT_ABSTAIN:g}: always a class)",
    )
    p.add_argument(
        "--target-accuracy",
        type=_share,
        default=None,
        metavar="A",
        help="answer 'not sure: look yourself' for specimens under the confidence threshold that Learn-then-Test "
        "shows, on the run's held-out specimens, to give at least accuracy A on the specimens answered (a promise "
        "that holds with probability 90%%; says which share to expect answered)",
    )


def _answer_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"coverage": args.coverage, "abstain": args.abstain, "target_accuracy": args.target_accuracy}


def _export_parser(sub: Commands) -> None:
    """defungi export: the run's model as ONNX."""
    p = sub.add_parser("export", help="the run's model as ONNX, checked against PyTorch on the run's images")
    p.add_argument("run_dir")
    p.add_argument("--out", help="ONNX file to write (default: RUN_DIR/model.onnx)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset, 13 to 20 (default: 17)")
    p.set_defaults(func=cmd_export)


def _explain_parser(sub: Commands) -> None:
    """defungi explain: class activation map figures."""
    p = sub.add_parser("explain", help="figures of where the evidence for a class lies (HiResCAM)")
    p.add_argument("run_dir")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True, help="folder for the figures")
    p.add_argument(
        "--class", dest="target", metavar="C", help="the class whose evidence to show (default: the predicted one)"
    )
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--prior-weight", type=_ruled("train.prior_weight"), default=None, help=PRIOR_HELP)
    p.set_defaults(func=cmd_explain)


def _serve_parser(sub: Commands) -> None:
    """defungi serve: the local web page."""
    p = sub.add_parser("serve", help="a local web page: drop a specimen's images, see classes, Grad-CAM, decision")
    p.add_argument("run_dir")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=_port, default=8000)
    p.set_defaults(func=cmd_serve)


def _data_parser(sub: Commands) -> None:
    """defungi data fetch | audit."""
    p = sub.add_parser("data", help="data set utilities")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    f = data_sub.add_parser("fetch", help="download the public DeFungi release (UCI id 773)")
    f.add_argument("--dest", help="folder to download into (default: the user cache)")
    f.add_argument("--url", help="archive URL (default: the UCI address, or $DEFUNGI_URL)")
    f.set_defaults(func=cmd_fetch)
    a = data_sub.add_parser("audit", help="counts, outliers, duplicates across specimens, random-split leakage: a page")
    a.add_argument("dir", nargs="?", help="folder of class folders (default: $DEFUNGI_DATA or the cached release)")
    a.add_argument("--out", default="runs/audit")
    a.add_argument("--variance-threshold", type=float, default=15.0, help="outliers: grey variance under this (15)")
    a.set_defaults(func=cmd_audit)


def _cache_parser(sub: Commands) -> None:
    """defungi cache: what the user cache holds; --clear empties it."""
    p = sub.add_parser("cache", help="the user cache's size (decoded images, features, engines); --clear empties it")
    p.add_argument("--clear", action="store_true", help="remove what it computed (not a downloaded data set)")
    p.set_defaults(func=cmd_cache)


def _curve_parser(sub: Commands) -> None:
    """defungi curve: a learning curve."""
    p = sub.add_parser("curve", help="learning curve: validation macro-F1 and loss against training-set size")
    _add_config_flags(p)
    p.add_argument("--out", required=True)
    p.add_argument("--fraction", type=_fraction, default=1.0, help="share of the data the curve uses (e.g. 0.2)")
    p.add_argument(
        "--sizes", type=_floats, default=[0.25, 0.5, 0.75, 1.0], help="training-set fractions, comma-separated"
    )
    folds = _ruled("data.cv_folds", int)
    p.add_argument("--cv", type=folds, default=0, help="K-fold cross-validation (0: one validation set)")
    p.set_defaults(func=cmd_curve)


def _grid_parser(sub: Commands) -> None:
    """defungi grid: a grid search, shared by workers through --storage."""
    p = sub.add_parser("grid", help="grid search over batch size x learning rate (Optuna, resumable)")
    _add_config_flags(p)
    p.add_argument("--out", required=True)
    p.add_argument("--fraction", type=_fraction, default=1.0, help="share of the data (1.0: the full training set)")
    p.add_argument("--batch-sizes", type=_ruled_list("train.batch_size", int), default=[32, 64, 128])
    p.add_argument("--lrs", type=_ruled_list("train.lr"), default=[5e-4, 1e-3, 2e-3, 4e-3])
    p.add_argument(
        "--param", action="append", metavar="KEY=V1,V2", help="another grid axis, e.g. train.weight_decay=0.01,0.05"
    )
    p.add_argument(
        "--storage",
        help="Optuna storage URL shared by workers, e.g. postgresql://user@host/db (default: SQLite in --out)",
    )
    p.add_argument(
        "--heartbeat",
        type=_seconds,
        metavar="S",
        help="a worker's trial says it is alive every S seconds; one silent for 4xS is retried (default 30)",
    )
    p.set_defaults(func=cmd_grid)


class _StudyHelp(argparse.Action):
    """-h/--help of `defungi study`: its NAME's help lists the published studies, read from their registry
    only when the help is shown (importing it takes seconds, too long for every command's parser)."""

    def __init__(self, option_strings: list[str], dest: str, name: argparse.Action, help: str) -> None:
        super().__init__(option_strings, argparse.SUPPRESS, nargs=0, default=argparse.SUPPRESS, help=help)
        self.name = name

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from defungi.jobs import study_names

        self.name.help = f"a published study: {', '.join(study_names())}"
        parser.print_help()
        parser.exit()


def _study_parser(sub: Commands) -> None:
    """defungi study NAME: a published study."""
    p = sub.add_parser("study", help="a published study, every step, resumable, ending in a report", add_help=False)
    name = p.add_argument("name", type=_study, help="a published study")
    p.add_argument("-h", "--help", action=_StudyHelp, name=name, help="show this help message and exit")
    _add_config_flags(p, model=False)
    p.add_argument("--out", help="study folder (default: runs/study-NAME)")
    p.set_defaults(func=cmd_study)


def _report_parser(sub: Commands) -> None:
    """defungi report: pages and figures redrawn from folders."""
    p = sub.add_parser(
        "report", help="redraw a run or study folder from its files, or one page with both studies' final models"
    )
    p.add_argument("folders", nargs="*", help="run or study folders to redraw (figures, report.html) without a model")
    p.add_argument("--studies", nargs="+", help="study folders (default: runs/study-NAME of every published study)")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="finished runs side by side, with intervals")
    p.add_argument("--runs", nargs="*", default=[], metavar="RUN", help="finished runs to show beside the studies")
    p.add_argument("--out", default="runs/report")
    p.set_defaults(func=cmd_report)


def _run_parser(sub: Commands) -> None:
    """defungi run: the main job."""
    p = sub.add_parser("run", help="the main job: both studies (resumable), then the combined report")
    p.add_argument("--data")
    p.add_argument("--out", default="runs/main")
    _add_profile(p)
    p.set_defaults(func=cmd_run)


def build_parser() -> argparse.ArgumentParser:
    """The `defungi` command line: its global options and one sub-command per job."""
    parser = argparse.ArgumentParser(prog="defungi", description="Classify microscope images of fungi (DeFungi).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _train_parser,
        _evaluate_parser,
        _predict_parser,
        _export_parser,
        _explain_parser,
        _serve_parser,
        _data_parser,
        _cache_parser,
        _curve_parser,
        _grid_parser,
        _study_parser,
        _report_parser,
        _run_parser,
    ):
        add(sub)
    return parser


def _distributed(args: argparse.Namespace) -> int:
    """A command under torchrun: only train runs there; the process group is left at the end."""
    from defungi.train import distributed

    if args.command != "train":
        raise DefungiError(f"torchrun runs 'defungi train' only, not '{args.command}'; run it without torchrun")
    try:
        return args.func(args)
    finally:
        distributed.teardown()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `defungi` console script."""
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 is printed escaped, not a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    first = os.environ.get("RANK", "0") in ("", "0")  # torchrun's rank: the others log warnings only
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO if first else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        if "TORCHELASTIC_RUN_ID" in os.environ or (args.command == "train" and "WORLD_SIZE" in os.environ):
            return _distributed(args)  # started by torchrun (or another launcher of train)
        return args.func(args)
    except DefungiError as exc:
        print(f"defungi: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("defungi: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def run() -> None:
    """The `defungi` command and `python -m defungi`: main, then an exit whose last garbage collections
    skip every object left (gc.freeze): a second sooner once torch is loaded (measured here: 1.07 s
    against 0.18 s), with nothing left to collect that an exit needs; collections are rarer all along
    (utils.fewer_collections)."""
    fewer_collections()
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
