"""Serving under bounded loopback load: our service against `mlflow models serve`, generate
throughput, and a hot swap under load. Tiny model, CPU.

Self-contained: starts rclone S3 and an MLflow server (tests/servers.py), registers two
versions of the tiny model and promotes one, then runs `python -m serving` and
`mlflow models serve --env-manager local -m models:/sur-adapter@production` (the registered
pyfunc: the same ONNX text path and tokenizer) side by side, one uvicorn worker each. The
embed load is the same for both: one prompt a request from `--threads` closed-loop clients,
then again from `--threads-high` (where our micro-batching has more to share), in
alternating rounds; figures are medians over rounds. The load comes from `wrk` (a C client
on 2 threads, so the figure is the servers' and not the client's) when it is installed
(Debian's `wrk`), else from Python httpx threads (`--client python` forces them; on 2 cores
their own CPU caps both servers, which narrows the ratio).

    .venv/bin/python bench/serve.py [--seconds 5] [--threads 8] [--threads-high 32]

Prints RESULT embed_rps, embed_p50_ms, embed_p99_ms (at `--threads`),
embed_rps_vs_mlflow_serve (ours / theirs, at `--threads`), embed_rps_c32_vs_mlflow_serve (at
`--threads-high`), generate_images_per_s, adapter_share_of_generate (the adapted ONNX text
path, CLIP encoder + adapter, over the whole server-side generate time: an upper bound of the
adapter's own share), swap_requests and swap_failed_requests (Python clients: each response
names the version that answered it).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import re
import shutil
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
from suradapter.provenance import ADAPTER_WEIGHTS, sha256_file
from suradapter.waiting import ready_process, wait_until

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


@dataclass
class Throughput:
    """One round of closed-loop load against one server."""

    rps: float
    p50_ms: float
    p99_ms: float
    failed: int


def python_load(url: str, path: str, body: dict, headers: dict, clients: int, requests: int):
    """`requests` POSTs from `clients` httpx threads."""

    def send(client: httpx.Client) -> None:
        client.post(path, json=body, headers=headers).raise_for_status()

    result = run_load(send, url, clients, requests)
    return Throughput(
        result.rps, result.percentile_ms(0.5), result.percentile_ms(0.99), len(result.failures)
    )


WRK_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def wrk_load(url: str, path: str, body: dict, headers: dict, clients: int, seconds: float):
    """`seconds` of POSTs from `clients` wrk connections (2 wrk threads)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(json.dumps(body))}\n')
        for name, value in {"Content-Type": "application/json", **headers}.items():
            script.write(f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}\n")
    command = ["wrk", f"-t{min(2, clients)}", f"-c{clients}", f"-d{seconds:g}s", "--latency"]
    try:
        out = subprocess.run(
            [*command, "-s", script.name, url + path], capture_output=True, text=True, check=True
        ).stdout
    finally:
        os.unlink(script.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    percentiles = {
        q: float(value) * WRK_UNITS_MS[unit]
        for q, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)$", out, re.M)
    }
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failed = (int(non_2xx.group(1)) if non_2xx else 0) + (
        sum(map(int, socket.groups())) if socket else 0
    )
    return Throughput(rps, percentiles["50"], percentiles["99"], failed)


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
    weights = folder / "adapter" / ADAPTER_WEIGHTS
    metrics = load_servers_module().PASSING_METRICS
    report = gated_report(metrics, params.evaluate.gates, sha256_file(weights))
    (folder / "eval/report.json").write_text(json.dumps(report))
    return [folder / "adapter", folder / "export", folder / "eval"]


@contextmanager
def process(command: list[str], env: dict, log: Path, ready_url: str) -> Iterator[None]:
    """Run `command` until the block ends; wait for `ready_url` to answer 200 first."""
    with ready_process(
        command,
        log,
        lambda: httpx.get(ready_url, timeout=2).status_code == 200,
        STARTUP_TIMEOUT_S,
        f"{command[:4]} to answer {ready_url}",
        cwd=REPO,
        env=env,
        retry_on=(httpx.HTTPError,),
    ):
        yield


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
        wait_until(lambda: served() == version, 120, f"version {version} to be swapped in")

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
    parser.add_argument(
        "--client", choices=("auto", "wrk", "python"), default="auto", help="Load generator."
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="wrk: seconds per round.")
    parser.add_argument(
        "--requests", type=int, default=400, help="Python client: requests per round."
    )
    parser.add_argument("--threads", type=int, default=8, help="Client threads.")
    parser.add_argument(
        "--threads-high", type=int, default=32, help="Client threads of the second load."
    )
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
    ours_call = (ours_url, "/v1/embed", {"prompts": [PROMPT]}, {"X-API-Key": API_KEY})
    theirs_call = (theirs_url, "/invocations", {"inputs": [PROMPT]}, {})
    use_wrk = args.client == "wrk" or (args.client == "auto" and shutil.which("wrk"))
    print(f"load generator: {'wrk' if use_wrk else 'python httpx threads'}")

    def load(call, clients: int, size: float | None = None) -> Throughput:
        if use_wrk:
            return wrk_load(*call, clients, size or args.seconds)
        return python_load(*call, clients, int(size or args.requests))

    load(ours_call, args.threads, 2 if use_wrk else 50)  # warm-up
    load(theirs_call, args.threads, 2 if use_wrk else 50)
    rounds = {}
    for clients in (args.threads, args.threads_high):
        ours, theirs = [], []
        for _ in range(args.rounds):  # alternate, so machine noise hits both alike
            ours.append(load(ours_call, clients))
            theirs.append(load(theirs_call, clients))
        rounds[clients] = ours, theirs
        failed = sum(r.failed for r in ours + theirs)
        print(
            f"embed at {clients} clients: ours {[round(r.rps) for r in ours]} req/s "
            f"(p99 {[round(r.p99_ms, 1) for r in ours]} ms), mlflow models serve "
            f"{[round(r.rps) for r in theirs]} req/s (p99 {[round(r.p99_ms, 1) for r in theirs]}"
            f" ms); {failed} failed requests"
        )
    ours, theirs = rounds[args.threads]
    ratio = statistics.median(o.rps / t.rps for o, t in zip(ours, theirs, strict=True))
    high = statistics.median(o.rps / t.rps for o, t in zip(*rounds[args.threads_high], strict=True))
    images_per_s, share = measure_generate(ours_url, args.generate)
    swap, switches = swap_under_load(ours_url, params, versions, args.threads, args.swap_cap)
    print(f"swap under load: served versions in order {switches}")
    print(f"RESULT embed_rps {statistics.median(r.rps for r in ours):.1f}")
    print(f"RESULT embed_p50_ms {statistics.median(r.p50_ms for r in ours):.2f}")
    print(f"RESULT embed_p99_ms {statistics.median(r.p99_ms for r in ours):.2f}")
    print(f"RESULT embed_rps_vs_mlflow_serve {ratio:.2f}")
    print(f"RESULT embed_rps_c{args.threads_high}_vs_mlflow_serve {high:.2f}")
    print(f"RESULT generate_images_per_s {images_per_s:.2f}")
    print(f"RESULT adapter_share_of_generate {share:.3f}")
    print(f"RESULT swap_requests {swap.requests}")
    print(f"RESULT swap_failed_requests {len(swap.failures)}")


if __name__ == "__main__":
    main()
