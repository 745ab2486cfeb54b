"""Process set-up shared by every entry point: the Ray / MLflow environment and a local Ray start.

The environment defaults below are needed on a single machine without internet: Ray 2.60 turns token auth
on (job submission then fails), tries to upload usage stats, and without single-node mode binds to a
public interface; MLflow sends telemetry. They are *defaults*: a value already set wins.
"""

from __future__ import annotations

import logging
import os

ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "RAY_DEDUP_LOGS": "1",
}

LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2  # Ray's default takes 30% of RAM


def apply_env_defaults() -> None:
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = False):
    """Join ``address`` (or $RAY_ADDRESS, e.g. inside ``ray job submit``) or start an embedded local Ray.

    Idempotent: returns at once when Ray is already initialised in this process.
    """
    apply_env_defaults()
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=not quiet)
    else:
        ray.init(
            address="local",  # always a fresh embedded cluster, never a stale `ray start` one
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            log_to_driver=not quiet,
            logging_level=logging.WARNING,
        )
    return ray


def set_data_progress(enabled: bool) -> None:
    """Turn Ray Data progress bars on (CLI) or off (tests, benchmarks)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = enabled
    ctx.enable_operator_progress_bars = enabled
    ctx.print_on_execution_start = enabled
