"""Ablations of the method on the embedded default, every row scored by `sur evaluate`'s oracle.

Does the LLM's knowledge matter, and how much does each part of the method add? Each row is
the embedded default with one change, trained by `sur train` and scored by `sur evaluate`
(images generated from held-out narrative prompts, read by the shapes oracle), with the same
steps, seeds and data for every row:

- `default`: params.yaml as it is;
- `no_llm_distill`: no LLM-distillation loss (`loss.llm_distill.weight: 0`);
- `random_teacher`: the distillation target from a randomly initialised teacher of the same
  shape (`embed.weights: random`; does the knowledge matter, or only the extra loss?);
- `detached_denoise`: the reference code's detached denoising gradient;
- `no_preservation`: no keyword-preservation loss;
- `no_token_mixer`: the paper's adapter alone (`adapter.token_mixer: null`);
- `reference`: the reference recipe: reference-mode adapter (sequence-first attention), no
  mixer, softmax-KL distances, detached denoising gradient, no preservation loss.

The prepared data, teacher cache and frozen-output cache of the main job are reused
(`make run` first); each row writes only under the scratch folder. Its own MLflow store
(SQLite) keeps every row's runs.

    .venv/bin/python bench/ablations.py [--steps N] [--only a,b] [--keep DIR]

Prints one `RESULT ablation_<row>_gap_closure <x>` per row, then per row
`RESULT ablation_<row>_<figure> <x>` for the per-attribute and all-three closures, the
held-out-template accuracy and the keyword-accuracy drop, and writes `ablations.md` (the
README's table) into the scratch folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
REFERENCE_DISTANCES = {
    "loss.alignment.distance": "softmax_kl",
    "loss.preservation.distance": "softmax_kl",
}
ROWS: dict[str, dict[str, object]] = {
    "default": {},
    "no_llm_distill": {"loss.llm_distill.weight": 0.0},
    "random_teacher": {"embed.weights": "random"},
    "detached_denoise": {"loss.denoise.gradient": "detach"},
    "no_preservation": {"loss.preservation.weight": 0.0},
    "no_token_mixer": {"adapter.token_mixer": None},
    "reference": {
        "adapter.mode": "reference",
        "adapter.token_mixer": None,
        "loss.denoise.gradient": "detach",
        "loss.preservation.weight": 0.0,
        **REFERENCE_DISTANCES,
    },
}
FIGURES = ("count", "colour", "shape", "all")


def set_dotted(tree: dict, dotted: str, value: object) -> None:
    """`tree[a][b][c] = value` for `dotted` 'a.b.c'; the keys must exist (no typo passes)."""
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node[key]
    if leaf not in node:
        raise KeyError(f"params.yaml has no {dotted}")
    node[leaf] = value


def row_params(base: dict, row: str, steps: int, folder: Path) -> Path:
    """A complete params file for `row`: the base params, the row's change, this folder's
    outputs and MLflow store."""
    params = copy.deepcopy(base)
    for dotted, value in ROWS[row].items():
        set_dotted(params, dotted, value)
    train = params["train"]
    train.update(
        max_steps=steps,
        output_dir=str(folder / "adapter"),
        checkpoint_dir=str(folder / "checkpoints"),
        tracking_uri=f"sqlite:///{folder.parent / 'mlflow.db'}",
        experiment=f"ablation-{row}",
    )
    if params["embed"]["weights"] != "pretrained":  # not into the main job's DVC output
        params["embed"]["cache_dir"] = str(folder / "teacher_cache")
    params["evaluate"].update(adapter_dir=str(folder / "adapter"), output_dir=str(folder / "eval"))
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def sur(params_path: Path, *args: str, log: Path, env: dict[str, str]) -> None:
    """Run `sur --params <file> <args>` from the repository root; exit naming the log."""
    with log.open("ab") as handle:
        done = subprocess.run(
            [str(BIN / "sur"), "--params", str(params_path), *args],
            cwd=REPO,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    if done.returncode != 0:
        raise SystemExit(f"`sur {' '.join(args)}` failed (exit {done.returncode}); see {log}")


def figures(report: dict) -> dict[str, float | None]:
    """The row's figures from its report.json."""
    metrics = report["metrics"]
    closures = metrics["gap_closure_by_figure"]
    keyword = metrics["keyword_accuracy"]
    return {
        "gap_closure": metrics["gap_closure"],
        **{f"{name}_closure": closures[name] for name in FIGURES},
        "templates_accuracy": metrics["template_accuracy"]["adapter"],
        "combinations_accuracy": metrics["narrative_accuracy"]["adapter"],
        "keyword_drop": keyword["base"] - keyword["adapter"],
        "denoise_increase": metrics["denoise"]["keyword"]["relative_increase"],
    }


def table(results: dict[str, dict[str, float | None]], steps: int) -> str:
    """The Markdown table the README carries."""

    def shown(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    head = (
        "| row | gap closure | count | colour | shape | all three | held-out templates "
        "| held-out combinations | keyword drop |"
    )
    lines = [f"Ablations, {steps} steps each, same seeds and data (`bench/ablations.py`).", ""]
    lines += [head, "|" + "---|" * 9]
    for row, values in results.items():
        cells = [values["gap_closure"]] + [values[f"{n}_closure"] for n in FIGURES]
        cells += [values["templates_accuracy"], values["combinations_accuracy"]]
        cells += [values["keyword_drop"]]
        lines.append(f"| {row} | " + " | ".join(shown(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500, help="train.max_steps for every row")
    parser.add_argument("--only", help="comma-separated rows (default: all)")
    parser.add_argument("--keep", type=Path, help="scratch folder to keep (default: temporary)")
    args = parser.parse_args()
    rows = args.only.split(",") if args.only else list(ROWS)
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    manifest = REPO / base["embed"]["manifest"]
    if not manifest.is_file():
        raise SystemExit(f"{manifest} not found: run `make run` first (the rows reuse its data)")
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="bench-ablations-"))
    scratch.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SUR_"))}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "SUR_NO_STACK_ENV": "1"}
    results: dict[str, dict[str, float | None]] = {}
    try:
        for row in rows:
            folder = scratch / row
            folder.mkdir(exist_ok=True)
            params_path = row_params(base, row, args.steps, folder)
            log = folder / "log.txt"
            started = time.perf_counter()
            if "embed.weights" in ROWS[row]:  # its own teacher features first
                sur(params_path, "embed", log=log, env=env)
            sur(params_path, "train", log=log, env=env)
            sur(params_path, "evaluate", "--no-production", "--no-gate-exit", log=log, env=env)
            report = json.loads((folder / "eval" / "report.json").read_text())
            results[row] = figures(report)
            closure = results[row]["gap_closure"]
            print(f"{row}: gap closure {closure} in {time.perf_counter() - started:.0f} s")
    finally:
        if results:
            (scratch / "ablations.md").write_text(table(results, args.steps))
            print(table(results, args.steps))
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    for row, values in results.items():
        print(f"RESULT ablation_{row}_gap_closure {values['gap_closure']}")
    for row, values in results.items():
        for name, value in values.items():
            if name != "gap_closure":
                print(f"RESULT ablation_{row}_{name} {value}")


if __name__ == "__main__":
    main()
