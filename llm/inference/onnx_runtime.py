"""Generation from an ONNX export with onnxruntime, numpy and the tokenizer only: no PyTorch.

An export folder (written by ``llm.inference.export.export_onnx``) holds ``model.onnx``,
``generation_config.json`` and ``tokenizer/``. The decoder takes ``input_ids`` [B, T], ``position_ids``
[B, T], ``past_mask`` [B, P] and the cache ``past_key_values.{i}.key`` / ``.value`` [B, H, P, D] and returns
``logits`` [B, T, V] and ``present.{i}.key`` / ``.value`` [B, H, P+T, D]; the first step feeds an empty cache
(P = 0). For one sequence, ``forward`` fills in positions P..P+T-1 and an all-True mask; a batch of
sequences of different lengths passes both (see ``llm.inference.batching``). Exports of format 1 have no
``position_ids``/``past_mask`` inputs (positions implicit from P) and run one sequence at a time.

``OnnxGenerator`` supplies this decoder as the forward step of the decoding core
(``llm.inference.decoding``), so the sampling rules, stopping rules and sliding-window policy are the
PyTorch ones and greedy output is identical. Seeded sampling is reproducible here, but draws from the
core's numpy generator, not torch's, so it does not reproduce the PyTorch samples.

This module must never import torch (nor ``llm.model.gpt``/``llm.inference.generate``, which do): an
import-linter contract and a test check it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llm.data.tokenizer import Tokenizer, load_tokenizer
from llm.inference.decoding import SamplingParams, complete, decode

CONFIG_FILE = "generation_config.json"
MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"  # written by export_onnx(quantize=True)
TOKENIZER_DIR = "tokenizer"


def session_options(intra_op_num_threads: int | None = None, optimized_model_path: str | Path | None = None,
                    spinning: bool = True):
    """onnxruntime SessionOptions: every graph optimisation (ORT_ENABLE_ALL), sequential execution.

    ``intra_op_num_threads`` None lets onnxruntime use one thread per physical core. With
    ``optimized_model_path`` the optimised graph is saved there, so a later session can load it directly.
    ``spinning`` False stops idle intra-op threads from busy-waiting for the next call: a server whose event
    loop shares the cores needs that CPU more than the few microseconds a spinning thread saves.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if intra_op_num_threads:
        options.intra_op_num_threads = intra_op_num_threads
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: the exporter's unused-initializer notes are noise here
    return options


def read_generation_config(onnx_dir: str | Path) -> dict[str, Any]:
    """Parse ``generation_config.json`` of an export folder. Raises FileNotFoundError naming the file."""
    path = Path(onnx_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: not an ONNX export folder (export one with `llm export`)")
    return json.loads(path.read_text())


class OnnxGenerator:
    """Continue token sequences with an exported decoder and onnxruntime: a ``TextGenerator`` without torch.

    ``int8`` runs the int8 model of a quantized export (``export_onnx(quantize=True)``; its speed and
    bits-per-byte cost against fp32 are measured by bench/generate.py); ``model_file`` names any other graph
    in the folder.
    ``intra_op_num_threads`` sets onnxruntime's thread count (None: one per physical core); ``providers``
    defaults to the CPU; ``optimized_model_path`` saves the optimised graph there; ``spinning`` False keeps idle
    onnxruntime threads from busy-waiting (see ``session_options``). Raises FileNotFoundError
    when the folder is not an export or lacks the model asked for.
    """

    def __init__(
        self,
        onnx_dir: str | Path,
        *,
        int8: bool = False,
        model_file: str | None = None,
        intra_op_num_threads: int | None = None,
        providers: list[str] | None = None,
        optimized_model_path: str | Path | None = None,
        spinning: bool = True,
    ):
        import onnxruntime as ort

        self.onnx_dir = Path(onnx_dir)
        self.config = read_generation_config(self.onnx_dir)
        if int8 and model_file is None:
            model_file = self.config.get("int8_model_file") or INT8_FILE
        model_path = self.onnx_dir / (model_file or self.config.get("model_file", MODEL_FILE))
        if not model_path.exists():
            hint = "; export with quantize=True for an int8 model" if int8 else ""
            raise FileNotFoundError(f"{model_path}: missing from the ONNX export{hint}")
        self.model_path = model_path
        self.session = ort.InferenceSession(
            str(model_path),
            sess_options=session_options(intra_op_num_threads, optimized_model_path, spinning),
            providers=providers or ["CPUExecutionProvider"],
        )
        self.n_layer = int(self.config["n_layer"])
        self.n_head = int(self.config["n_head"])
        self.head_dim = int(self.config["head_dim"])
        self.vocab_size = int(self.config["vocab_size"])
        self.context_length = int(self.config["context_length"])
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(self.n_layer) for kv in ("key", "value")]
        self.output_names = ["logits"] + [f"present.{i}.{kv}" for i in range(self.n_layer) for kv in ("key", "value")]
        # format 2 graphs take per-row positions and a cache mask, so rows of different lengths can share a batch
        self.batched = {"position_ids", "past_mask"} <= {i.name for i in self.session.get_inputs()}
        self._tokenizer: Tokenizer | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer shipped in the export folder, loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.onnx_dir / TOKENIZER_DIR)
        return self._tokenizer

    def default_params(self, **overrides: Any) -> SamplingParams:
        """The export's default sampling settings (``generation_config.json``), with ``overrides`` applied."""
        return SamplingParams(**{**self.config.get("sampling", {}), **overrides})

    def _params(self, params: SamplingParams | dict | None) -> SamplingParams:
        return self.default_params() if params is None else SamplingParams.model_validate(params)

    def empty_cache(self, batch_size: int = 1) -> list[np.ndarray]:
        """A cache holding nothing (past length 0): the input of the first step."""
        shape = (batch_size, self.n_head, 0, self.head_dim)
        return [np.zeros(shape, dtype=np.float32) for _ in self.past_names]

    def forward(
        self,
        input_ids: np.ndarray,
        past: list[np.ndarray] | None = None,
        *,
        position_ids: np.ndarray | None = None,
        past_mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder call: ``input_ids`` [B, T] after ``past`` (flat [k0, v0, k1, v1, ...], each [B, H, P, D]).

        ``position_ids`` [B, T] (None: P..P+T-1 for every row) and ``past_mask`` [B, P] (None: every cache slot
        holds a token) let rows of different lengths share the batch; they need a format 2 export.
        Returns ``(logits [B, T, V], present)`` with ``present`` flat like ``past``, each [B, H, P+T, D].
        Raises ValueError when P + T exceeds the context length, or for positions or a mask on a format 1 export.
        """
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        if past is None:
            past = self.empty_cache(input_ids.shape[0])
        (B, T), P = input_ids.shape, past[0].shape[2]
        if P + T > self.context_length:
            raise ValueError(
                f"sequence of {P + T} tokens ({P} cached + {T} new) exceeds context_length={self.context_length}"
            )
        if len(past) != len(self.past_names):
            raise ValueError(f"past must hold {len(self.past_names)} arrays (key and value per layer), got {len(past)}")
        feed = {"input_ids": input_ids, **dict(zip(self.past_names, past, strict=True))}
        if self.batched:
            if position_ids is None:
                position_ids = np.broadcast_to(np.arange(P, P + T, dtype=np.int64), (B, T))
            feed["position_ids"] = np.ascontiguousarray(position_ids, dtype=np.int64)
            feed["past_mask"] = np.ones((B, P), dtype=bool) if past_mask is None else np.asarray(past_mask, bool)
        elif position_ids is not None or past_mask is not None:
            raise ValueError(f"{self.model_path} is a format 1 export without position_ids/past_mask inputs: "
                             "export it again (`llm export onnx`) to batch sequences of different lengths")
        logits, *present = self.session.run(self.output_names, feed)
        return logits, present

    def stream_generate(self, prompt_ids: Sequence[int], params: SamplingParams | dict | None = None) -> Iterator[int]:
        """Yield new token ids one at a time, continuing ``prompt_ids``: ``llm.inference.decoding.decode`` with
        this export as the forward step and the core's numpy sampler. ``params`` (SamplingParams or its fields
        as a dict) None uses the export's defaults. Raises ValueError for an empty prompt (prepend the <|bos|>
        id), out-of-vocabulary ids or invalid sampling fields.
        """
        params = self._params(params)

        def step(ids: list[int], past: list[np.ndarray] | None) -> tuple[np.ndarray, list[np.ndarray]]:
            logits, present = self.forward(np.array([ids], dtype=np.int64), past)
            return logits[:, -1, :], present  # [1, V]

        return decode(step, prompt_ids, params, context_length=self.context_length, vocab_size=self.vocab_size)

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams | dict | None = None) -> list[int]:
        """The new ids ``stream_generate`` yields, as a list (the prompt is not included)."""
        return list(self.stream_generate(prompt_ids, params))

    def stream_text(self, prompt: str, params: SamplingParams | dict | None = None) -> Iterator[str]:
        """Continue ``prompt`` (after ``<|bos|>``) and yield text pieces as soon as they decode
        (``llm.inference.decoding.complete``); stop ids end the stream without being printed."""
        return complete(self, prompt, self._params(params))

    def text(self, prompt: str, params: SamplingParams | dict | None = None) -> str:
        """The whole continuation of ``prompt`` as one string."""
        return "".join(self.stream_text(prompt, params))
