"""Overhead per pipeline stage: the time from ``dvc repro`` starting a stage's command to the stage's first real
work, and from the end of its work to the process's exit.

Each stage's command is read from ``dvc.yaml`` (``python -m flows clean``, ...) and run as dvc runs it: through
``$SHELL -c`` (else ``/bin/sh -c``) in the project folder, with ``DVC_ROOT`` and ``DVC_STAGE`` set, after its
outputs are deleted. The project is a scratch copy: ``params/`` with the small settings of ``TINY_PARAMS`` (so
the work takes seconds and the overhead shows) and the first ``--corpus-files`` files of ``data/corpus`` (run
``llm data fetch`` first). Runs go to the pipeline's Prefect server of a ``PREFECT_HOME`` of the scratch
folder (started before the first timed run and stopped at the end) and to ``mlflow.db`` in the scratch project.

What is timed, in the wall clock of this machine (each stage's process writes the moments into a file):

- ``start``: just before this script starts the shell, the moment dvc starts the command;
- ``stage``: the call of the stage function ``llm.stages.<stage>_stage`` (reached through the Prefect flow);
- ``work``: the first call of the library function that does the stage's work (``WORK_FUNCTIONS``: cleaning the
  corpus, training the tokenizer, encoding, the training loop, preparing the chat data, scoring, the ONNX
  export). Between ``stage`` and ``work`` the stage function opens its MLflow run and imports what it needs;
- ``done``: the return of the stage function (its MLflow logging and model registration are work);
- ``exit``: this script sees the process exit (Prefect finishing its runs, the process's exit handlers).

The moments come from a ``sitecustomize`` module that this script writes into the scratch folder and puts on the
stage's ``PYTHONPATH``: only when ``STAGE_OVERHEAD_MARKS`` names a file (this script's runs) does it wrap those
functions, as their modules are imported, to append ``{"event", "name", "t"}`` lines to that file. The stage's
code is not changed, so the same script measures any checkout.

The table shows, per stage, medians over ``--repeats`` runs: ``to work`` (start -> work: the overhead before the
work), ``work`` (work -> done), ``teardown`` (done -> exit), ``overhead`` (to work + teardown) and ``total``
(start -> exit). ``--code DIR`` (repeatable) measures several checkouts (each in a scratch project of its own,
runs interleaved so that a change of load hits both), side by side.

Usage:
    python bench/stage_overhead.py                                   # this checkout, every stage, 5 runs each
    python bench/stage_overhead.py --stages clean tokenizer --repeats 3
    python bench/stage_overhead.py --code /tmp/before --code . --json overhead.json   # before and after
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("clean", "tokenizer", "tokenize", "pretrain", "finetune", "evaluate", "export")

# the library function(s) whose first call is the stage's first real work (module -> functions)
WORK_FUNCTIONS: dict[str, dict[str, list[str]]] = {
    "clean": {"llm.data.clean": ["clean_corpus"]},
    "tokenizer": {"llm.data.tokenizer": ["train_tokenizer_on_split"], "llm.interop.hf": ["import_hf_tokenizer"]},
    "tokenize": {"llm.data.tokenize": ["tokenize_corpus"]},
    "pretrain": {"llm.training.pretrain": ["pretrain"]},
    "finetune": {"llm.data.chat_data": ["prepare_chat_data"]},
    "evaluate": {"llm.training.evaluate": ["evaluate_checkpoint"]},
    "export": {"llm.inference.export": ["export_onnx"]},
}

# params for a run of seconds per stage: a tiny model, a few steps, short samples
TINY_PARAMS: dict[str, dict] = {
    "tokenizer": {"vocab_size": 512},
    "model": {"context_length": 64, "n_layer": 1, "n_head": 2, "d_model": 32},
    "pretrain": {"max_steps": 2, "batch_size": 4, "warmup_steps": 0, "eval_interval": 2, "eval_batches": 1,
                 "checkpoint_interval": 2, "log_interval": 1, "num_threads": 1, "progress": False},
    "finetune": {"max_steps": 2, "batch_size": 4, "warmup_steps": 0, "eval_interval": 2, "eval_batches": 1,
                 "checkpoint_interval": 2, "log_interval": 1, "num_threads": 1, "progress": False},
    "evaluate": {"max_batches": 2, "batch_size": 4, "max_new_tokens": 8, "max_conversations": 4,
                 "sample_conversations": 1},
}

MARKS_ENV = "STAGE_OVERHEAD_MARKS"
TARGETS_ENV = "STAGE_OVERHEAD_TARGETS"

# Imported by every Python process of a stage; acts only in the one that the environment names a marks file for,
# and takes the variables out of the environment first, so that the processes it starts do not record.
SITECUSTOMIZE = '''
import os as _os

_marks = _os.environ.pop("STAGE_OVERHEAD_MARKS", None)
_targets = _os.environ.pop("STAGE_OVERHEAD_TARGETS", None)
if _marks and _targets:
    import functools, importlib.abc, importlib.machinery, json, sys, time

    def _mark(event, name):
        with open(_marks, "a") as out:
            out.write(json.dumps({"event": event, "name": name, "t": time.time()}) + "\\n")

    def _timed(fn, name):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            _mark("enter", name)
            try:
                return fn(*args, **kwargs)
            finally:
                _mark("exit", name)
        return timed

    class _WrapAfterImport(importlib.abc.MetaPathFinder):
        def __init__(self, targets):
            self.targets = targets

        def find_spec(self, fullname, path, target=None):
            if fullname not in self.targets:
                return None
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is None or spec.loader is None:
                return None
            exec_module, names = spec.loader.exec_module, self.targets[fullname]

            def exec_and_wrap(module):
                exec_module(module)
                for attr in names:
                    if hasattr(module, attr):
                        setattr(module, attr, _timed(getattr(module, attr), fullname + "." + attr))
            spec.loader.exec_module = exec_and_wrap
            return spec

    _mark("python", "")
    sys.meta_path.insert(0, _WrapAfterImport(json.loads(_targets)))
'''


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def stage_commands(code: Path) -> dict[str, tuple[str, list[str]]]:
    """Each stage's command and outputs as ``code/dvc.yaml`` declares them."""
    pipeline = yaml.safe_load((code / "dvc.yaml").read_text())["stages"]
    commands = {}
    for name, stage in pipeline.items():
        outs = [next(iter(out)) if isinstance(out, dict) else out for out in stage.get("outs", [])]
        commands[name] = (stage["cmd"], outs)
    return commands


def make_project(code: Path, folder: Path, corpus: Path, corpus_files: int) -> None:
    """A scratch project in ``folder``: ``code``'s params with ``TINY_PARAMS`` applied, a slice of the corpus."""
    (folder / "params").mkdir(parents=True)
    for source in sorted((code / "params").glob("*.yaml")):
        values = yaml.safe_load(source.read_text()) or {}
        values.update(TINY_PARAMS.get(source.stem, {}))
        (folder / "params" / source.name).write_text(yaml.safe_dump(values, sort_keys=False))
    files = sorted(corpus.rglob("*.txt"))[:corpus_files]
    if not files:
        raise SystemExit(f"{corpus}: no .txt files; run `llm data fetch` first")
    for path in files:
        target = folder / "data" / "corpus" / path.relative_to(corpus)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    (folder / "marker").mkdir()
    (folder / "marker" / "sitecustomize.py").write_text(SITECUSTOMIZE)


def stage_environment(code: Path, project: Path, stage: str, marks: Path) -> dict[str, str]:
    """The environment dvc gives a stage (``DVC_ROOT``, ``DVC_STAGE``), with ``code`` and the marker importable and
    no tracking or Prefect server configured from outside."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("MLFLOW_", "PREFECT_API_")) and key not in ("LLM_TRACKING", "PYTHONPATH")}
    env.update({
        "PYTHONPATH": os.pathsep.join([str(code), str(project / "marker")]),
        "PREFECT_HOME": str(project / "prefect-home"),
        "DVC_ROOT": str(project),
        "DVC_STAGE": stage,
        MARKS_ENV: str(marks),
        TARGETS_ENV: json.dumps({"llm.stages": [f"{stage}_stage"], **WORK_FUNCTIONS[stage]}),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def run_stage(code: Path, project: Path, stage: str, command: str, outs: list[str], log: Path) -> dict:
    """Run one stage as dvc does, outputs deleted first; returns its moments relative to ``start`` (seconds)."""
    for out in outs:
        path = project / out
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    marks = project / "marks.jsonl"
    marks.unlink(missing_ok=True)
    shell = os.environ.get("SHELL") or "/bin/sh"
    load = os.getloadavg()[0]
    with log.open("ab") as output:
        output.write(f"\n$ {command}  # stage {stage}\n".encode())
        output.flush()
        start = time.time()
        process = subprocess.Popen([shell, "-c", command], cwd=project, stdout=output, stderr=subprocess.STDOUT,
                                   env=stage_environment(code, project, stage, marks))
        returncode = process.wait()
        exit_time = time.time()
    if returncode != 0:
        raise SystemExit(f"{code}: stage {stage} failed with exit code {returncode}; see {log}")
    events = [json.loads(line) for line in marks.read_text().splitlines()] if marks.exists() else []
    stage_name = f"llm.stages.{stage}_stage"
    work_names = {f"{module}.{fn}" for module, fns in WORK_FUNCTIONS[stage].items() for fn in fns}

    def first(event: str, names: set[str]) -> float | None:
        times = [e["t"] for e in events if e["event"] == event and e["name"] in names]
        return min(times) - start if times else None

    def last(event: str, names: set[str]) -> float | None:
        times = [e["t"] for e in events if e["event"] == event and e["name"] in names]
        return max(times) - start if times else None

    moments = {"python": first("python", {""}), "stage": first("enter", {stage_name}),
               "work": first("enter", work_names), "done": last("exit", {stage_name}), "exit": exit_time - start,
               "load1": load}
    if moments["work"] is None or moments["done"] is None:
        raise SystemExit(f"{code}: stage {stage} ran but its work was not seen ({marks}: {events}); see {log}")
    return moments


def phases(moments: dict) -> dict[str, float]:
    """The columns of the table, from one run's moments."""
    return {"python": moments["python"], "to stage": moments["stage"], "to work": moments["work"],
            "work": moments["done"] - moments["work"], "teardown": moments["exit"] - moments["done"],
            "overhead": moments["work"] + moments["exit"] - moments["done"], "total": moments["exit"]}


def server_command(code: Path, project: Path, action: str) -> None:
    """``python -m flows server <action>`` for the scratch project's ``PREFECT_HOME``."""
    env = stage_environment(code, project, "clean", project / "unused")
    for key in (MARKS_ENV, TARGETS_ENV, "DVC_STAGE"):
        env.pop(key)
    subprocess.run([sys.executable, "-m", "flows", "server", action], cwd=project, env=env, check=action != "stop",
                   stdout=subprocess.DEVNULL)


def print_table(results: dict[str, dict[str, list[dict]]], stages: list[str]) -> None:
    codes = list(results)
    columns = ["to stage", "to work", "work", "teardown", "overhead", "total"]
    print(f"\nmedian seconds over the runs (load average 1 min: median {median(_loads(results)):.2f}, "
          f"max {max(_loads(results)):.2f})")
    header = f"{'stage':<10} {'checkout':<28}" + "".join(f"{c:>10}" for c in columns)
    print(header)
    print("-" * len(header))
    for stage in stages:
        for code in codes:
            runs = [phases(m) for m in results[code].get(stage, [])]
            if not runs:
                continue
            cells = "".join(f"{median([r[c] for r in runs]):>10.2f}" for c in columns)
            print(f"{stage:<10} {_short(code):<28}{cells}")
    for code in codes:
        totals = [sum(median([phases(m)[c] for m in results[code][s]]) for s in stages if results[code].get(s))
                  for c in ("overhead", "total")]
        print(f"{'all':<10} {_short(code):<28}{'':>40}{totals[0]:>10.2f}{totals[1]:>10.2f}")


def _loads(results: dict[str, dict[str, list[dict]]]) -> list[float]:
    return [m["load1"] for stages in results.values() for runs in stages.values() for m in runs]


def _short(code: str) -> str:
    return code if len(code) <= 28 else "..." + code[-25:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                        help="stages to time (the pipeline runs every stage once first, to make their inputs)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each stage")
    parser.add_argument("--code", type=Path, action="append", help="a checkout to measure (repeatable; default .)")
    parser.add_argument("--corpus", type=Path, default=ROOT / "data" / "corpus")
    parser.add_argument("--corpus-files", type=int, default=8, help="first N .txt files of the corpus")
    parser.add_argument("--workdir", type=Path, default=None, help="where the scratch projects go (default: /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch projects (logs, mlflow.db)")
    parser.add_argument("--json", type=Path, help="also write every run's moments here")
    args = parser.parse_args()
    codes = [code.resolve() for code in (args.code or [Path(".")])]
    work = Path(tempfile.mkdtemp(prefix="stage_overhead_", dir=args.workdir))
    projects = {code: work / f"project{i}" for i, code in enumerate(codes)}
    results: dict[str, dict[str, list[dict]]] = {str(code): {} for code in codes}
    print(f"scratch projects in {work}; load average {os.getloadavg()}")
    try:
        for code, project in projects.items():
            make_project(code, project, args.corpus.resolve(), args.corpus_files)
            server_command(code, project, "start")
            commands = stage_commands(code)
            for stage in STAGES:  # every input in place, the databases created, the caches warm
                moments = run_stage(code, project, stage, *commands[stage], project / "stages.log")
                print(f"warm-up {code}: {stage} {moments['exit']:.1f} s", flush=True)
        for repeat in range(args.repeats):
            for stage in args.stages:
                for code, project in projects.items():
                    moments = run_stage(code, project, stage, *stage_commands(code)[stage], project / "stages.log")
                    results[str(code)].setdefault(stage, []).append(moments)
                    p = phases(moments)
                    print(f"run {repeat + 1}/{args.repeats} {stage:<9} {_short(str(code)):<28} to work "
                          f"{p['to work']:6.2f}  work {p['work']:6.2f}  teardown {p['teardown']:5.2f}  total "
                          f"{p['total']:6.2f}  (load {moments['load1']:.2f})", flush=True)
    finally:
        for code, project in projects.items():
            if (project / "prefect-home").exists():
                server_command(code, project, "stop")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_table(results, args.stages)
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv, "results": results}, indent=1))


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main()
