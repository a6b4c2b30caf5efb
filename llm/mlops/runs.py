"""Runs and registered versions side by side in the terminal (``llm runs``), and the difference of two runs.

Reads the tracking store that the stages write (``llm.mlops.tracking.tracking_uri``): the latest runs of the
experiment with the metrics that every training run logs under the same keys, the versions of ``gpt`` with
their promotion decision, and, for two chosen runs, every param, metric and lineage tag with the values that
differ highlighted. Tables are ``rich`` tables; ``print_*`` writes them to a console.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from rich import box
from rich.console import Console
from rich.table import Table

from llm.mlops.lookup import MODEL_NAME, RegistryError, all_versions, not_found, registry_client
from llm.mlops.tracking import LINEAGE_KEYS, experiment_name, set_uris, sqlite_path, tracking_uri

# (column title, metric key, format) of the runs table: the summary every training run ends with
RUN_METRICS = (
    ("val/bpb", "val/bpb", "{:.4f}"),
    ("val/loss", "val/loss", "{:.4f}"),
    ("chat bpb", "chat/assistant_bpb", "{:.4f}"),
    ("tokens/s", "perf/tokens_per_s", "{:,.0f}"),
    ("params", "model/parameters", "{:,.0f}"),
    ("wall s", "perf/wall_time_s", "{:,.0f}"),
)
DIFFERENT = "bold yellow"  # the style of a row whose values differ between the two runs
SAME = "dim"
SYSTEM_PREFIX = "system/"  # MLflow's CPU/memory samples: they always differ and say nothing about the model


class RunsError(RegistryError):
    """A run reference that names no run, or names several; or no tracking store to read."""


def _client() -> MlflowClient:
    set_uris()
    db = sqlite_path(tracking_uri())
    if db is not None and not db.exists():
        raise RunsError(f"no tracking database at {db}: run a stage first (`dvc repro`, `llm pretrain`), or set "
                        "MLFLOW_TRACKING_URI")
    return MlflowClient(tracking_uri=tracking_uri())


def _experiment_id(client: MlflowClient) -> str:
    experiment = client.get_experiment_by_name(experiment_name())
    if experiment is None:
        raise RunsError(f"no experiment '{experiment_name()}' in {tracking_uri()}: run a stage first")
    return experiment.experiment_id


def recent_runs(limit: int = 15, *, stage: str | None = None, client: MlflowClient | None = None) -> list[Run]:
    """The ``limit`` latest runs of the experiment (newest first), of one ``stage`` when given."""
    client = client or _client()
    where = f"tags.stage = '{stage}'" if stage else ""
    return list(client.search_runs([_experiment_id(client)], filter_string=where, max_results=limit,
                                   order_by=["attributes.start_time DESC"]))


MIN_PREFIX = 4  # the shortest start of a run id that names it


def _candidates(runs: Sequence[Run]) -> str:
    return "; ".join(f"{r.info.run_id[:8]} {r.info.run_name or ''} ({_when(r.info.start_time)})".strip()
                     for r in runs[:6]) + ("; ..." if len(runs) > 6 else "")


def find_run(ref: str, *, client: MlflowClient | None = None) -> Run:
    """The run that ``ref`` names: a run id, the start of one (``MIN_PREFIX`` characters or more), or a run
    name. Raises RunsError when none matches, or when several do (a prefix of several ids, a name that several
    runs share: a rerun keeps its name), listing the candidates."""
    client = client or _client()
    try:
        return client.get_run(ref)
    except MlflowException as err:
        if not not_found(err) and "INVALID_PARAMETER_VALUE" not in str(err.error_code):
            raise
    runs = client.search_runs([_experiment_id(client)], max_results=5000, order_by=["attributes.start_time DESC"])
    by_id = [r for r in runs if len(ref) >= MIN_PREFIX and r.info.run_id.startswith(ref)]
    by_name = [r for r in runs if r.info.run_name == ref]
    if len(by_id) == 1 and not by_name:
        return by_id[0]
    if len(by_name) == 1 and not by_id:
        return by_name[0]
    if by_id or by_name:
        found = by_id + [r for r in by_name if r not in by_id]
        raise RunsError(f"'{ref}' names {len(found)} runs: {_candidates(found)}; give more characters of the "
                        "run id")
    short = [r for r in runs if r.info.run_id.startswith(ref)] if 0 < len(ref) < MIN_PREFIX else []
    if short:
        raise RunsError(f"'{ref}' is too short: give at least {MIN_PREFIX} characters of a run id "
                        f"({_candidates(short)})")
    raise RunsError(f"no run '{ref}' (a run id, its first {MIN_PREFIX} characters or more, or a run name) in "
                    f"experiment '{experiment_name()}' at {tracking_uri()}; `llm runs` lists them")


def _metric(run: Run, key: str, fmt: str) -> str:
    value = run.data.metrics.get(key)
    return "" if value is None else fmt.format(value)


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%m-%d %H:%M") if ms else ""


WIDE = 120  # terminal columns from which the tables show every column; narrower, the essential ones
# the metrics of the narrow runs table: bits per byte, which compare across tokenizers
NARROW_METRICS = ("val/bpb", "chat bpb")


def runs_table(runs: Sequence[Run], width: int = WIDE) -> Table:
    """One row per run: name, stage, status, start (UTC), the summary metrics, the version it registered, id.
    Below ``WIDE`` columns: name (wrapped, with the status when not FINISHED), start, val/bpb, chat bpb,
    version and id, so that an 80-column terminal shows every value whole."""
    narrow = width < WIDE
    table = Table(title=f"Latest runs of experiment '{experiment_name()}'", title_justify="left",
                  box=box.SIMPLE_HEAD if narrow else box.HEAVY_HEAD, pad_edge=not narrow)
    metrics = [m for m in RUN_METRICS if not narrow or m[0] in NARROW_METRICS]
    table.add_column("run", ratio=1 if narrow else None, overflow="fold")
    for title in ("stage", "status", "started") if not narrow else ("started",):
        table.add_column(title, no_wrap=True)
    for title, _, _ in metrics:
        table.add_column(title, justify="right", no_wrap=True)
    table.add_column("v" if narrow else "version", no_wrap=True)
    table.add_column("run id", style="dim", no_wrap=True)
    for run in runs:
        status = run.info.status
        styled = f"[{ {'FINISHED': 'green', 'RUNNING': 'cyan'}.get(status, 'red') }]{status}[/]"
        version = run.data.tags.get("registered_model.version", "").removeprefix(f"{MODEL_NAME}/")
        name = run.info.run_name or ""
        if narrow:
            cells = [name if status == "FINISHED" else f"{name} {styled}", _when(run.info.start_time)]
        else:
            cells = [name, run.data.tags.get("stage", ""), styled, _when(run.info.start_time)]
        table.add_row(*cells, *(_metric(run, key, fmt) for _, key, fmt in metrics), version, run.info.run_id[:8])
    return table


@dataclass(frozen=True)
class VersionRow:
    version: str
    where: str  # "Production (alias production)", "Archived", ...
    stage: str  # the training stage that registered it
    run_name: str
    metric: str
    score: str
    baseline: str
    decision: str


def version_rows(client: MlflowClient | None = None, limit: int = 15) -> list[VersionRow]:
    """The latest ``limit`` versions of ``gpt`` (newest first) with their promotion decision and scores."""
    client = client or registry_client(must_exist=False)
    if client is None:
        return []
    try:
        versions = all_versions(client, MODEL_NAME)
    except MlflowException as err:
        if not_found(err):
            return []
        raise
    rows = []
    for found in sorted(versions, key=lambda v: int(v.version), reverse=True)[:limit]:
        v = client.get_model_version(MODEL_NAME, str(found.version))  # a search leaves the aliases out
        decision = {}
        if v.tags.get("promotion.decision"):
            try:
                decision = json.loads(v.tags["promotion.decision"])
            except ValueError:
                decision = {}
        where = "" if v.current_stage in (None, "None") else v.current_stage
        if v.aliases:
            where += f" (@{', @'.join(v.aliases)})"
        try:
            run_name = client.get_run(v.run_id).info.run_name if v.run_id else ""
        except MlflowException:
            run_name = ""

        def score(value) -> str:
            return "" if value is None else f"{float(value):.4f}"

        verdict = ("promoted" if decision.get("promoted") else "not promoted") if decision else "not evaluated"
        baseline = score(decision.get("production_score"))
        if baseline and decision.get("production"):
            baseline += f" (v{decision['production']})"
        rows.append(VersionRow(str(v.version), where.strip(), v.tags.get("llm.stage", v.tags.get("stage", "")),
                               run_name or "", decision.get("metric", ""), score(decision.get("candidate_score")),
                               baseline, verdict))
    return rows


def versions_table(rows: Sequence[VersionRow], width: int = WIDE) -> Table:
    """One row per registered version: where it is (stage, aliases), what trained it, the decision and scores.
    Below ``WIDE`` columns the training stage and the metric's name (both in the title) are left out."""
    narrow = width < WIDE
    metrics = sorted({row.metric for row in rows if row.metric})
    title = f"Registered versions of '{MODEL_NAME}'"
    if narrow and metrics:
        title += f" (scores: {', '.join(metrics)}; lower is better)"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD if narrow else box.HEAVY_HEAD,
                  pad_edge=not narrow)
    titles = ("version", "stage / alias", "trained by", "run", "metric", "score", "Production then", "decision")
    if narrow:
        titles = ("v", "stage / alias", "run", "score", "Production then", "decision")
    for name in titles:
        right = name in ("score", "Production then")
        table.add_column(name, justify="right" if right else "left", overflow="fold",
                         ratio=1 if narrow and name in ("stage / alias", "run") else None,
                         no_wrap=narrow and name not in ("stage / alias", "run", "Production then"))
    for row in rows:
        style = "bold green" if "Production" in row.where else None
        cells = (row.version, row.where, row.stage, row.run_name, row.metric, row.score, row.baseline, row.decision)
        if narrow:
            cells = (row.version, row.where, row.run_name, row.score, row.baseline, row.decision)
        table.add_row(*cells, style=style)
    return table


@dataclass(frozen=True)
class DiffRow:
    kind: str  # "param", "metric" or "tag"
    key: str
    a: str
    b: str

    @property
    def differs(self) -> bool:
        return self.a != self.b


def _metric_text(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if value.is_integer() and abs(value) >= 1e4 else f"{value:.6g}"


def diff_rows(a: Run, b: Run, *, only_different: bool = False) -> list[DiffRow]:
    """Every param, (final) metric and lineage tag of runs ``a`` and ``b`` (empty where a run lacks it),
    params first; MLflow's system metrics are left out. With ``only_different``, the rows that differ."""
    rows: list[DiffRow] = []
    for key in sorted(set(a.data.params) | set(b.data.params)):
        rows.append(DiffRow("param", key, a.data.params.get(key, ""), b.data.params.get(key, "")))
    metrics = set(a.data.metrics) | set(b.data.metrics)
    for key in sorted(k for k in metrics if not k.startswith(SYSTEM_PREFIX)):
        a_value, b_value = a.data.metrics.get(key), b.data.metrics.get(key)
        rows.append(DiffRow("metric", key, _metric_text(a_value), _metric_text(b_value)))
    for key in (*LINEAGE_KEYS, "registered_model.version"):
        if key in a.data.tags or key in b.data.tags:
            rows.append(DiffRow("tag", key, a.data.tags.get(key, ""), b.data.tags.get(key, "")))
    return [r for r in rows if r.differs] if only_different else rows


def diff_table(a: Run, b: Run, rows: Sequence[DiffRow]) -> Table:
    """The rows of ``diff_rows`` as a table; the rows whose values differ are highlighted (``DIFFERENT``)."""
    different = sum(r.differs for r in rows)
    table = Table(title=f"{a.info.run_name} vs {b.info.run_name}: {different} of {len(rows)} values differ",
                  title_justify="left")
    table.add_column("")
    table.add_column("key")
    table.add_column(f"A  {a.info.run_name} ({a.info.run_id[:8]})", overflow="fold")
    table.add_column(f"B  {b.info.run_name} ({b.info.run_id[:8]})", overflow="fold")
    for row in rows:
        table.add_row(row.kind, row.key, row.a, row.b, style=DIFFERENT if row.differs else SAME)
    return table


def ui_url(experiment_id: str, base: str = "http://127.0.0.1:5000") -> str:
    """The experiment's runs in ``mlflow ui``. MLflow 3.17's UI shows the view that its sidebar switch
    ("GenAI" by default, kept per browser) names rather than the experiment's ``mlflow.experimentKind`` tag;
    ``workflowType=machine_learning`` opens the runs whatever the browser chose before."""
    return f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning"


def training_runs_url(base: str = "http://127.0.0.1:5000") -> str:
    """Where ``mlflow ui`` at ``base`` shows the pipeline's training runs: ``ui_url`` of the experiment's id, read
    from the SQLite tracking database; the experiments list on the same view when there is no database or no
    experiment yet (nothing is created to find out), or when the store is a tracking server (its own UI)."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments?workflowType=machine_learning"
    listing = f"{base}/#/experiments?workflowType=machine_learning"
    db = sqlite_path(uri)
    if db is None or not db.is_file():
        return listing
    try:
        return ui_url(_experiment_id(_client()), base)
    except Exception:  # noqa: BLE001 - an unreadable store (another schema, locked) costs the link its id, nothing more
        return listing


def print_overview(console: Console, *, limit: int = 15, stage: str | None = None) -> None:
    """The latest runs, then the registered versions, then where the MLflow UI shows them."""
    client = _client()
    console.print(runs_table(recent_runs(limit, stage=stage, client=client), console.width))
    rows = version_rows(limit=limit)
    if rows:
        console.print(versions_table(rows, console.width))
    else:
        console.print(f"No registered versions of '{MODEL_NAME}' yet.")
    console.print(f"In the MLflow UI (`mlflow ui --backend-store-uri {tracking_uri()} --host 127.0.0.1`): "
                  f"{ui_url(_experiment_id(client))}", soft_wrap=True, highlight=False)


def print_diff(console: Console, ref_a: str, ref_b: str, *, only_different: bool = False) -> None:
    """The params, metrics and lineage tags of two runs side by side, differences highlighted."""
    client = _client()
    a, b = find_run(ref_a, client=client), find_run(ref_b, client=client)
    console.print(diff_table(a, b, diff_rows(a, b, only_different=only_different)))
