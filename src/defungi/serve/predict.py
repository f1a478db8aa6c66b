"""Class and probabilities for image files or folders, and one decision per specimen."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from defungi.data.cache import DECODE_ERRORS, decode_one
from defungi.data.quality import low_variance
from defungi.data.scan import IMAGE_SUFFIXES, parse_name
from defungi.data.store import StoredRows
from defungi.errors import DefungiError
from defungi.layout import RunLayout
from defungi.results.answers import ImageAnswer, SpecimenAnswer
from defungi.results.run import ModelCard, SelectiveCheck
from defungi.results.trust import DEFAULT_ABSTAIN, DEFAULT_COVERAGE, SelectivePromise, Trust, Unit
from defungi.serve.lite import BATCH, onnx_predictor
from defungi.serve.predictor import Inputs, Predictor, Scores, run_inputs, torch_predictor
from defungi.stats.conformal import prediction_sets, set_label
from defungi.stats.metrics import classification_metrics, specimen_probabilities, temper
from defungi.stats.refusal import REFUSE, refusal_tiers
from defungi.stats.selective import DELTA
from defungi.train.assess import selective_promise
from defungi.utils import prefetched

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx")
CHUNK = 256  # images to classify decoded, then answered, at a time (whole batches of the engines)
AHEAD = 3  # chunks decoded ahead while a model loads (about 800 images: the load's time on the other core)


def open_predictor(source: str | Path, backend: str = "torch", device: str = "auto") -> Predictor:
    """The model of a run folder with PyTorch, or with onnxruntime from SOURCE/model.onnx (or a .onnx file)."""
    if backend == "onnx":
        path = Path(source)
        return onnx_predictor(RunLayout(path).onnx if path.is_dir() else path)
    if backend != "torch":
        raise DefungiError(f"unknown backend '{backend}'; use one of {', '.join(BACKENDS)}")
    return torch_predictor(source, device)


def expand_paths(paths: list[str | Path]) -> list[Path]:
    """Image files named directly, and every image file under named folders."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise DefungiError(f"{p}: no such file or folder")
    if not files:
        raise DefungiError(f"no image files (.jpg/.png/.tif/.bmp) in {', '.join(map(str, paths))}")
    return files


def predict(
    model: Predictor,
    paths: list[str | Path],
    tta: bool | None = None,
    prior_weight: float | None = None,
    answers: Answers | None = None,
) -> list[ImageAnswer]:
    """One answer per file (see ImageAnswer). An answer holds the path, the class the folder or the file name gives
    ('label', when it is a class of the model), and the predicted class with the probability of each
    class under 'probabilities' (class -> probability: never beside the fields, so that a class may be
    called 'class' or 'status'); or 'no fungus visible' for an image under the run's variance threshold
    (blank or blurred: training leaves such images out, so they are not classified; its 'grey_variance'
    and the 'variance_threshold' beside it), 'not a fungus micrograph' for one whose out-of-distribution score
    ('ood', see train.ood) is over stats.refusal.REFUSE, or the error (`reason` says which, with its figures).
    The class probabilities are the model's, as the run scored them, and 'probability' the most
    probable class's; 'confidence' is that probability calibrated as the run measured it helped, 'set'
    the classes the image's prediction set holds (see Answers), and 'decision' the class or 'uncertain'."""
    chunks = prefetched(decoded_chunks(model.inputs, expand_paths(paths)), 1)  # the next decodes as one computes
    return answered(model, chunks, tta, prior_weight, answers or Answers.of(model))


def answered(
    model: Predictor,
    chunks: Iterable[tuple[list[ImageAnswer], Decoded]],
    tta: bool | None,
    prior_weight: float | None,
    answers: Answers,
) -> list[ImageAnswer]:
    """classify's rows of every chunk of decoded_chunks."""
    return [row for rows, decoded in chunks for row in classify(model, rows, decoded, tta, prior_weight, answers)]


@dataclass(frozen=True)
class Decoded:
    """The images of a decode that are to be classified: their paths and pixels (one row each, at the
    model's input size), in the same order."""

    paths: list[str]
    images: np.ndarray | StoredRows  # n x size x size x 3 uint8 (from the decode cache: read batch by batch)

    @classmethod
    def of(cls, pixels: dict[str, np.ndarray], size: int) -> Decoded:
        """From path -> pixels (stacked here: in a decoding thread, off the engine's path)."""
        images = np.stack(list(pixels.values())) if pixels else np.zeros((0, size, size, 3), dtype=np.uint8)
        return cls(list(pixels), images)


def decoded_chunks(inputs: Inputs, files: list[Path]) -> Iterator[tuple[list[ImageAnswer], Decoded]]:
    """decode's rows and images, a whole batch of the engines first (so that the engine starts soon),
    then CHUNK images to classify at a time."""
    rows: list[ImageAnswer] = []
    pixels: dict[str, np.ndarray] = {}
    size = BATCH
    for f in files:
        more, image = _decoded(inputs, f)
        rows += more
        pixels |= image
        if len(pixels) == size:
            yield rows, Decoded.of(pixels, inputs.image_size)
            rows, pixels, size = [], {}, CHUNK
    if rows:
        yield rows, Decoded.of(pixels, inputs.image_size)


def decode(inputs: Inputs, files: list[Path]) -> tuple[list[ImageAnswer], Decoded]:
    """An answer per file (its error, or 'no fungus visible' with its grey variance and the run's threshold,
    where it cannot be classified) and the images to classify, at the model's input size."""
    rows: list[ImageAnswer] = []
    pixels: dict[str, np.ndarray] = {}
    for f in files:
        more, image = _decoded(inputs, f)
        rows += more
        pixels |= image
    return rows, Decoded.of(pixels, inputs.image_size)


def _decoded(inputs: Inputs, f: Path) -> tuple[list[ImageAnswer], dict[str, np.ndarray]]:
    """decode of one file: its answer, and its pixels by path when it is to be classified."""
    try:
        image, variance, _ = decode_one(f, inputs.image_size, ahash=False)
    except DECODE_ERRORS as exc:
        log.warning("skipped %s: %s", f, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return [ImageAnswer(str(f), error=f"unreadable image ({type(exc).__name__})")], {}
    row = ImageAnswer(str(f), label=label_of(f, inputs.classes))
    if low_variance(np.array([variance]), inputs.variance_threshold)[0]:
        row.status, row.grey_variance, row.variance_threshold = NO_FUNGUS, variance, inputs.variance_threshold
        return [row], {}
    return [row], {str(f): image}


def classify(
    model: Predictor,
    rows: list[ImageAnswer],
    decoded: Decoded,
    tta: bool | None = None,
    prior_weight: float | None = None,
    answers: Answers | None = None,
    computed: Scores | None = None,
) -> list[ImageAnswer]:
    """The answers of decode (filled in, and returned) with the out-of-distribution score ('ood', where
    the run has a detector) of every decoded image, and the class, calibrated confidence, the class's
    probability, prediction set, decision and probabilities ('probabilities': class -> probability) of
    those that are not refused as 'not a fungus micrograph' (score over stats.refusal.REFUSE;
    'unlike_training' marks those answered with a score over 1: unlike the training micrographs;
    answers: as the run measured, by default; computed: the model's scores of the pixels when a pass
    already made them)."""
    if not decoded.paths:
        return rows
    answers = answers or Answers.of(model)
    probs, ood = model.answer(decoded.images, tta, prior_weight, computed)
    calibrated = temper(probs, model.temperature("image"))
    sets = answers.sets("image", calibrated, model.classes)
    refused, flagged = refusal_tiers(ood) if ood is not None else (np.zeros(len(probs), bool),) * 2
    at = {path: k for k, path in enumerate(decoded.paths)}
    for row in (r for r in rows if r.path in at):
        k, p = at[row.path], probs[at[row.path]]
        if ood is not None:
            row.ood = float(ood[k])
        if refused[k]:
            row.status = NOT_MICROGRAPH
            continue
        best, conf = model.classes[int(p.argmax())], float(calibrated[k].max())
        row.class_, row.confidence, row.probability = best, conf, float(p.max())
        row.decision = best if conf >= answers.abstain else UNCERTAIN
        answers.fill_set(row, sets, k, model.classes)
        row.probabilities = {c: float(v) for c, v in zip(model.classes, p, strict=True)}
        row.unlike_training = bool(flagged[k]) if ood is not None else None
    return rows


def probability_table(rows: list[ImageAnswer] | list[SpecimenAnswer], classes: list[str]) -> np.ndarray:
    """The probabilities of answered images or specimens as an array: a row each, a column per class of classes."""
    return np.array([[r.probabilities[c] for c in classes] for r in rows])


NO_FUNGUS = "no fungus visible"
NOT_MICROGRAPH = "not a fungus micrograph"  # out of distribution: far from every training micrograph
UNLIKE = "unlike the training specimens"  # answered, but nearer than a non-micrograph: a flag, not a refusal
UNCERTAIN = "uncertain"
NOT_SURE = "not sure: look yourself"


def reason(row: ImageAnswer | SpecimenAnswer) -> str:
    """Why an answer has no class, with its figures: an image's error, 'no fungus visible' with its grey
    variance and the run's threshold, 'not a fungus micrograph' with its refusal score; a specimen's
    status as it is; '' for an answer."""
    if isinstance(row, SpecimenAnswer):  # a specimen's status has no figure
        return row.status or ""
    if row.grey_variance is not None:
        figures = f"grey variance {row.grey_variance:.1f}, under the threshold {row.variance_threshold:g}"
        return f"{NO_FUNGUS} ({figures})"
    if row.status == NOT_MICROGRAPH and row.ood is not None:
        return f"{NOT_MICROGRAPH} (refusal score {row.ood:.2f}, refused over {REFUSE:g})"
    return row.error or row.status or ""


def flag(row: ImageAnswer) -> str:
    """An answered image's flag with its refusal score when it is unlike the training specimens, else ''."""
    return f"{UNLIKE} (score {row.ood:.2f}): check it" if row.unlike_training else ""


@dataclass(frozen=True)
class Answers:
    """How answers are given, from what the run measured on held-out specimens (`Predictor.trust`):
    prediction sets that hold the true class with probability `coverage`; images under `abstain`
    calibrated confidence answered 'uncertain' and left out of their specimen's decision; specimens
    under the threshold of the selective promise at `target_accuracy` (see SelectivePromise) answered
    'not sure: look yourself', whatever their set."""

    coverage: float = DEFAULT_COVERAGE
    abstain: float = DEFAULT_ABSTAIN
    trust: Trust | None = None
    selective: SelectivePromise | None = None

    @classmethod
    def of(
        cls,
        model: Predictor,
        coverage: float = DEFAULT_COVERAGE,
        abstain: float = DEFAULT_ABSTAIN,
        target_accuracy: float | None = None,
    ) -> Answers:
        """The answers of model at these settings; a level or target the run did not measure is one line."""
        trust = model.trust
        if trust is not None:
            levels = sorted({s.level for s in trust.sets})
            if not any(abs(level - coverage) < 1e-9 for level in levels):
                known = ", ".join(f"{level:g}" for level in levels)
                raise DefungiError(f"--coverage {coverage:g}: the run calibrated prediction sets at {known}; use one")
        selective = None
        if target_accuracy is not None:
            if trust is None:
                raise DefungiError(
                    "--target-accuracy needs a run that scored held-out specimens (--cv K or a test part)"
                )
            if not 0 < target_accuracy < 1:
                raise DefungiError(f"--target-accuracy {target_accuracy:g}: give a share between 0 and 1, e.g. 0.9")
            curve = trust.selective
            if not curve.units:
                raise DefungiError(
                    "--target-accuracy: this run was trained before selective answers came with a promise; "
                    "train it again to use it"
                )
            selective = selective_promise(curve, target_accuracy)
            if selective is None:
                reachable = [t / 100 for t in range(50, 100) if selective_promise(curve, t / 100) is not None]
                highest = f" (the highest it can promise: {reachable[-1]:g})" if reachable else ""
                raise DefungiError(
                    f"--target-accuracy {target_accuracy:g}: no confidence threshold is shown to reach it on the "
                    f"run's {curve.units} held-out specimens (with probability {1 - DELTA:.0%}); ask for less{highest}"
                )
        return cls(coverage, abstain, trust, selective)

    def sets(self, unit: Unit, calibrated: np.ndarray, classes: list[str]) -> np.ndarray | None:
        """The prediction sets of calibrated probabilities at this level (None: the run has none)."""
        if self.trust is None:
            return None
        return prediction_sets(calibrated, np.array(self.trust.conformal(self.coverage, unit).threshold(classes)))

    def fill_set(
        self, answer: ImageAnswer | SpecimenAnswer, sets: np.ndarray | None, k: int, classes: list[str]
    ) -> None:
        """An answer's set as a lab reads it (e.g. 'H1 or H2'), its classes and size: the k-th of sets, when
        there are sets."""
        if sets is not None:
            answer.set_classes = [c for c, keep in zip(classes, sets[k], strict=True) if keep]
            answer.set, answer.set_size = set_label(sets[k], classes), len(answer.set_classes)

    def specimen_answer(self, specimen: SpecimenAnswer) -> str:
        """What a lab reads for a specimen: its class, its set at the level, or 'not sure'."""
        if specimen.decision == UNCERTAIN:
            return NOT_SURE
        if (specimen.set_size or 1) > 1:
            return f"{specimen.set} ({self.coverage:.0%} set)"
        return specimen.class_ or ""

    def note(self) -> str | None:
        """How to read the answers, in one line (None without a measured trust)."""
        if self.trust is None:
            return None
        source = self.trust.source
        text = f"sets hold the true class of {self.coverage:.0%} of specimens (calibrated on {source} specimens)"
        if self.selective is not None:
            text += f"; {self.selective.summary()}"
        return text


def label_of(path: Path, classes: list[str]) -> str | None:
    """The true class where the file says it: its folder's name, else its DeFungi name (H1_100a_3)."""
    if path.parent.name in classes:
        return path.parent.name
    parsed = parse_name(path.stem)
    return parsed["cls"].upper() if parsed and parsed["cls"].upper() in classes else None


def specimen_of(path: Path, group_by: str) -> str:
    """The specimen a file belongs to: 'name' (DeFungi names: class and specimen number, else the
    folder), 'folder' (one folder per specimen), or a regular expression whose first group (or
    whole match) on the file name is the specimen."""
    if group_by == "name":
        parsed = parse_name(path.stem)
        return f"{parsed['cls'].upper()}_{parsed['sample']}" if parsed else str(path.parent)
    if group_by == "folder":
        return str(path.parent)
    match = re.search(group_by, path.name)
    found = (match.group(1) if match.groups() else match.group(0)) if match else None
    return found or path.name  # an optional group that did not take part: the file alone


def by_specimen(
    rows: list[ImageAnswer],
    model: Predictor,
    answers: Answers,
    group_by: str = "name",
) -> list[SpecimenAnswer]:
    """One decision per specimen: the probabilities of its images that were classified and not
    'uncertain' pooled by the run's specimen rule (the mean, unless train.specimen_rule says otherwise:
    the rule the specimen-level metrics use; every class's under 'probabilities'), then the most probable
    class and its pooled probability ('probability'); its confidence calibrated at the specimen level,
    its prediction set, and 'uncertain' (answer: not sure) under the selective threshold; 'no fungus
    visible' (or 'not a fungus micrograph') when none of its images could be classified. Each specimen
    keeps its images' answers ('rows'), and its 'path' is the folder that holds them all."""
    groups: dict[str, list[ImageAnswer]] = {}
    for row in rows:
        groups.setdefault(specimen_of(Path(row.path), group_by), []).append(row)
    return [_specimen(name, members, model, answers) for name, members in groups.items()]


def _specimen(name: str, members: list[ImageAnswer], model: Predictor, answers: Answers) -> SpecimenAnswer:
    """One specimen's decision from its images' answers (see by_specimen)."""
    classes = model.classes
    classified = [r for r in members if r.class_ is not None]
    counted = [r for r in classified if r.decision != UNCERTAIN]
    labels = {r.label for r in members if r.label}
    unlike = sum(bool(r.unlike_training) for r in counted)
    decision = SpecimenAnswer(
        specimen=name,
        path=os.path.commonpath([str(Path(r.path).parent) for r in members]),
        label=labels.pop() if len(labels) == 1 else None,
        images=len(members),
        classified=len(classified),
        counted=len(counted),
        no_fungus=sum(r.status == NO_FUNGUS for r in members),
        refused=sum(r.status == NOT_MICROGRAPH for r in members),
        unlike_training=unlike,
        flag=f"{unlike} of {len(counted)} images {UNLIKE}: check them" if unlike else None,
        rows=members,
    )
    if counted:
        mean = specimen_probabilities(probability_table(counted, classes), model.specimen_rule)[None]
        calibrated = temper(mean, model.temperature("specimen"))
        best, conf = classes[int(mean.argmax())], float(calibrated.max())
        sure = answers.selective is None or conf >= answers.selective.threshold
        decision.class_, decision.confidence, decision.probability = best, conf, float(mean.max())
        decision.decision = best if sure else UNCERTAIN
        answers.fill_set(decision, answers.sets("specimen", calibrated, classes), 0, classes)
        decision.probabilities = {c: float(v) for c, v in zip(classes, mean[0], strict=True)}
        decision.answer = answers.specimen_answer(decision)
    elif classified:
        decision.decision, decision.answer, decision.status = UNCERTAIN, NOT_SURE, "every image uncertain"
    else:
        decision.status = _why_none(members)
    return decision


def _why_none(members: list[ImageAnswer]) -> str:
    """Why none of a specimen's images was classified: one reason, or each reason with its count."""
    reasons: dict[str, int] = {}
    for r in members:
        reason = r.status or ("unreadable" if r.error is not None else "not classified")
        reasons[reason] = reasons.get(reason, 0) + 1
    if len(reasons) == 1:
        return "no readable image" if "unreadable" in reasons else next(iter(reasons))
    return "no image answered: " + ", ".join(f"{n} {reason}" for reason, n in reasons.items())


def selective_check(promise: SelectivePromise, specimens: list[SpecimenAnswer]) -> SelectiveCheck:
    """How the folder's labelled specimens fare under a selective promise: the share answered at its
    threshold and their accuracy, each with a 95% bootstrap interval over specimens."""
    known = _known(specimens)
    answered = np.array([s.confidence >= promise.threshold for s in known], bool)
    right = np.array([s.class_ == s.label for s in known], bool)
    draws = np.random.default_rng(0).integers(0, len(known), (1000, len(known))) if known else np.zeros((0, 0), int)
    accuracy = [right[d][answered[d]].mean() for d in draws if answered[d].any()]
    shares = answered[draws].mean(1) if known else np.zeros(0)
    return SelectiveCheck(
        target_accuracy=promise.target,
        threshold=promise.threshold,
        answered=float(answered.mean()) if known else float("nan"),
        accuracy=float(right[answered].mean()) if answered.any() else float("nan"),
        interval=_percentiles(accuracy),
        delta=promise.delta,
        share_promised=promise.share_interval,
        n=len(known),
        n_answered=int(answered.sum()),
        share_expected=promise.share,
        accuracy_held_out=promise.accuracy,
        share_interval=_percentiles(shares),
    )


def _percentiles(draws: Any) -> list[float]:
    """The 2.5 and 97.5 percentiles of bootstrap draws (empty without any)."""
    return [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))] if len(draws) else []


def _known(specimens: list[SpecimenAnswer]) -> list[SpecimenAnswer]:
    """The decided specimens whose true class is known."""
    return [s for s in specimens if s.label and s.class_ is not None]


def specimen_metrics(specimens: list[SpecimenAnswer], classes: list[str]) -> dict[str, Any] | None:
    """Accuracy and macro P / R / F1 over the decided specimens whose true class is known (None if none)."""
    known = _known(specimens)
    if not known:
        return None
    y_true = np.array([classes.index(s.label) for s in known])
    y_pred = np.array([classes.index(s.class_) for s in known])
    return classification_metrics(y_true, y_pred, classes)


@dataclass
class Predictions:
    """What `defungi predict` answers: the model's classes and an answer per image; with specimens, one
    decision per specimen (each holding its images' answers) and their metrics where the class is known; how
    to read them (note) and what the model is (card)."""

    classes: list[str]
    rows: list[ImageAnswer]
    specimens: list[SpecimenAnswer] | None = None
    metrics: dict[str, Any] | None = None
    note: str | None = None
    card: ModelCard | None = None
    selective: SelectiveCheck | None = None  # the selective promise on the specimens with a known class


def check_group_by(group_by: str) -> None:
    """A --group-by that is neither 'name' nor 'folder' must be a regular expression."""
    if group_by not in ("name", "folder"):
        try:
            re.compile(group_by)
        except re.error as exc:
            raise DefungiError(f"--group-by {group_by}: not a regular expression ({exc})") from None
        if re.fullmatch(group_by, ""):
            raise DefungiError(
                f"--group-by {group_by}: matches an empty name, so it tells no specimens apart; "
                "give a pattern whose first group is the specimen, e.g. '^(.+)_[0-9]+'"
            )


def predict_files(
    source: str | Path,
    paths: list[str | Path],
    backend: str = "torch",
    tta: bool | None = None,
    prior_weight: float | None = None,
    settings: dict[str, Any] | None = None,
    per_specimen: bool = False,
    group_by: str = "name",
) -> Predictions:
    """`defungi predict`: the model of source (see open_predictor) on every image file of paths; with
    per_specimen, one decision per specimen as well (group_by: see specimen_of, checked before any work).
    settings: Answers.of's coverage, abstain and target_accuracy."""
    check_group_by(group_by)
    files = expand_paths(paths)
    inputs = run_inputs(source) if backend == "torch" else None
    with ThreadPoolExecutor(1) as pool:  # the model loads while the first images decode
        opening = pool.submit(open_predictor, source, backend)
        ahead = decoded_chunks(inputs or opening.result().inputs, files)
        with contextlib.closing(prefetched(ahead, AHEAD)) as chunks:
            first = next(chunks)  # decoding starts
            model = opening.result()
            answers = Answers.of(model, **(settings or {}))
            same = inputs in (None, model.inputs)
            rows = answered(model, itertools.chain([first], chunks), tta, prior_weight, answers) if same else None
    if rows is None:  # a run folder whose config.json does not describe its checkpoints: decode as the model says
        rows = predict(model, files, tta, prior_weight, answers)
    result = Predictions(list(model.classes), rows, note=answers.note(), card=model.card)
    if per_specimen:
        result.specimens = by_specimen(rows, model, answers, group_by)
        result.metrics = specimen_metrics(result.specimens, result.classes)
        if answers.selective is not None and result.metrics is not None:
            result.selective = selective_check(answers.selective, result.specimens)
    return result
