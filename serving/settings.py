"""Serving settings: the typed `serving:` section of params.yaml, and where API keys come from.

`ServingParams` lives in `suradapter.config` with every other section, so a typo in
params.yaml fails when params load, naming the key.
"""

from __future__ import annotations

from suradapter.config import Params, ServingLimits, ServingParams

API_KEYS_ENV = "SUR_API_KEYS"
API_KEYS_FILE_ENV = "SUR_API_KEYS_FILE"

__all__ = ["API_KEYS_ENV", "API_KEYS_FILE_ENV", "ServingLimits", "ServingParams", "serving_params"]


def serving_params(params: Params) -> ServingParams:
    """The `serving:` section of `params` (defaults where it is absent)."""
    return params.serving
