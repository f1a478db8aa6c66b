"""The main job (`make run`): train ResNet-34 and ConvMixer-8, compare with the published study."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from defungi.config import load_config
from defungi.experiments.run import train_run

# Test figures reported by the study (random split of the images, macro averages).
PUBLISHED = {
    "resnet34": {"accuracy": 0.77, "precision": 0.78, "recall": 0.79, "f1": 0.79},
    "convmixer-8": {"accuracy": 0.78, "precision": 0.81, "recall": 0.79, "f1": 0.80},
}


def comparison_table(results: dict[str, dict[str, Any]], split: str) -> str:
    """Text table: our test metrics next to the published ones, per model."""
    keys = ("accuracy", "precision", "recall", "f1")
    lines = [f"{'model':<14}{'source':<26}" + "".join(f"{k:>11}" for k in keys)]
    for name, metrics in results.items():
        test = metrics["test"]
        lines.append(f"{name:<14}{'defungi (' + split + ' split)':<26}" + "".join(f"{test[k]:>11.3f}" for k in keys))
        lines.append(f"{'':<14}{'published (random split)':<26}" + "".join(f"{PUBLISHED[name][k]:>11.2f}" for k in keys))
    return "\n".join(lines)


def run_main_job(data: Path, out: Path, profile: str = "quick", split: str = "grouped") -> dict[str, dict[str, Any]]:
    """Train both published models with one profile and print the comparison table."""
    results = {}
    for model in PUBLISHED:
        config = load_config(profile, {"data.root": str(data), "data.split": split, "train.model": model})
        results[model] = train_run(config, out / f"{model}-{split}")
        print(f"{model}: test F1 {results[model]['test']['f1']:.3f}, trained in {results[model]['timing']['train_seconds'] / 60:.1f} min -> {out / f'{model}-{split}'}", flush=True)
    print()
    print(comparison_table(results, split))
    return results
