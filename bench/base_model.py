"""Re-measure the shipped shapes base model with the oracle.

Held-out attribute combinations (never trained on), keyword vs narrative prompts, at the
guidance in params (tuned on validation prompts by bootstrap-base), on the test seed.

    .venv/bin/python bench/base_model.py [--images-per-combination 24]

Prints RESULT base_keyword_<attr> and RESULT base_narrative_<attr> for count, colour, shape.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from suradapter.config import load_params
from suradapter.evaluate.base_model import measure_test_sets
from suradapter.evaluate.oracle import ATTRIBUTES
from suradapter.model.zoo import load_base_from_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-combination", type=int, default=24)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    params = load_params(args.params)
    pipeline = load_base_from_params(params.base_model)
    scores = measure_test_sets(
        pipeline,
        params.shapes,
        params.sampling,
        params.sampling.guidance,
        images_per_combination=args.images_per_combination,
    )
    print(f"base model {params.base_model.id}, guidance {params.sampling.guidance}")
    for kind, score in scores.items():
        print(f"{kind}: {score.as_dict()} over {score.n} images")
        for attribute in ATTRIBUTES:
            print(f"RESULT base_{kind}_{attribute} {getattr(score, attribute):.3f}")


if __name__ == "__main__":
    main()
