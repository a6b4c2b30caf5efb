"""How stage tasks retry, and why none of them caches.

No task has a cache policy. Prefect caching would return a stored result without running the task body, and
the body is what writes ``artifacts/<stage>/``: ``dvc repro`` deletes a stage's outputs before it runs the
stage (all but the training checkpoints, kept for resuming), so a cached task would leave DVC with missing
outputs (or stale ones from another run). DVC decides
what needs to run; Prefect always runs what it is asked to.
"""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import NO_CACHE

# errors that say the input is wrong, which a second attempt cannot fix
_PERMANENT_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry I/O and network failures (ConnectionError, TimeoutError, a flaky
    network mount), not bad params, data or code."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, OSError) and not isinstance(error, _PERMANENT_OS_ERRORS)


# Tasks that read and write files (or download): a hiccup is worth two more tries, a little later.
IO_TASK: dict[str, Any] = {
    "retries": 2,
    "retry_delay_seconds": [10, 60],
    "retry_condition_fn": is_transient,
    "cache_policy": NO_CACHE,
}

# Training is long and resumes from its own checkpoints: a failure needs a person, not a blind rerun.
TRAINING_TASK: dict[str, Any] = {"retries": 0, "cache_policy": NO_CACHE}
