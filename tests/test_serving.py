"""`serving`: a real uvicorn process on loopback, fed by a real MLflow registry on S3 (rclone).

One module-scoped stack: the S3 and MLflow servers, four registered versions of the tiny
model (a and b; c, whose ONNX file and SHA256SUMS are rewritten together in the bucket after
registration; d, whose gates failed), and `sur serve` serving `@production`. Tests
run in file order: the read-only checks first, then the hot swaps, which move the alias.
Promotion's own rules (the head-to-head with production) are tested in test_registry; here
the alias is moved by hand, as an operator with registry access can, or by `rollback`.

No outcome depends on timing: requests are held in flight by the real lock of the base
pipeline, and the hot swap waits for counted responses, not for seconds.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import servers
import torch
import yaml
from fastapi.testclient import TestClient
from PIL import Image
from test_registry import FAILING_METRICS, PASSING_METRICS, make_report, rewrite_consistently

from serving.app import create_app
from suradapter.config import Params, load_params
from suradapter.export.onnx_export import export_text_path
from suradapter.model.adapter import SURAdapter
from suradapter.model.text_path import AdaptedTextPath
from suradapter.provenance import ADAPTER_WEIGHTS, sha256_file
from suradapter.waiting import ready_process, wait_until

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
SUR = Path(sys.executable).parent / "sur"
HUNG_S = 120.0  # a wait's limit in these tests only stops a hung test; it decides nothing
PARTS = ("adapter", "export", "eval")
HEADERS = {"X-API-Key": KEY_FROM_ENV}


@dataclass
class Stack:
    url: str
    params: Params
    versions: dict[str, str]  # a, b (good), c (rewritten), d (failed gates) -> version
    log: Path
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.url, headers=HEADERS, timeout=60)

    def ready(self) -> dict:
        return self.client.get("/readyz").json()

    def wait_until(self, predicate, what: str, timeout: float = 90.0) -> dict:
        """The first /readyz state that `predicate` accepts."""

        def accepted() -> dict | None:
            state = self.ready()
            return state if predicate(state) else None

        return wait_until(
            accepted,
            timeout,
            what,
            interval_s=0.2,
            detail=lambda: f"/readyz: {self.ready()}\n{self.log.read_text()[-3000:]}",
        )

    def move_production(self, version: str) -> None:
        """Point @production at `version` by hand, bypassing `promote`'s checks."""
        servers.move_production(self.params.registry.model_name, version)


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
    write_report(folder / "eval", folder / "adapter", params, PASSING_METRICS)
    return folder / "adapter", folder / "export", folder / "eval"


def write_report(folder: Path, adapter: Path, params: Params, metrics: dict) -> Path:
    """A report.json as `sur evaluate` writes it, its gates derived from `metrics`."""
    sha = sha256_file(adapter / ADAPTER_WEIGHTS)
    report = make_report(sha, metrics, params.evaluate.gates)
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps(report))
    return folder


@contextmanager
def serving_process(folder: Path, params_path: Path, repo_root: Path) -> Iterator[str]:
    """`sur serve` on a free loopback port; yields its URL once /readyz is 200."""
    port = servers.free_port()
    keys = folder / "api-keys.txt"
    keys.write_text(f"# keys for the test\n{KEY_FROM_FILE}\n")
    env = {
        **os.environ,
        "SUR_API_KEYS": KEY_FROM_ENV,
        "SUR_API_KEYS_FILE": str(keys),
        "PYTHONUNBUFFERED": "1",
    }
    command = [str(SUR), "--params", str(params_path), "--profile", "tiny", "serve"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with ready_process(
        command,
        folder / "serving.log",
        lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200,
        180,
        f"serving at {url} to get ready",
        cwd=repo_root,
        env=env,
        retry_on=(httpx.HTTPError,),
    ):
        yield url


@pytest.fixture(scope="module")
def stack(tmp_path_factory, repo_root, tiny_pipeline) -> Iterator[Stack]:
    from mlflow.tracking import MlflowClient

    from suradapter.registry import promote, register_version

    root = tmp_path_factory.mktemp("serving")
    with (
        pytest.MonkeyPatch.context() as patch,
        servers.registry_servers(root, patch.setenv) as (tracking, s3),
    ):
        patch.setenv("MLFLOW_TRACKING_URI", tracking)
        params_path = write_params(root, repo_root)
        params = load_params(params_path, profile="tiny")
        model, versions = params.registry.model_name, {}
        for name, seed in (("a", 1), ("b", 2)):
            folders = build_version(tiny_pipeline, params, root / name, seed)
            versions[name] = register_version(params, *folders).version
        versions["c"] = register_version(params, *[root / "a" / p for p in PARTS]).version
        source = MlflowClient().get_model_version(model, versions["c"]).source
        onnx = (root / "a" / "export" / "text_path.onnx").read_bytes()
        rewrite_consistently(s3, source, "export/text_path.onnx", onnx + b"\0")
        failing = write_report(root / "d-eval", root / "a" / "adapter", params, FAILING_METRICS)
        d = register_version(params, root / "a" / "adapter", root / "a" / "export", failing)
        assert not d.passed
        versions["d"] = d.version
        promote(params, version=versions["a"])
        with serving_process(root, params_path, repo_root) as url:
            yield Stack(url, params, versions, root / "serving.log")


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
        [str(SUR), "--profile", "tiny", "serve", "--port", "1"],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "SUR_API_KEYS" in output and "Traceback" not in output


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


BATCHED_PROMPTS = [
    ["a trio of fire-truck coloured coins lying in the snow"],
    ["", "3 red circles"],
    ["two green squares on a white background", "a blue triangle", "one yellow star"],
    ["a woman in a white dress with angel wings"],
    ["1 red circle"] * 2,
    ["a lone stop-sign coloured poker chip, nothing else in sight"],
]


def embedded(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    body = response.json()
    return np.frombuffer(base64.b64decode(body["data_base64"]), "<f4").reshape(body["shape"])


def test_concurrent_embeds_share_one_call_and_each_gets_its_single_request_rows(stack, tmp_path):
    """The first request's call is held by the tokenizer lock, which the test takes; the
    others queue behind it and run as one batch, whatever the timing."""
    from prometheus_client.parser import text_string_to_metric_families

    settings = stack.params.serving.model_copy(update={"cache_dir": str(tmp_path / "cache")})
    app = create_app(stack.params, settings, (KEY_FROM_ENV.encode(),))

    def batch_figures(client: httpx.Client) -> dict[str, float]:
        families = text_string_to_metric_families(client.get("/metrics").text)
        return {
            s.name + (f'{{le="{s.labels["le"]}"}}' if "le" in s.labels else ""): s.value
            for family in families
            for s in family.samples
            if "_batch_" in s.name
        }

    # TestClient runs the app on one event loop, which serves the requests of every thread
    with (
        TestClient(app, headers=HEADERS) as client,
        ThreadPoolExecutor(len(BATCHED_PROMPTS)) as pool,
    ):
        wait_for(lambda: client.get("/readyz").status_code == 200, "the app to serve a version")

        def embed(prompts: list[str]) -> np.ndarray:
            return embedded(
                client.post("/v1/embed", json={"prompts": prompts, "encoding": "base64"})
            )

        alone = [embed(prompts) for prompts in BATCHED_PROMPTS]  # one after another: alone
        before = batch_figures(client)
        with app.state.slot.current.token_lock:
            futures = [pool.submit(embed, BATCHED_PROMPTS[0])]
            wait_for(lambda: gauge(client, "sur_text_path_running") == 1, "the held call")
            futures += [pool.submit(embed, prompts) for prompts in BATCHED_PROMPTS[1:]]
            queued = len(BATCHED_PROMPTS) - 1
            wait_for(lambda: gauge(client, "sur_text_path_waiting") == queued, "the queue")
        together = [future.result(timeout=HUNG_S) for future in futures]
        after = batch_figures(client)
    for single, batched in zip(alone, together, strict=True):
        assert single.dtype == batched.dtype and single.shape == batched.shape
        assert single.tobytes() == batched.tobytes()  # bit for bit
    grew = {name: after[name] - before.get(name, 0.0) for name in after}
    assert grew["sur_text_path_batch_requests_count"] == 2  # the held call, then the rest
    assert grew["sur_text_path_batch_requests_sum"] == len(BATCHED_PROMPTS)
    assert grew["sur_text_path_batch_rows_sum"] == sum(map(len, BATCHED_PROMPTS))
    assert grew['sur_text_path_batch_requests_bucket{le="4.0"}'] == 1  # the held call alone


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


def wait_for(predicate: Callable[[], object], what: str) -> None:
    """Return once `predicate()` holds (`wait_until` at this module's limit and pace)."""
    wait_until(predicate, HUNG_S, what, interval_s=0.05)


def gauge(client: httpx.Client, name: str) -> float:
    """The value of an unlabelled gauge on /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(client.get("/metrics").text)
    return next(f.samples[0].value for f in families if f.name == name)


def test_generate_beyond_the_concurrency_limit_gets_429(stack, tmp_path):
    """The first request is held inside its generate slot by the base pipeline's own lock,
    which the test takes; so the second one finds no free slot, whatever the timing."""
    settings = stack.params.serving.model_copy(update={"cache_dir": str(tmp_path / "cache")})
    app = create_app(stack.params, settings, (KEY_FROM_ENV.encode(),))
    request = {"prompt": "a red circle", "steps": 1}
    # TestClient runs the app on one event loop, which serves the requests of every thread
    with (
        TestClient(app, headers=HEADERS) as client,
        ThreadPoolExecutor(1) as pool,
    ):
        wait_for(lambda: client.get("/readyz").status_code == 200, "the app to serve a version")
        served = app.state.slot.current
        assert served.version == stack.versions["a"]
        with served.base.lock:  # every render takes it: the first request waits in its slot
            first = pool.submit(client.post, "/v1/generate", json=request)
            wait_for(lambda: gauge(client, "sur_generate_in_progress") == 1, "a held slot")
            refused = client.post("/v1/generate", json=request)
            assert refused.status_code == 429, refused.text
            assert "max_concurrent_generate" in refused.json()["detail"]
            assert refused.headers["retry-after"] == "1"
            assert not first.done()
        assert first.result(timeout=HUNG_S).status_code == 200
        assert gauge(client, "sur_generate_in_progress") == 0
        assert client.post("/v1/generate", json=request).status_code == 200  # the slot is free


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
    """Embed requests from `threads` threads until stopped; each response's version is kept
    in arrival order, so a test waits for counted responses rather than for time."""

    def __init__(self, url: str, threads: int = 4) -> None:
        self.url = url
        self.versions: list[str] = []
        self.failures: list[str] = []
        self._arrived = threading.Condition()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._worker) for _ in range(threads)]

    def _worker(self) -> None:
        with httpx.Client(base_url=self.url, headers=HEADERS, timeout=30) as client:
            while not self._stop.is_set():
                try:
                    response = client.post("/v1/embed", json={"prompts": ["a red circle"]})
                except httpx.HTTPError as err:
                    failure, version = repr(err), None
                else:
                    ok = response.status_code == 200
                    failure = None if ok else f"{response.status_code}: {response.text[:200]}"
                    version = response.json()["version"] if ok else None
                with self._arrived:
                    if failure is not None:
                        self.failures.append(failure)
                    else:
                        self.versions.append(version)
                    self._arrived.notify_all()
                self._stop.wait(0.01)  # pacing for a 2-core machine; it decides nothing

    def mark(self) -> int:
        """The number of responses so far (a position in `versions`)."""
        with self._arrived:
            return len(self.versions)

    def wait_for(self, version: str, count: int, since: int, timeout: float = 120.0) -> None:
        """Return once `count` responses from `version` arrived after position `since`, or a
        request failed; the timeout only stops a hung test."""
        with self._arrived:
            done = self._arrived.wait_for(
                lambda: self.failures or self.versions[since:].count(version) >= count, timeout
            )
        assert done, f"no {count} responses from version {version}: {self.versions[since:][-9:]}"

    def __enter__(self) -> EmbedLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def test_hot_swap_under_load_move_then_rollback_fails_no_request(stack):
    from suradapter.registry import rollback

    a, b = stack.versions["a"], stack.versions["b"]
    before = np.array(stack.client.post("/v1/embed", json={"prompts": ["x"]}).json()["embeddings"])
    with EmbedLoad(stack.url) as load:
        load.wait_for(a, 20, since=0)
        moved = load.mark()
        stack.move_production(b)
        stack.wait_until(lambda s: s["version"] == b, f"version {b} after the move")
        swapped = load.mark()
        load.wait_for(b, 20, since=swapped)
        rollback(stack.params)
        stack.wait_until(lambda s: s["version"] == a, f"version {a} after rollback")
        load.wait_for(a, 20, since=load.mark())
    assert load.failures == [], load.failures[:5]
    assert set(load.versions[:moved]) == {a}  # nothing but a before the alias moved
    assert b in load.versions[swapped:]
    after = np.array(stack.client.post("/v1/embed", json={"prompts": ["x"]}).json()["embeddings"])
    np.testing.assert_array_equal(before, after)
    assert stack.ready()["last_swap_error"] is None


def test_a_version_rewritten_with_its_sha256sums_never_serves_and_the_error_shows(stack):
    from suradapter.registry import RegistryError, promote, rollback

    a, c = stack.versions["a"], stack.versions["c"]
    with pytest.raises(RegistryError, match="SHA256SUMS differs from the registry's record"):
        promote(stack.params, version=c)  # promotion refuses it; an operator moves it anyway
    stack.move_production(c)
    state = stack.wait_until(lambda s: s["last_swap_error"], f"the error of version {c}")
    assert state["version"] == a and state["ready"]
    error = state["last_swap_error"]
    assert f"version {c}" in error
    assert "artifacts/export/text_path.onnx: sha256 differs from the registry's record" in error
    response = stack.client.post("/v1/embed", json={"prompts": ["still serving"]})
    assert response.status_code == 200 and response.json()["version"] == a
    metrics = stack.client.get("/metrics").text
    assert 'sur_model_swaps_total{result="failed"}' in metrics
    rollback(stack.params)
    stack.wait_until(lambda s: s["last_swap_error"] is None, "the error to clear after rollback")


def test_a_version_whose_gates_failed_is_not_served_when_moved_to_production_by_hand(stack):
    from suradapter.registry import rollback

    a, d = stack.versions["a"], stack.versions["d"]
    stack.move_production(d)
    state = stack.wait_until(lambda s: s["last_swap_error"], f"the error of version {d}")
    assert state["version"] == a and state["ready"]
    error = state["last_swap_error"]
    assert error.startswith(f"version {d}: its gate_verdict tag is 'failed' (gate retrieval_gain")
    assert error.endswith("serving loads only versions whose gates passed")
    response = stack.client.post("/v1/embed", json={"prompts": ["still serving"]})
    assert response.status_code == 200 and response.json()["version"] == a
    rollback(stack.params)
    stack.wait_until(lambda s: s["last_swap_error"] is None, "the error to clear after rollback")
    assert stack.ready()["version"] == a
