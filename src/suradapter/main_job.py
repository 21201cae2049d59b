"""The main job (`sur run`): every stage that exists so far, on the active profile.

Today that is the DVC chain up to `export` (`dvc repro export`: generate the shapes world,
prepare it, fill the teacher-feature cache, train the adapter on the shipped base, export
the adapted text path to ONNX with a parity check; DVC skips unchanged stages and never
retrains the frozen base), then the trained adapter's text path through the standard
pipeline beside the base model, same seed. Later stages (evaluate, register, promote) join
this chain as they land.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from rich.console import Console

from suradapter.config import Params
from suradapter.model.adapter import SURAdapter, describe_adapter
from suradapter.model.text_path import AdaptedTextPath
from suradapter.model.zoo import BaseModelNotFoundError, load_base_from_params

DEMO_PROMPTS = (
    "a trio of fire-truck coloured coins lying in the snow",
    "3 red circles, white background, flat icon, centered, high quality",
)


def run_main_job(params: Params, out_dir: Path, console: Console) -> str:
    """Run the available stages; write outputs under `out_dir`; return a one-line summary.

    Raises RuntimeError when a stage cannot run (the message says why).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    check_dvc_profile(params)
    reproduce_stages(["export"], console)
    prepared = json.loads((Path(params.prepare.output_dir) / "summary.json").read_text())
    console.print(
        f"[green]✓[/] data: {prepared['kept']} samples prepared "
        f"({prepared['splits']}), {sum(prepared['quarantined'].values())} quarantined"
    )
    with console.status("resolving base model"):
        try:
            pipeline = load_base_from_params(params.base_model)
        except BaseModelNotFoundError as err:
            raise RuntimeError(str(err)) from None
    width = pipeline.text_encoder.config.hidden_size
    console.print(f"[green]✓[/] base model '{params.base_model.id}' (text width {width})")

    adapter_dir = Path(params.train.output_dir)
    adapter = SURAdapter.from_pretrained(adapter_dir).eval()
    path = AdaptedTextPath.from_pipeline(pipeline, adapter)
    embeds = path.encode(list(DEMO_PROMPTS))
    console.print(f"[green]✓[/] trained adapter ({adapter.config.mode}): {adapter_dir}")
    export = json.loads((Path(params.export.output_dir) / "export.json").read_text())
    console.print(
        f"[green]✓[/] ONNX text path: {params.export.output_dir}/text_path.onnx "
        f"(parity {export['parity_max_abs_diff']:.1e})"
    )

    images = _side_by_side(pipeline, path, params, DEMO_PROMPTS[0])
    for name, image in images.items():
        image.save(out_dir / f"{name}.png")
    console.print(f"[green]✓[/] adapted text path through StableDiffusionPipeline: {out_dir}/*.png")

    info = {
        "profile": params.profile,
        "base_model": params.base_model.id,
        "adapter_dir": str(adapter_dir),
        "export": export,
        "adapter": {k: str(v) for k, v in describe_adapter(adapter).items()},
        "prompt_embeds_shape": list(embeds.shape),
        "images": sorted(f"{name}.png" for name in images),
    }
    (out_dir / "summary.json").write_text(json.dumps(info, indent=2))
    return f"main job done on profile '{params.profile}': {out_dir / 'summary.json'}"


def check_dvc_profile(params: Params, params_file: Path = Path("params.yaml")) -> None:
    """DVC resolves `configs/${profile}.yaml` from params.yaml; refuse a different profile."""
    import yaml

    declared = None
    if params_file.is_file():
        declared = yaml.safe_load(params_file.read_text()).get("profile")
    if declared != params.profile:
        raise RuntimeError(
            f"profile '{params.profile}' was asked for, but {params_file} declares "
            f"'profile: {declared}', which is what DVC tracks; set `profile: {params.profile}` "
            f"in {params_file} to run the main job on it"
        )


def reproduce_stages(stages: list[str], console: Console) -> None:
    """Run `dvc repro` for `stages` in the current project. Raises RuntimeError on failure."""
    bin_dir = Path(sys.executable).parent  # the stages run `sur`, from this environment
    command = [str(bin_dir / "dvc"), "repro", *stages]
    path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "DVC_NO_ANALYTICS": "1"}
    console.print(f"[bold]$ {' '.join(['dvc', *command[1:]])}[/]")
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"`dvc repro {' '.join(stages)}` failed (exit {result.returncode})")


def _side_by_side(pipeline, path: AdaptedTextPath, params: Params, prompt: str) -> dict:
    """Generate `prompt` with the base text path and the adapted one, same seed."""
    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    seed, sampling = params.sampling.seed, params.sampling
    common = dict(
        num_inference_steps=sampling.steps,
        guidance_scale=sampling.guidance,
        height=size,
        width=size,
        output_type="pil",
    )
    base = pipeline(prompt=prompt, generator=torch.Generator().manual_seed(seed), **common)
    adapted = pipeline(
        **path.pipeline_embeds([prompt]), generator=torch.Generator().manual_seed(seed), **common
    )
    return {"base": base.images[0], "adapted": adapted.images[0]}
