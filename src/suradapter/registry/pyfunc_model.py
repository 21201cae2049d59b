"""The pyfunc flavour of a registered version: prompts in, adapted prompt embeddings out.

    model = mlflow.pyfunc.load_model("models:/sur-adapter@production")
    embeds = model.predict(["a prompt"])   # numpy float32 [N, T, D]

Input is a list of prompt strings (MLflow checks it against the `list[str]` type hint, so a
bare string is refused; a one-column DataFrame of strings also works). It runs the exported
ONNX text path (`artifacts/export/text_path.onnx`) with the tokenizer saved beside it,
padding and truncating exactly as the Stable Diffusion pipeline does (`load_export`, the
same loader the server uses); the output is what
`StableDiffusionPipeline(prompt_embeds=...)` takes. Loading first checks every file under
artifacts/ against the manifest the registry records for the version (its `sha256sums` tag,
found through the run that logged the model; see `manifest`), not against the SHA256SUMS in
the bucket; `model_config={"verify_checksums": False}` skips the check. ORT providers follow
`model_config["providers"]` (those unusable here are skipped).
The version's pyfunc code is this installed package (see `pyfunc_entry.py`), so loading
needs `suradapter` importable: use `--env-manager local` with `mlflow models serve`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import yaml

from suradapter.export.runtime import load_export
from suradapter.registry.errors import RegistryError
from suradapter.registry.manifest import manifest_problems, recorded_manifest

DEFAULT_PROVIDERS = ["cuda", "cpu"]


def as_prompts(model_input: Any) -> list[str]:
    """Prompts from a string, a list of strings, a 1-D array or a DataFrame (`prompt` column
    or the first one). Raises ValueError for anything else."""
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):  # pandas DataFrame, as MLflow serving sends it
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        model_input = model_input[column].tolist()
    elif isinstance(model_input, np.ndarray):
        model_input = model_input.ravel().tolist()
    prompts = list(model_input)
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad or not prompts:
        raise ValueError(f"expected a non-empty list of prompt strings, got items of {bad}")
    return prompts


def registered_manifest(model_root: Path, registered_model: str) -> tuple[str, dict[str, str]]:
    """(version, manifest) the registry records for the model whose files are at `model_root`.

    The version is the one of `registered_model` created from the run in `MLmodel`. Raises
    RegistryError when there is no such version, or it records no manifest.
    """
    from mlflow.tracking import MlflowClient

    meta = yaml.safe_load((model_root / "MLmodel").read_text()) or {}
    run_id, model_id = meta.get("run_id"), meta.get("model_id")
    client = MlflowClient()
    found = client.search_model_versions(f"name = '{registered_model}' and run_id = '{run_id}'")
    found = [v for v in found if not model_id or getattr(v, "model_id", None) in (None, model_id)]
    if len(found) != 1:
        raise RegistryError(
            f"{len(found)} versions of {registered_model} were registered from run {run_id} "
            f"(at {client.tracking_uri}), so the files under {model_root} cannot be checked "
            "against the registry's record; load a registered version (models:/NAME/N), or "
            'pass model_config={"verify_checksums": False} to load it unchecked'
        )
    version = str(found[0].version)
    return version, recorded_manifest(dict(found[0].tags or {}), registered_model, version)


class AdaptedTextPathModel(mlflow.pyfunc.PythonModel):
    """`predict(prompts)` -> adapted prompt embeddings, numpy float32 [N, T, D]."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        config = context.model_config or {}
        export = Path(context.artifacts["export"])
        if config.get("verify_checksums", True):
            name = config.get("registered_model")
            if not name:
                raise RegistryError(
                    f"the model under {export.parent.parent} was logged without its registered "
                    "model name (an older `sur register`), so its files cannot be checked "
                    "against the registry: register it again"
                )
            version, recorded = registered_manifest(export.parent.parent, name)
            problems = manifest_problems(export.parent, recorded)
            if problems:
                raise RegistryError(
                    f"version {version} of {name}: the files under {export.parent} fail the "
                    f"registry's record: {'; '.join(problems)}"
                )
        providers = list(config.get("providers") or DEFAULT_PROVIDERS)
        cache = config.get("trt_cache_dir")
        self.exported = load_export(export, providers, Path(cache) if cache else None)

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        model_input: list[str],
        params: dict[str, Any] | None = None,
    ) -> np.ndarray:
        return self.exported.embed(as_prompts(model_input))
