"""Benchmark the main job from a fresh clone: `sur run` once from nothing, then once more.

Clones the repository's committed HEAD into a temporary folder (the existing .venv is reused,
linked, not rebuilt), gives the clone's local stack free ports, then times two `sur run`s:
the first from a fresh clone (stack start-up, every DVC stage, registration, promotion by
policy), the second with nothing changed (DVC skips every stage, the identical version is
reused). Stops the clone's stack at the end.

    .venv/bin/python bench/run.py [--keep]

Prints `RESULT run_fresh_s <s>`, `RESULT run_noop_s <s>` and `RESULT noop_ratio <x>`
(targets: fresh <= 900 s on a 2-core CPU, ratio <= 0.10).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# A developer's own stack or tracking settings must not leak into the clone's runs.
CLEARED_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_S3_ENDPOINT_URL",
    "PREFECT_API_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "SUR_PARAMS",
    "SUR_PROFILE",
    "SUR_NO_STACK_ENV",
)
PORT_KEYS = ("prefect_port", "mlflow_port", "s3_port")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clone(dest: Path) -> Path:
    """`git clone` of this repository's HEAD into `dest`, with .venv linked to this one."""
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(dest)], check=True)
    (dest / ".venv").symlink_to(BIN.parent)
    params = dest / "params.yaml"
    text = params.read_text()
    for key in PORT_KEYS:  # edited in place: comments and key order stay as they are
        text, count = re.subn(rf"(?m)^(  {key}:) \d+", rf"\g<1> {free_port()}", text)
        assert count == 1, f"params.yaml: stack.{key} not found"
    params.write_text(text)
    return dest


def timed_run(project: Path, env: dict[str, str], log: Path) -> float:
    """Run `sur run` in `project` (output to the terminal and `log`); return its seconds."""
    start = time.perf_counter()
    with log.open("wb") as handle:
        command = [str(BIN / "sur"), "run"]
        process = subprocess.Popen(
            command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert process.stdout is not None
        while chunk := process.stdout.read1(65536):
            handle.write(chunk)
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
        code = process.wait()
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"`sur run` failed (exit {code}) in {project}; log: {log}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="Keep the clone (and its logs).")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-run-"))
    project = clone(scratch / "repo")
    env = {key: value for key, value in os.environ.items() if key not in CLEARED_ENV}
    env |= {"DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    try:
        fresh_s = timed_run(project, env, scratch / "run_fresh.log")
        first = json.loads((project / "outputs/run/summary.json").read_text())
        noop_s = timed_run(project, env, scratch / "run_noop.log")
        again = json.loads((project / "outputs/run/summary.json").read_text())
    finally:
        subprocess.run([str(BIN / "sur"), "stack", "down"], cwd=project, env=env, check=False)
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    ran_again = [stage["stage"] for stage in again["stages"] if stage["status"] == "ran"]
    version, reused = again["registration"]["version"], again["registration"]["reused"]
    registered = first["registration"]
    print(
        f"fresh run: version {registered['version']}, gates passed: {registered['passed']}, "
        f"aliases: {registered['aliases']}"
    )
    print(f"no-op run: stages DVC ran: {ran_again or 'none'}; version {version} reused: {reused}")
    if args.keep:
        print(f"clone kept: {project} (logs beside it)")
    print(f"RESULT run_fresh_s {fresh_s:.1f}")
    print(f"RESULT run_noop_s {noop_s:.1f}")
    print(f"RESULT noop_ratio {noop_s / fresh_s:.3f}")


if __name__ == "__main__":
    main()
