"""The registered model ``gpt`` as an MLflow pyfunc, logged from code (no pickled objects).

``llm.mlops.registry.register_checkpoint`` logs this file as the model: MLflow stores it beside the checkpoint
folder (artifact ``checkpoint``) and the ``llm`` package (code path), and runs it on load.
``mlflow models serve -m models:/gpt@production --env-manager local`` then answers requests such as::

    {"dataframe_records": [{"prompt": "ROMEO.", "max_new_tokens": 64, "temperature": 0.8}]}
    {"dataframe_records": [{"messages": [{"role": "user", "content": "Hello"}], "max_new_tokens": 64}]}

Each row is one request: a ``prompt`` to continue, or ``messages`` (``[{role, content}, ...]``) for a chat
reply, plus optional sampling fields ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``
(per row, else from the ``params`` of the request, else the defaults). The answer is one string per row.

Engine: ONNX Runtime (``llm.inference.onnx_runtime.OnnxGenerator``, the int8 model when the export has one)
whenever an ONNX export can be found, PyTorch (``TorchGenerator`` on the checkpoint) otherwise. The model is
logged at registration, before the export stage runs, so the export is looked up when the model loads:
``LLM_SERVE_ONNX_DIR`` (an export folder) if set; else the export attached to the registered version logged
by the run that logged this model (its ``onnx.artifact_uri`` tag, else ``runs:/<run id>/onnx``), downloaded
through the tracking store of the serving environment (``MLFLOW_TRACKING_URI``, else the project's
``mlflow.db``). ``LLM_SERVE_ENGINE=onnx|torch`` forces one (``onnx`` without an export fails to load).
Falling back to PyTorch logs one warning saying why. The ONNX path imports no torch. ``engine`` on the
loaded model says which one answers ("onnx" or "torch").

With ONNX Runtime, rows decode in ``llm serve``'s engine (``llm.inference.batching.BatchEngine``): the rows
of a request, and those of the requests the scoring server answers at the same time (it runs ``predict`` in
threads), share one batch of at most ``LLM_SERVE_MAX_BATCH`` (8) rows; at most ``LLM_SERVE_MAX_QUEUE`` (64)
rows wait for a place (beyond that: HTTP 503), and a request still generating after ``LLM_SERVE_TIMEOUT``
(55 s, under the scoring server's own 60 s) gets HTTP 504. PyTorch decodes one row after another.

Requests beyond the limits are refused with INVALID_PARAMETER_VALUE, which the scoring server answers
with HTTP 400 and a short reason naming the field and the limit, never the input: at most 16 rows per
request, 256 KiB of prompt text (UTF-8, prompts and message contents of all rows, checked before
tokenizing), 512 new tokens and 4096 prompt tokens per row by default. The serving process can change them
with ``LLM_SERVE_MAX_ROWS``, ``LLM_SERVE_MAX_PROMPT_BYTES``, ``LLM_SERVE_MAX_NEW_TOKENS`` and
``LLM_SERVE_MAX_PROMPT_TOKENS`` (else a ``model_config`` logged with the model, keys ``max_rows``,
``max_prompt_bytes``, ``max_new_tokens_limit`` and ``max_prompt_tokens``, is used). Invalid sampling values
(a negative temperature, a seed outside ``[0, 2**64)``, ...) and malformed messages are refused the same way.
Any other failure is INTERNAL_ERROR (HTTP 500) with an error id; the traceback goes to the server's log only.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import (
    DEADLINE_EXCEEDED,
    INTERNAL_ERROR,
    INVALID_PARAMETER_VALUE,
    TEMPORARILY_UNAVAILABLE,
)
from mlflow.pyfunc import PythonModel

if TYPE_CHECKING:
    from llm.inference.engine import Engine

log = logging.getLogger(__name__)


def _say_engine(message: str) -> None:
    """Which engine serves, as a log line; on stderr where logging shows no INFO (`mlflow models serve`'s
    default), so the scoring server's output always says it."""
    if log.isEnabledFor(logging.INFO) and logging.getLogger().handlers:
        log.info(message)
    else:
        print(f"llm: {message}", file=sys.stderr, flush=True)

DEFAULT_MAX_NEW_TOKENS = 128
MAX_NEW_TOKENS_LIMIT = 512
MAX_PROMPT_TOKENS = 4096
MAX_ROWS = 16  # one request of 2,000 rows held the worker past the scoring server's 60 s timeout
MAX_PROMPT_BYTES = 256 * 1024
MAX_BATCH = 8  # rows decoded together (ONNX engine), from one request or several at once
MAX_QUEUE = 64  # rows waiting for a place in the batch; beyond it a request gets 503
TIMEOUT_S = 55  # a request still generating after this gets 504, before the scoring server's own 60 s
MAX_MESSAGE_CHARS = 300  # an error message longer than this is cut: a client never gets its input back
SAMPLING_FIELDS = ("max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "seed")
ROLES = ("system", "user", "assistant")
ENGINES = ("onnx", "torch")
ENGINE_ENV = "LLM_SERVE_ENGINE"
ONNX_DIR_ENV = "LLM_SERVE_ONNX_DIR"
# llm.mlops.registry's names (MODEL_NAME, ONNX_TAG, ONNX_ARTIFACT): importing it would import torch (checkpoints)
MODEL_NAME = "gpt"
ONNX_TAG = "onnx.artifact_uri"
ONNX_ARTIFACT = "onnx"
GENERATION_CONFIG = "generation_config.json"  # llm.inference.onnx_runtime.CONFIG_FILE: what marks an export


class ServingError(MlflowException):
    """An MlflowException whose message reaches the client as written, at most ``MAX_MESSAGE_CHARS`` long.

    MLflow's scoring server rewrites the message of an MlflowException raised by ``predict`` into
    "Failed to predict data '<the whole input>'. Error: <message>", which sent a 6 MB prompt back to its
    sender. The message of this exception keeps the first value it is given.
    """

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):
            self._message = value if len(value) <= MAX_MESSAGE_CHARS else value[: MAX_MESSAGE_CHARS - 3] + "..."


def _invalid(message: str) -> MlflowException:
    return ServingError(message, error_code=INVALID_PARAMETER_VALUE)


def _limit(name: str, config: dict[str, Any], key: str, default: int) -> int:
    """A positive integer limit from environment variable ``name``, else ``config[key]``, else ``default``."""
    raw = os.environ.get(name) or config.get(key, default)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        raise MlflowException(f"{name}={raw!r}: expected a positive integer", error_code=INVALID_PARAMETER_VALUE)
    return value


def _missing(value: Any) -> bool:
    """True for an absent per-row value: None, or the NaN pandas puts in a column some rows leave out."""
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _rows(model_input: Any) -> list[dict[str, Any]]:
    """One dict per request from a DataFrame, a list of dicts, or a single dict."""
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):  # pandas DataFrame
        return [{str(k): v for k, v in row.items()} for row in model_input.to_dict(orient="records")]
    if isinstance(model_input, dict):
        columns = list(model_input.values())
        if columns and all(isinstance(v, list) for v in columns) and "messages" not in model_input:
            n = len(columns[0])  # column-oriented: {"prompt": [...], "max_new_tokens": [...]}
            if any(len(v) != n for v in columns):
                raise _invalid("all columns of the input must have the same length")
            return [{k: v[i] for k, v in model_input.items()} for i in range(n)]
        return [dict(model_input)]
    if isinstance(model_input, list) and all(isinstance(r, dict) for r in model_input):
        return [dict(r) for r in model_input]
    if isinstance(model_input, str):
        return [{"prompt": model_input}]
    if isinstance(model_input, list) and all(isinstance(r, str) for r in model_input):
        return [{"prompt": r} for r in model_input]
    raise _invalid(
        f"expected a DataFrame, a dict or a list of dicts with a 'prompt' or 'messages' field; "
        f"got {type(model_input).__name__}"
    )


def _messages(value: Any) -> list[dict[str, str]]:
    """Validate a ``messages`` value (list of ``{role, content}``; numpy arrays from pandas accepted)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        raise _invalid("'messages' must be a non-empty list of {'role', 'content'} objects")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise _invalid(f"messages[{i}] must be an object with a string 'content' and a 'role'")
        if message.get("role") not in ROLES:
            raise _invalid(f"messages[{i}].role must be one of {', '.join(ROLES)}")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _prompt_bytes(row: dict[str, Any]) -> int:
    """UTF-8 size of a row's prompt and message contents, measured without validating or tokenizing them."""
    prompt, messages = row.get("prompt"), row.get("messages")
    texts = [prompt] if isinstance(prompt, str) else []
    if hasattr(messages, "tolist"):
        messages = messages.tolist()
    if isinstance(messages, (list, tuple)):
        texts += [m.get("content") for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str)]
    return sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)


def _model_root(checkpoint: Path) -> Path | None:
    """The logged model's folder (the one holding its MLmodel file) above its ``checkpoint`` artifact."""
    return next((folder for folder in checkpoint.parents if (folder / "MLmodel").is_file()), None)


def _attached_export(run_id: str, into: Path) -> Path:
    """Download the ONNX export attached to the registered version logged by run ``run_id`` into ``into``.

    The version's tag ``onnx.artifact_uri`` names it; without such a version, ``runs:/<run_id>/onnx``.
    Raises LookupError (saying why) when the store or the export cannot be found.
    """
    import mlflow.artifacts
    from mlflow import MlflowClient

    from llm.mlops.tracking import bounded_http_retries, registry_uri, sqlite_path, tracking_uri

    for uri in {tracking_uri(), registry_uri()}:  # never create an empty SQLite database by looking
        db = sqlite_path(uri)
        if db is not None and not db.is_file():
            raise LookupError(f"no tracking database at {db} (set MLFLOW_TRACKING_URI)")
    client = MlflowClient(tracking_uri=tracking_uri(), registry_uri=registry_uri())
    with bounded_http_retries():
        versions = client.search_model_versions(f"name = '{MODEL_NAME}' and run_id = '{run_id}'")
        tagged = [v.tags.get(ONNX_TAG) for v in sorted(versions, key=lambda v: -int(v.version))]
        uri = next((t for t in tagged if t), f"runs:/{run_id}/{ONNX_ARTIFACT}")
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(into),
                                                             tracking_uri=tracking_uri()))
        except (MlflowException, OSError) as err:
            reason = str(getattr(err, "message", err)).strip().splitlines()[0][:200]
            raise LookupError(f"no ONNX export at {uri} ({reason})") from None
    if not (local / GENERATION_CONFIG).is_file():
        raise LookupError(f"{uri} is not an ONNX export (no {GENERATION_CONFIG})")
    return local


class GPTModel(PythonModel):
    """Text generation with ONNX Runtime from the attached export, or PyTorch from the ``checkpoint`` artifact.

    ``engine`` is "onnx" or "torch"; ``export_dir`` the export folder the ONNX engine runs (None for torch);
    ``batch_engine`` the ``llm.inference.engine.Engine`` that decodes with ONNX Runtime (unset for torch).
    """

    engine: str | None = None
    export_dir: Path | None = None
    batch_engine: Engine  # set when the ONNX engine loads
    max_rows = MAX_ROWS
    max_prompt_bytes = MAX_PROMPT_BYTES
    max_new_tokens_limit = MAX_NEW_TOKENS_LIMIT
    max_prompt_tokens = MAX_PROMPT_TOKENS

    def load_context(self, context) -> None:
        config = dict(getattr(context, "model_config", None) or {})
        self.max_rows = _limit("LLM_SERVE_MAX_ROWS", config, "max_rows", MAX_ROWS)
        self.max_prompt_bytes = _limit("LLM_SERVE_MAX_PROMPT_BYTES", config, "max_prompt_bytes", MAX_PROMPT_BYTES)
        self.max_new_tokens_limit = _limit("LLM_SERVE_MAX_NEW_TOKENS", config, "max_new_tokens_limit",
                                           MAX_NEW_TOKENS_LIMIT)
        self.max_prompt_tokens = _limit("LLM_SERVE_MAX_PROMPT_TOKENS", config, "max_prompt_tokens", MAX_PROMPT_TOKENS)
        self.max_batch = _limit("LLM_SERVE_MAX_BATCH", config, "max_batch", MAX_BATCH)
        self.max_queue = _limit("LLM_SERVE_MAX_QUEUE", config, "max_queue", MAX_QUEUE)
        self.timeout_s = _limit("LLM_SERVE_TIMEOUT", config, "timeout_s", TIMEOUT_S)
        checkpoint = Path(context.artifacts["checkpoint"])
        engine = os.environ.get(ENGINE_ENV, "").strip().lower()
        if engine and engine not in ENGINES:
            raise MlflowException(f"{ENGINE_ENV}={engine!r}: expected one of {', '.join(ENGINES)}")
        if engine != "torch":
            export, why_not = self._find_export(checkpoint)
            if export is not None:
                return self._load_onnx(export)
            if engine == "onnx":
                raise MlflowException(f"{ENGINE_ENV}=onnx, but {why_not}")
            log.warning("serving with PyTorch, not ONNX Runtime: %s", why_not)
        self._load_torch(checkpoint)

    def _find_export(self, checkpoint: Path) -> tuple[Path | None, str]:
        """(the export folder, "") or (None, why there is none)."""
        explicit = os.environ.get(ONNX_DIR_ENV)
        if explicit:
            if not (Path(explicit) / GENERATION_CONFIG).is_file():
                raise MlflowException(f"{ONNX_DIR_ENV}={explicit}: not an ONNX export folder (no {GENERATION_CONFIG})")
            return Path(explicit), ""
        root = _model_root(checkpoint)
        run_id = (yaml.safe_load((root / "MLmodel").read_text()) or {}).get("run_id") if root else None
        if not run_id:
            return None, f"the model at {checkpoint.parent} records no run to find its export in"
        self._downloads = tempfile.TemporaryDirectory(prefix="llm-serve-onnx-")  # removed with this model
        try:
            return _attached_export(run_id, Path(self._downloads.name)), ""
        except LookupError as err:
            self._downloads.cleanup()
            return None, f"{err}; `llm export onnx` attaches one, {ONNX_DIR_ENV} names a folder"

    def _load_onnx(self, export: Path) -> None:
        from llm.inference.batching import BatchEngine
        from llm.inference.onnx_runtime import OnnxGenerator, read_generation_config

        int8 = bool(read_generation_config(export).get("int8_model_file"))
        self.generator = OnnxGenerator(export, int8=int8)
        self.tokenizer, self.engine, self.export_dir = self.generator.tokenizer, "onnx", export
        engine = BatchEngine(self.generator, max_batch=self.max_batch, max_queue=self.max_queue)
        static = engine.static  # the graph that decodes: the static-cache one when there is one
        self.batch_engine = engine.start()
        _say_engine(f"serving with ONNX Runtime: {(static or self.generator).model_path}")

    def _load_torch(self, checkpoint: Path) -> None:
        from llm.inference.generate import TorchGenerator
        from llm.model.checkpoint import load_checkpoint

        model, self.tokenizer, _ = load_checkpoint(checkpoint)
        self.generator, self.engine, self.export_dir = TorchGenerator(model, self.tokenizer), "torch", None
        _say_engine(f"serving with PyTorch: {checkpoint}")

    def _sampling(self, row: dict[str, Any], params: dict[str, Any]):
        from pydantic import ValidationError

        from llm.inference.decoding import SamplingParams

        values: dict[str, Any] = {"max_new_tokens": min(DEFAULT_MAX_NEW_TOKENS, self.max_new_tokens_limit)}
        for name in SAMPLING_FIELDS:
            value = row.get(name)
            if _missing(value):
                value = params.get(name)
            if not _missing(value):  # numpy scalars from pandas become Python numbers
                values[name] = value.item() if getattr(value, "size", None) == 1 else value
        for name in ("max_new_tokens", "top_k", "seed"):  # pandas turns int columns with gaps into floats
            if isinstance(values.get(name), float) and values[name].is_integer():
                values[name] = int(values[name])
        try:
            sampling = SamplingParams(**values)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            raise _invalid(f"invalid sampling parameters: {problems}") from None
        if sampling.max_new_tokens > self.max_new_tokens_limit:
            raise _invalid(
                f"max_new_tokens={sampling.max_new_tokens} is above this server's limit of "
                f"{self.max_new_tokens_limit} (LLM_SERVE_MAX_NEW_TOKENS)"
            )
        return sampling

    def _prompt_ids(self, row: dict[str, Any]) -> list[int]:
        from llm.data.chat_template import encode_chat, prompt_ids

        tok = self.tokenizer
        messages, prompt = row.get("messages"), row.get("prompt")
        if not _missing(messages) and not (hasattr(messages, "__len__") and len(messages) == 0):
            ids = encode_chat(tok, _messages(messages), add_generation_prompt=True)
        elif isinstance(prompt, str):
            ids = prompt_ids(tok, prompt)
        else:
            raise _invalid("each request needs a string 'prompt' or a list of 'messages'")
        if len(ids) > self.max_prompt_tokens:
            raise _invalid(
                f"the prompt is {len(ids)} tokens long, above this server's limit of {self.max_prompt_tokens} "
                f"(LLM_SERVE_MAX_PROMPT_TOKENS)"
            )
        return ids

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        """One generated string per request row (the prompt itself is not repeated).

        Raises ServingError: INVALID_PARAMETER_VALUE (HTTP 400) for a request beyond the limits or with
        invalid fields, INTERNAL_ERROR (HTTP 500, details in the server's log) for anything else.
        """
        try:
            return self._generate(model_input, params or {})
        except ServingError:
            raise
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            log.exception("generation failed (error id %s)", error_id)
            raise ServingError(f"generation failed (error id {error_id}; the server's log has the details)",
                               error_code=INTERNAL_ERROR) from None

    def _generate(self, model_input: Any, params: dict[str, Any]) -> list[str]:
        from llm.data.chat_template import generation_stop_ids
        from llm.inference.decoding import stream_text

        rows = _rows(model_input)
        if not rows:
            raise _invalid("the request holds no rows: send at least one 'prompt' or 'messages'")
        if len(rows) > self.max_rows:
            raise _invalid(f"the request has {len(rows)} rows, above this server's limit of {self.max_rows} "
                           f"rows per request (LLM_SERVE_MAX_ROWS)")
        size = sum(_prompt_bytes(row) for row in rows)
        if size > self.max_prompt_bytes:
            raise _invalid(f"the prompts and messages of this request are {size} bytes long, above this server's "
                           f"limit of {self.max_prompt_bytes} (LLM_SERVE_MAX_PROMPT_BYTES)")
        stop = generation_stop_ids(self.tokenizer)
        requests = [(self._prompt_ids(row), self._sampling(row, params).model_copy(update={"stop_ids": stop}))
                    for row in rows]  # every row is validated before any generation starts
        if self.engine == "onnx":
            return self._generate_batched(requests, stop)
        return ["".join(stream_text(self.generator.stream_generate(ids, sampling), self.tokenizer, stop))
                for ids, sampling in requests]

    def _generate_batched(self, requests: list, stop: tuple[int, ...]) -> list[str]:
        """The rows of this request, and of every request being answered at the same time, decode together."""
        import time

        from llm.inference.engine import EngineFull

        try:
            results = self.batch_engine.generate(requests, deadline=time.monotonic() + self.timeout_s)
        except EngineFull:
            raise ServingError(f"the server is busy: more than {self.batch_engine.max_queue} rows are waiting "
                               "(LLM_SERVE_MAX_QUEUE); try again", error_code=TEMPORARILY_UNAVAILABLE) from None
        if any(event.finish_reason == "timeout" for _, event in results):
            raise ServingError(f"generation took longer than {self.timeout_s:g} s (LLM_SERVE_TIMEOUT)",
                               error_code=DEADLINE_EXCEEDED)
        failed = [event for _, event in results if event.finish_reason in ("error", "cancelled")]
        if failed:
            raise RuntimeError(f"generation ended with {failed[0].finish_reason}: {failed[0].error}")
        return [self.tokenizer.decode([t for t in ids if t not in stop], skip_special=True) for ids, _ in results]


set_model(GPTModel())
