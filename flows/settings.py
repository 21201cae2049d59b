"""Names, schedules and retry policy of the flows: one place, documented in flows/README.md."""

from __future__ import annotations

# The DVC stages the retrain flow runs, in order (each is `dvc repro --single-item <stage>`).
# `generate_shapes` only runs when the SURD source is the rendered shapes world.
STAGES = (
    "generate_shapes", "prepare", "embed", "bootstrap_base", "encode", "train", "evaluate", "export"
)  # fmt: skip
SHAPES_STAGE = "generate_shapes"

# Transient failures (a killed stage, a locked DVC repo, a tracking server restarting) are
# retried: attempts 2 and 3 start after 10 s and 20 s (exponential backoff, +/-20% jitter).
STAGE_RETRIES = 2
REGISTRY_RETRIES = 2
RETRY_BACKOFF_S = 10.0
RETRY_JITTER = 0.2

RETRAIN_FLOW = "retrain"
CHECK_FLOW = "surd-data-check"
RETRAIN_DEPLOYMENT = "scheduled"  # retrain/scheduled
CHECK_DEPLOYMENT = "on-data-change"  # surd-data-check/on-data-change
WORK_POOL = "sur-local"  # a process work pool: flow runs are subprocesses on this machine
RETRAIN_CRON = "0 3 * * 0"  # Sundays 03:00 (server time zone UTC unless --timezone)
CHECK_CRON = "*/15 * * * *"  # every 15 minutes

LOCK_FILE = ".sur/retrain.lock"  # one retrain at a time per checkout (its DVC workspace)
RETRAIN_SLOT = "sur-retrain"  # and one at a time among all that share the Prefect server
LOG_DIR = ".sur/flows"  # stage logs: <LOG_DIR>/<flow run name>/<stage>-<attempt>.log
