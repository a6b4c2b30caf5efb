"""The registered model ``gpt`` as an MLflow pyfunc, logged from code (no pickled objects).

``llm.mlops.registry.register_checkpoint`` logs this file as the model: MLflow stores it beside the checkpoint
folder (artifact ``checkpoint``) and the ``llm`` package (code path), and runs it on load.
``mlflow models serve -m models:/gpt@production --env-manager local`` then answers requests such as::

    {"dataframe_records": [{"prompt": "ROMEO.", "max_new_tokens": 64, "temperature": 0.8}]}
    {"dataframe_records": [{"messages": [{"role": "user", "content": "Hello"}], "max_new_tokens": 64}]}

Each row is one request: a ``prompt`` to continue, or ``messages`` (``[{role, content}, ...]``) for a chat
reply, plus optional sampling fields ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``
(per row, else from the ``params`` of the request, else the defaults). The answer is one string per row.

Requests beyond the limits are refused with INVALID_PARAMETER_VALUE, which the scoring server answers
with HTTP 400 and the reason: at most 512 new tokens and 4096 prompt tokens by default. The serving
process can change them with ``LLM_SERVE_MAX_NEW_TOKENS`` and ``LLM_SERVE_MAX_PROMPT_TOKENS`` (else a
``model_config`` logged with the model, keys ``max_new_tokens_limit`` and ``max_prompt_tokens``, is used).
Invalid sampling values (a negative temperature, ...) and malformed messages are refused the same way.
"""

from __future__ import annotations

import math
import os
from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

DEFAULT_MAX_NEW_TOKENS = 128
MAX_NEW_TOKENS_LIMIT = 512
MAX_PROMPT_TOKENS = 4096
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")
ROLES = ("system", "user", "assistant")


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


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
            raise _invalid(f"messages[{i}].role is {message.get('role')!r}; expected one of {', '.join(ROLES)}")
        out.append({"role": message["role"], "content": message["content"]})
    return out


class GPTModel(PythonModel):
    """Text generation from a checkpoint folder stored as the model's ``checkpoint`` artifact."""

    def load_context(self, context) -> None:
        from llm.inference.generate import TorchGenerator
        from llm.model.checkpoint import load_checkpoint

        config = dict(getattr(context, "model_config", None) or {})
        self.max_new_tokens_limit = int(
            os.environ.get("LLM_SERVE_MAX_NEW_TOKENS") or config.get("max_new_tokens_limit", MAX_NEW_TOKENS_LIMIT)
        )
        self.max_prompt_tokens = int(
            os.environ.get("LLM_SERVE_MAX_PROMPT_TOKENS") or config.get("max_prompt_tokens", MAX_PROMPT_TOKENS)
        )
        model, self.tokenizer, self.config = load_checkpoint(context.artifacts["checkpoint"])
        self.generator = TorchGenerator(model, self.tokenizer)

    def _sampling(self, row: dict[str, Any], params: dict[str, Any]):
        from pydantic import ValidationError

        from llm.inference.decoding import SamplingParams

        values: dict[str, Any] = {"max_new_tokens": min(DEFAULT_MAX_NEW_TOKENS, self.max_new_tokens_limit)}
        for name in SAMPLING_FIELDS:
            value = row.get(name)
            if _missing(value):
                value = params.get(name)
            if not _missing(value):
                values[name] = value.item() if hasattr(value, "item") else value
        for name in ("max_new_tokens", "top_k", "seed"):  # pandas turns int columns with gaps into floats
            if isinstance(values.get(name), float) and values[name].is_integer():
                values[name] = int(values[name])
        if values["max_new_tokens"] > self.max_new_tokens_limit:
            raise _invalid(
                f"max_new_tokens={values['max_new_tokens']} is above this server's limit of "
                f"{self.max_new_tokens_limit} (LLM_SERVE_MAX_NEW_TOKENS)"
            )
        try:
            return SamplingParams(**values)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            raise _invalid(f"invalid sampling parameters: {problems}") from None

    def _prompt_ids(self, row: dict[str, Any]) -> list[int]:
        from llm.data.chat_template import encode_chat

        tok = self.tokenizer
        messages, prompt = row.get("messages"), row.get("prompt")
        if not _missing(messages) and not (hasattr(messages, "__len__") and len(messages) == 0):
            ids = encode_chat(tok, _messages(messages), add_generation_prompt=True)
        elif isinstance(prompt, str):
            ids = [tok.bos_id, *tok.encode(prompt)]
        else:
            raise _invalid("each request needs a string 'prompt' or a list of 'messages'")
        if len(ids) > self.max_prompt_tokens:
            raise _invalid(
                f"the prompt is {len(ids)} tokens long, above this server's limit of {self.max_prompt_tokens} "
                f"(LLM_SERVE_MAX_PROMPT_TOKENS)"
            )
        return ids

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        """One generated string per request row (the prompt itself is not repeated)."""
        from llm.data.chat_template import generation_stop_ids
        from llm.inference.decoding import stream_text

        rows = _rows(model_input)
        if not rows:
            raise _invalid("the request holds no rows: send at least one 'prompt' or 'messages'")
        requests = [(self._prompt_ids(row), self._sampling(row, params or {})) for row in rows]
        stop = generation_stop_ids(self.tokenizer)
        outputs = []
        for ids, sampling in requests:  # every row is validated before any generation starts
            sampling = sampling.model_copy(update={"stop_ids": stop})
            outputs.append("".join(stream_text(self.generator.stream_generate(ids, sampling), self.tokenizer, stop)))
        return outputs


set_model(GPTModel())
