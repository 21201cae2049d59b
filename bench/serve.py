"""Serving under bounded loopback load: our service against `mlflow models serve`, generate
throughput, and a hot swap under load. Tiny model, CPU.

Self-contained: starts rclone S3 and an MLflow server (tests/servers.py), registers two
versions of the tiny model and promotes one, then runs `python -m serving` and
`mlflow models serve --env-manager local -m models:/sur-adapter@production` (the registered
pyfunc: the same ONNX text path and tokenizer) side by side, one uvicorn worker each. The
embed load is the same for both (one prompt a request, `--threads` client threads, a fixed
`--requests` count per round), in alternating rounds; figures are medians over rounds.

    .venv/bin/python bench/serve.py [--requests 400] [--threads 8] [--rounds 3]

Prints RESULT embed_rps, embed_p50_ms, embed_p99_ms, embed_rps_vs_mlflow_serve (ours /
theirs), generate_images_per_s, adapter_share_of_generate (the adapted ONNX text path, CLIP
encoder + adapter, over the whole server-side generate time: an upper bound of the adapter's
own share), swap_requests and swap_failed_requests.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
import yaml

from suradapter.config import Params, load_params
from suradapter.evaluate.gates import gated_report
from suradapter.export.onnx_export import export_text_path
from suradapter.model.adapter import SURAdapter
from suradapter.model.text_path import AdaptedTextPath
from suradapter.model.zoo import load_base_from_params
from suradapter.provenance import sha256_file

REPO = Path(__file__).resolve().parents[1]
API_KEY = "bench-key-0123456789abcdef"
PROMPT = "a trio of fire-truck coloured coins lying in the snow"
STARTUP_TIMEOUT_S = 240


@dataclass
class LoadResult:
    seconds: float
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.latencies) + len(self.failures)

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds

    def percentile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_load(
    send: Callable[[httpx.Client], str | None],
    url: str,
    threads: int,
    requests: int,
    pace_s: float = 0.0,
    stop: threading.Event | None = None,
) -> LoadResult:
    """`requests` calls of `send` from `threads` threads (fewer if `stop` is set first)."""
    result = LoadResult(0.0)
    lock = threading.Lock()
    tickets = iter(range(requests))

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while not (stop and stop.is_set()):
                with lock:
                    if next(tickets, None) is None:
                        return
                started = time.perf_counter()
                try:
                    version = send(client)
                    elapsed = time.perf_counter() - started
                    with lock:
                        result.latencies.append(elapsed)
                        if version is not None:
                            result.versions.append(version)
                except Exception as err:
                    with lock:
                        result.failures.append(repr(err)[:200])
                if pace_s:
                    time.sleep(pace_s)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    started = time.perf_counter()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    result.seconds = time.perf_counter() - started
    return result


@functools.cache
def load_servers_module():
    """The tests' real S3 (rclone) and MLflow server helpers, tests/servers.py."""
    spec = importlib.util.spec_from_file_location("servers", REPO / "tests" / "servers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["servers"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def embed_ours(client: httpx.Client) -> str:
    response = client.post("/v1/embed", json={"prompts": [PROMPT]}, headers={"X-API-Key": API_KEY})
    response.raise_for_status()
    return response.json()["version"]


def embed_mlflow(client: httpx.Client) -> None:
    response = client.post("/invocations", json={"inputs": [PROMPT]})
    response.raise_for_status()
    assert len(response.json()["predictions"]) == 1


def build_version(pipeline, params: Params, folder: Path, seed: int) -> list[Path]:
    """A trained-like adapter, its ONNX export and an eval report whose gates pass on
    the tests' `PASSING_METRICS` (the registry re-derives the verdict from them)."""
    adapter = SURAdapter.for_pipeline(params.adapter, pipeline)
    with torch.no_grad():
        adapter.fc.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(seed))
    adapter.eval().save_pretrained(folder / "adapter")
    path = AdaptedTextPath.from_pipeline(pipeline, adapter)
    export_text_path(
        path, params.export, folder / "export", folder / "adapter", params.base_model.id
    )
    (folder / "eval").mkdir()
    weights = folder / "adapter/diffusion_pytorch_model.safetensors"
    metrics = load_servers_module().PASSING_METRICS
    report = gated_report(metrics, params.evaluate.gates, sha256_file(weights))
    (folder / "eval/report.json").write_text(json.dumps(report))
    return [folder / "adapter", folder / "export", folder / "eval"]


@contextmanager
def process(command: list[str], env: dict, log: Path, ready_url: str) -> Iterator[None]:
    """Run `command` until the block ends; wait for `ready_url` to answer 200 first."""
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                try:
                    if httpx.get(ready_url, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{command[:4]} did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.3)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def measure_generate(url: str, count: int) -> tuple[float, float]:
    """Sequential generate requests at params' defaults: (images/s, text-path share)."""
    shares = []
    with httpx.Client(base_url=url, timeout=120, headers={"X-API-Key": API_KEY}) as client:
        client.post("/v1/generate", json={"prompt": PROMPT, "seed": 0}).raise_for_status()
        started = time.perf_counter()
        for seed in range(count):
            response = client.post("/v1/generate", json={"prompt": PROMPT, "seed": seed})
            response.raise_for_status()
            stages = dict(
                (part.split(";dur=")[0].strip(), float(part.split(";dur=")[1]))
                for part in response.headers["server-timing"].split(",")
            )
            shares.append(stages["text_path"] / sum(stages.values()))
        seconds = time.perf_counter() - started
    return count / seconds, statistics.mean(shares)


def swap_under_load(
    url: str, params: Params, versions: dict[str, str], threads: int, cap: int
) -> tuple[LoadResult, list[str]]:
    """Move @production to b, then roll back to a, under embed load; the load stops 100
    requests after."""
    from suradapter.registry import rollback

    stop = threading.Event()
    box: dict[str, LoadResult] = {}
    load = threading.Thread(
        target=lambda: box.setdefault("r", run_load(embed_ours, url, threads, cap, 0.01, stop))
    )

    def served() -> str:
        return httpx.get(f"{url}/readyz", timeout=10).json()["version"]

    def wait_for(version: str) -> None:
        deadline = time.monotonic() + 120
        while served() != version:
            if time.monotonic() > deadline:
                raise RuntimeError(f"version {version} was not swapped in within 120 s")
            time.sleep(0.1)

    load.start()
    time.sleep(1.0)
    # As `promote` would once its head-to-head is won: the bench has no held-out data for that
    # comparison, and what it times is the serving side of the swap.
    load_servers_module().move_production(params.registry.model_name, versions["b"])
    wait_for(versions["b"])
    rollback(params)
    wait_for(versions["a"])
    time.sleep(1.0)
    stop.set()
    load.join()
    result = box["r"]
    switches = [v for i, v in enumerate(result.versions) if i == 0 or v != result.versions[i - 1]]
    return result, switches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="Embed requests per round.")
    parser.add_argument("--threads", type=int, default=8, help="Client threads.")
    parser.add_argument("--rounds", type=int, default=3, help="Alternating rounds per server.")
    parser.add_argument("--generate", type=int, default=20, help="Generate requests.")
    parser.add_argument("--swap-cap", type=int, default=5000, help="Most requests in the swap.")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sur-bench-serve-") as scratch:
        run(args, Path(scratch))


def run(args: argparse.Namespace, root: Path) -> None:
    from suradapter.registry import promote, register_version

    servers = load_servers_module()
    with servers.s3_server(root / "s3", ("mlflow",)) as s3:
        env = {**os.environ, **servers.s3_env(s3.endpoint)}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # uvicorn
        os.environ.update(servers.s3_env(s3.endpoint))
        with servers.mlflow_server(root / "mlflow", "s3://mlflow/artifacts") as tracking:
            env["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"] = tracking
            raw = yaml.safe_load(args.params.read_text())
            raw["registry"]["poll_seconds"] = 0.5
            (root / "configs").mkdir()
            (root / "configs/tiny.yaml").write_text((REPO / "configs/tiny.yaml").read_text())
            (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
            params = load_params(root / "params.yaml", profile="tiny")
            pipeline = load_base_from_params(params.base_model)
            versions = {}
            for name, seed in (("a", 1), ("b", 2)):
                folders = build_version(pipeline, params, root / name, seed)
                versions[name] = register_version(params, *folders).version
            promote(params, version=versions["a"])
            ours_port, theirs_port = servers.free_port(), servers.free_port()
            ours_url, theirs_url = (
                f"http://127.0.0.1:{ours_port}",
                f"http://127.0.0.1:{theirs_port}",
            )
            serve = [sys.executable, "-m", "serving", "--params", str(root / "params.yaml")]
            serve += ["--profile", "tiny", "--host", "127.0.0.1", "--port", str(ours_port)]
            mlflow_serve = [str(Path(sys.executable).parent / "mlflow"), "models", "serve"]
            mlflow_serve += ["--env-manager", "local", "-m", "models:/sur-adapter@production"]
            mlflow_serve += ["--host", "127.0.0.1", "-p", str(theirs_port)]
            ours_env = {**env, "SUR_API_KEYS": API_KEY}
            with (
                process(serve, ours_env, root / "serving.log", f"{ours_url}/readyz"),
                process(mlflow_serve, env, root / "mlflow-serve.log", f"{theirs_url}/ping"),
            ):
                measure(args, params, versions, ours_url, theirs_url)


def measure(
    args: argparse.Namespace,
    params: Params,
    versions: dict[str, str],
    ours_url: str,
    theirs_url: str,
) -> None:
    """Run every measurement against the two running servers and print the RESULT lines."""
    run_load(embed_ours, ours_url, args.threads, 50)  # warm-up
    run_load(embed_mlflow, theirs_url, args.threads, 50)
    ours, theirs = [], []
    for _ in range(args.rounds):
        ours.append(run_load(embed_ours, ours_url, args.threads, args.requests))
        theirs.append(run_load(embed_mlflow, theirs_url, args.threads, args.requests))
    failed = sum(len(r.failures) for r in ours + theirs)
    best = sorted(ours, key=lambda r: r.rps)[len(ours) // 2]
    ratio = statistics.median(o.rps / t.rps for o, t in zip(ours, theirs, strict=True))
    print(
        f"embed: ours {[round(r.rps) for r in ours]} req/s, mlflow models serve "
        f"{[round(r.rps) for r in theirs]} req/s; {failed} failed requests"
    )
    images_per_s, share = measure_generate(ours_url, args.generate)
    swap, switches = swap_under_load(ours_url, params, versions, args.threads, args.swap_cap)
    print(f"swap under load: served versions in order {switches}")
    print(f"RESULT embed_rps {statistics.median(r.rps for r in ours):.1f}")
    print(f"RESULT embed_p50_ms {best.percentile_ms(0.50):.2f}")
    print(f"RESULT embed_p99_ms {best.percentile_ms(0.99):.2f}")
    print(f"RESULT embed_rps_vs_mlflow_serve {ratio:.2f}")
    print(f"RESULT generate_images_per_s {images_per_s:.2f}")
    print(f"RESULT adapter_share_of_generate {share:.3f}")
    print(f"RESULT swap_requests {swap.requests}")
    print(f"RESULT swap_failed_requests {len(swap.failures)}")


if __name__ == "__main__":
    main()
