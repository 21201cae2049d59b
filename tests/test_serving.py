"""`serving`: a real uvicorn process on loopback, fed by a real MLflow registry on S3 (rclone).

One module-scoped stack: the S3 and MLflow servers, three registered versions of the tiny
model (a, b, and c whose ONNX file is tampered with in the bucket after registration), and
`python -m serving` serving `@production`. Tests run in file order: the read-only checks
first, then the hot swaps, which move the alias.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import servers
import torch
import yaml
from PIL import Image

from suradapter.config import Params, load_params
from suradapter.export.onnx_export import export_text_path
from suradapter.model.adapter import SURAdapter
from suradapter.model.text_path import AdaptedTextPath
from suradapter.provenance import sha256_file

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
KEY_FROM_ENV = "env-key-0123456789abcdef"
KEY_FROM_FILE = "file-key-fedcba9876543210"
LIMITS = {
    "max_prompt_chars": 200,
    "max_batch": 8,
    "max_steps": 8,
    "max_image_size": 64,
    "max_guidance": 10.0,
    "max_body_bytes": 16384,
    "max_concurrent_generate": 1,
}
POLL_SECONDS = 0.5
PARTS = ("adapter", "export", "eval")
HEADERS = {"X-API-Key": KEY_FROM_ENV}


@dataclass
class Stack:
    url: str
    params: Params
    versions: dict[str, str]  # a, b (good), c (tampered) -> registry version
    log: Path
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.url, headers=HEADERS, timeout=60)

    def ready(self) -> dict:
        return self.client.get("/readyz").json()

    def wait_until(self, predicate, what: str, timeout: float = 90.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.ready()
            if predicate(state):
                return state
            time.sleep(0.2)
        tail = self.log.read_text()[-3000:]
        raise AssertionError(f"timed out waiting for {what}; /readyz: {state}\n{tail}")


def write_params(folder: Path, repo_root: Path) -> Path:
    """A params file for the test: this repo's, with a fast poll and the test's limits."""
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["registry"]["poll_seconds"] = POLL_SECONDS
    params["serving"] = {"limits": LIMITS, "providers": ["cpu"], "retry_seconds": 600}
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (folder / "configs").mkdir()
    tiny = repo_root / "configs" / "tiny.yaml"
    (folder / "configs" / "tiny.yaml").write_text(tiny.read_text())
    return folder / "params.yaml"


def build_version(pipeline, params: Params, folder: Path, seed: int) -> tuple[Path, Path, Path]:
    """An adapter whose fusion has moved, its ONNX export and a passing eval report."""
    adapter = SURAdapter.for_pipeline(params.adapter, pipeline).eval()
    with torch.no_grad():
        adapter.fc.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(seed))
    adapter.save_pretrained(folder / "adapter")
    path = AdaptedTextPath.from_pipeline(pipeline, adapter)
    export_text_path(
        path, params.export, folder / "export", folder / "adapter", params.base_model.id
    )
    (folder / "eval").mkdir()
    report = {
        "passed": True,
        "adapter_sha256": sha256_file(folder / "adapter/diffusion_pytorch_model.safetensors"),
        "gates": [{"name": "smoke", "passed": True, "value": 1.0, "threshold": 0.0}],
        "metrics": {},
    }
    (folder / "eval/report.json").write_text(json.dumps(report))
    return folder / "adapter", folder / "export", folder / "eval"


def tamper_onnx(s3_root: Path, params: Params, version: str) -> None:
    """Change the stored text_path.onnx of `version` behind the registry's back."""
    from mlflow.tracking import MlflowClient

    source = MlflowClient().get_model_version(params.registry.model_name, version).source
    model_id = source.rsplit("/", 1)[-1]  # models:/m-<id>
    stored = [p for p in s3_root.rglob("text_path.onnx") if model_id in p.as_posix()]
    assert len(stored) == 1, f"expected one stored ONNX file for {model_id}, found {stored}"
    stored[0].write_bytes(stored[0].read_bytes() + b"\0")


@contextmanager
def serving_process(folder: Path, params_path: Path, repo_root: Path) -> Iterator[str]:
    """`python -m serving` on a free loopback port; yields its URL once /readyz is 200."""
    port = servers.free_port()
    keys = folder / "api-keys.txt"
    keys.write_text(f"# keys for the test\n{KEY_FROM_FILE}\n")
    env = {
        **os.environ,
        "SUR_API_KEYS": KEY_FROM_ENV,
        "SUR_API_KEYS_FILE": str(keys),
        "PYTHONUNBUFFERED": "1",
    }
    command = [sys.executable, "-m", "serving", "--params", str(params_path), "--profile"]
    command += ["tiny", "--host", "127.0.0.1", "--port", str(port)]
    log_path = folder / "serving.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=repo_root, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"serving did not get ready:\n{log_path.read_text()}")
                time.sleep(0.3)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, repo_root, tiny_pipeline) -> Iterator[Stack]:
    import mlflow

    from suradapter.registry import promote, register_version

    root = tmp_path_factory.mktemp("serving")
    with (
        pytest.MonkeyPatch.context() as patch,
        servers.s3_server(root / "s3", ("mlflow",)) as s3,
    ):
        for key, value in servers.s3_env(s3.endpoint).items():
            patch.setenv(key, value)
        with servers.mlflow_server(root / "mlflow", "s3://mlflow/artifacts") as tracking:
            patch.setenv("MLFLOW_TRACKING_URI", tracking)
            params_path = write_params(root, repo_root)
            params = load_params(params_path, profile="tiny")
            versions = {}
            for name, seed in (("a", 1), ("b", 2)):
                folders = build_version(tiny_pipeline, params, root / name, seed)
                versions[name] = register_version(params, *folders).version
            versions["c"] = register_version(params, *[root / "a" / p for p in PARTS]).version
            tamper_onnx(root / "s3", params, versions["c"])
            promote(params, version=versions["a"])
            try:
                with serving_process(root, params_path, repo_root) as url:
                    yield Stack(url, params, versions, root / "serving.log")
            finally:
                mlflow.set_tracking_uri(None)


def test_health_is_public_and_ready_names_the_production_version(stack):
    assert httpx.get(f"{stack.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{stack.url}/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["ready"] and body["version"] == stack.versions["a"]
    assert body["alias"] == "production" and body["last_swap_error"] is None
    assert body["base_model"] == "tiny" and body["provider"] == "cpu"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/embed", {"prompts": ["a red circle"]}),
        ("POST", "/v1/generate", {"prompt": "a red circle", "steps": 1}),
        ("GET", "/v1/model", None),
        ("GET", "/metrics", None),
    ],
)
def test_every_other_endpoint_requires_a_valid_api_key(stack, method, path, body):
    url = f"{stack.url}{path}"
    for headers in ({}, {"X-API-Key": "wrong-key-0123456789"}, {"X-API-Key": KEY_FROM_ENV[:-1]}):
        response = httpx.request(method, url, json=body, headers=headers)
        assert response.status_code == 401, (headers, response.text)
        assert "X-API-Key" in response.json()["detail"]
    for key in (KEY_FROM_ENV, KEY_FROM_FILE):
        response = httpx.request(method, url, json=body, headers={"X-API-Key": key}, timeout=60)
        assert response.status_code == 200, response.text


def test_a_bad_request_without_a_key_gets_401_not_a_validation_error(stack):
    response = httpx.post(f"{stack.url}/v1/embed", json={"prompts": []})
    assert response.status_code == 401


def test_the_server_refuses_to_start_without_api_keys(tmp_path, repo_root):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUR_API_KEYS")}
    result = subprocess.run(
        [sys.executable, "-m", "serving", "--profile", "tiny", "--port", "1"],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "SUR_API_KEYS" in result.stderr and "Traceback" not in result.stderr


TOO_LONG = "x" * (LIMITS["max_prompt_chars"] + 1)


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v1/embed", {"prompts": ["p"] * 9}, 422, "at most 8 items"),
        ("/v1/embed", {"prompts": []}, 422, "at least 1 item"),
        ("/v1/embed", {"prompts": [TOO_LONG]}, 422, "at most 200 characters"),
        ("/v1/embed", {"prompts": "a red circle"}, 422, "valid list"),
        ("/v1/embed", {"prompts": ["a"], "extra": 1}, 422, "body.extra"),
        ("/v1/generate", {"prompt": TOO_LONG}, 422, "at most 200 characters"),
        ("/v1/generate", {"prompt": "p", "negative_prompt": TOO_LONG}, 422, "negative_prompt"),
        ("/v1/generate", {"prompt": "p", "steps": 9}, 422, "less than or equal to 8"),
        ("/v1/generate", {"prompt": "p", "steps": 0}, 422, "greater than or equal to 1"),
        ("/v1/generate", {"prompt": "p", "width": 68}, 422, "less than or equal to 64"),
        ("/v1/generate", {"prompt": "p", "height": 30}, 422, "not a multiple of 4"),
        ("/v1/generate", {"prompt": "p", "guidance": 10.5}, 422, "less than or equal to 10"),
        ("/v1/generate", {"prompt": "p", "seed": -1}, 422, "seed"),
        ("/v1/embed", {"prompts": ["p" * 150] * 120}, 413, "larger than 16384 bytes"),
    ],
)
def test_each_limit_gives_a_4xx_with_a_clear_message(stack, path, body, status, message):
    response = stack.client.post(path, json=body)
    assert response.status_code == status, response.text
    assert message in response.text
    assert "Traceback" not in response.text


def test_malformed_json_gets_422(stack):
    response = stack.client.post(
        "/v1/embed", content=b'{"prompts": [', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422 and "json" in response.text.lower()


def test_embed_matches_the_registered_pyfunc_model(stack):
    import mlflow

    prompts = ["", "a trio of fire-truck coloured coins lying in the snow", "3 red circles"]
    response = stack.client.post("/v1/embed", json={"prompts": prompts})
    assert response.status_code == 200
    body = response.json()
    assert body["version"] == stack.versions["a"] and body["shape"][0] == 3
    served = np.array(body["embeddings"], dtype=np.float32)
    packed = stack.client.post("/v1/embed", json={"prompts": prompts, "encoding": "base64"})
    raw = np.frombuffer(base64.b64decode(packed.json()["data_base64"]), dtype="<f4")
    np.testing.assert_array_equal(raw.reshape(body["shape"]), served)
    model = mlflow.pyfunc.load_model(f"models:/{stack.params.registry.model_name}@production")
    np.testing.assert_allclose(served, model.predict(prompts), atol=1e-5)


def test_generate_returns_a_seeded_png_and_compares_with_the_base(stack):
    request = {"prompt": "two green squares", "steps": 2, "seed": 7, "guidance": 1.5}
    first = stack.client.post("/v1/generate", json=request)
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    assert first.headers["x-seed"] == "7"
    assert first.headers["x-model-version"] == stack.versions["a"]
    assert "text_path;dur=" in first.headers["server-timing"]
    image = Image.open(io.BytesIO(first.content))
    assert image.size == (32, 32)  # the tiny model's native size (its 32 px training images)
    again = stack.client.post("/v1/generate", json=request)
    assert again.content == first.content
    compare = stack.client.post("/v1/generate", json={**request, "compare_base": True})
    assert compare.status_code == 200 and compare.headers["content-type"] == "application/json"
    body = compare.json()
    assert base64.b64decode(body["adapted_png_base64"]) == first.content
    base = Image.open(io.BytesIO(base64.b64decode(body["base_png_base64"])))
    assert base.size == (32, 32) and base.tobytes() != image.tobytes()
    sized = stack.client.post("/v1/generate", json={**request, "width": 32, "height": 24})
    assert Image.open(io.BytesIO(sized.content)).size == (32, 24)


def test_generate_beyond_the_concurrency_limit_gets_429(stack):
    request = {"prompt": "a red circle", "steps": 8, "width": 64, "height": 64}
    with httpx.Client(base_url=stack.url, headers=HEADERS, timeout=120) as client:
        results: list[int] = []

        def send() -> None:
            results.append(client.post("/v1/generate", json=request).status_code)

        threads = [threading.Thread(target=send) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert set(results) <= {200, 429} and 200 in results and 429 in results, results


def test_metrics_are_prometheus_text(stack):
    from prometheus_client.parser import text_string_to_metric_families

    response = stack.client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    requests = families["sur_http_requests"].samples
    assert any(s.labels["route"] == "/v1/embed" and s.labels["status"] == "200" for s in requests)
    assert any(s.labels["status"] == "401" for s in requests)
    served = families["sur_model_served_info"].samples
    assert [s.labels["version"] for s in served if s.value == 1] == [stack.versions["a"]]
    assert "sur_generate_stage_seconds" in families


def test_openapi_documents_the_endpoints_and_the_key(stack):
    schema = httpx.get(f"{stack.url}/openapi.json").json()
    assert {"/v1/embed", "/v1/generate", "/healthz", "/readyz", "/metrics"} <= set(schema["paths"])
    assert schema["components"]["securitySchemes"]["ApiKey"]["name"] == "X-API-Key"
    generate = schema["paths"]["/v1/generate"]["post"]["responses"]["200"]["content"]
    assert {"image/png", "application/json"} <= set(generate)
    embed = schema["components"]["schemas"]["EmbedRequest"]["properties"]["prompts"]
    assert embed["maxItems"] == LIMITS["max_batch"]
    assert httpx.get(f"{stack.url}/docs").status_code == 200


def test_schemathesis_finds_no_server_error(stack, tmp_path):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.configuration import set_hypothesis_home_dir

    set_hypothesis_home_dir(tmp_path / "hypothesis")  # not ./.hypothesis in the repo
    schema = schemathesis.openapi.from_url(f"{stack.url}/openapi.json")
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    failures: list[str] = []
    calls = 0

    def explore(operation, mode) -> None:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=12,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        def check(case) -> None:
            nonlocal calls
            response = case.call(base_url=stack.url, headers=HEADERS, timeout=60)
            calls += 1
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path} {case.body!r:.200} -> {response}")

        check()

    try:
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in modes if operation.method.upper() == "POST" else modes[:1]:
                explore(operation, mode)
    finally:
        set_hypothesis_home_dir(None)
    assert calls >= 50
    assert not failures, "\n".join(failures[:10])


@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"headless Chromium not found at {CHROMIUM} (Debian: apt-get install chromium)",
)
def test_the_web_page_shows_base_and_adapted_images_side_by_side(stack, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 700})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(stack.url)
            page.fill("#api-key", KEY_FROM_FILE)
            page.fill("#prompt", "a trio of fire-truck coloured coins lying in the snow")
            page.fill("#steps", "2")
            page.click("#generate")
            sizes = []
            for image in ("#base-image", "#adapted-image"):
                page.wait_for_selector(f"{image}[src^='data:image/png']", timeout=60_000)
                page.locator(image).evaluate("img => img.decode()")
                sizes.append(page.locator(image).evaluate("img => img.naturalWidth"))
            status = page.inner_text("#status")
            page.screenshot(path=str(tmp_path / "base-vs-adapted.png"), full_page=True)
        finally:
            browser.close()
    assert sizes == [32, 32]  # the tiny model's native size, shown scaled up
    assert f"Version {stack.versions['a']}" in status
    assert (tmp_path / "base-vs-adapted.png").stat().st_size > 1000
    assert not errors, errors


class EmbedLoad:
    """Embed requests from `threads` threads until stopped, at most `max_requests` in all."""

    def __init__(self, url: str, threads: int = 8, max_requests: int = 3000) -> None:
        self.url = url
        self.max_requests = max_requests
        self.sent = 0
        self.failures: list[str] = []
        self.versions: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._worker) for _ in range(threads)]

    def _take_ticket(self) -> bool:
        with self._lock:
            if self._stop.is_set() or self.sent >= self.max_requests:
                return False
            self.sent += 1
            return True

    def _worker(self) -> None:
        with httpx.Client(base_url=self.url, headers=HEADERS, timeout=30) as client:
            while self._take_ticket():
                try:
                    response = client.post("/v1/embed", json={"prompts": ["a red circle"]})
                    if response.status_code != 200:
                        self.failures.append(f"{response.status_code}: {response.text[:200]}")
                    else:
                        with self._lock:
                            self.versions.append(response.json()["version"])
                except httpx.HTTPError as err:
                    self.failures.append(repr(err))
                time.sleep(0.02)

    def wait_for_more(self, count: int, timeout: float = 60.0) -> None:
        target, deadline = self.sent + count, time.monotonic() + timeout
        while self.sent < min(target, self.max_requests) and time.monotonic() < deadline:
            time.sleep(0.05)

    def __enter__(self) -> EmbedLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def test_hot_swap_under_load_promote_then_rollback_fails_no_request(stack):
    from suradapter.registry import promote, rollback

    a, b = stack.versions["a"], stack.versions["b"]
    before = np.array(stack.client.post("/v1/embed", json={"prompts": ["x"]}).json()["embeddings"])
    with EmbedLoad(stack.url) as load:
        load.wait_for_more(40)
        promote(stack.params, version=b)
        stack.wait_until(lambda s: s["version"] == b, f"version {b} after promote")
        load.wait_for_more(40)
        rollback(stack.params)
        stack.wait_until(lambda s: s["version"] == a, f"version {a} after rollback")
        load.wait_for_more(40)
    assert load.sent < load.max_requests, "the load ran out before both swaps were seen"
    assert load.failures == [], load.failures[:5]
    seen = [v for i, v in enumerate(load.versions) if i == 0 or v != load.versions[i - 1]]
    assert seen[0] == a and b in seen and seen[-1] == a, seen
    after = np.array(stack.client.post("/v1/embed", json={"prompts": ["x"]}).json()["embeddings"])
    np.testing.assert_array_equal(before, after)
    assert stack.ready()["last_swap_error"] is None


def test_a_version_failing_its_checksums_never_serves_and_the_error_shows(stack):
    from suradapter.registry import promote, rollback

    a, c = stack.versions["a"], stack.versions["c"]
    promote(stack.params, version=c)
    state = stack.wait_until(lambda s: s["last_swap_error"], f"the error of version {c}")
    assert state["version"] == a and state["ready"]
    assert f"version {c}" in state["last_swap_error"]
    assert "text_path.onnx" in state["last_swap_error"]
    response = stack.client.post("/v1/embed", json={"prompts": ["still serving"]})
    assert response.status_code == 200 and response.json()["version"] == a
    metrics = stack.client.get("/metrics").text
    assert 'sur_model_swaps_total{result="failed"}' in metrics
    rollback(stack.params)
    stack.wait_until(lambda s: s["last_swap_error"] is None, "the error to clear after rollback")
