"""Generation from an ONNX export with onnxruntime, numpy and the tokenizer only: no PyTorch.

An export folder (written by ``llm.inference.export.export_onnx``) holds ``model.onnx``, ``generation_config.json``
and ``tokenizer/``. The decoder takes ``input_ids`` [B, T] and the cache ``past_key_values.{i}.key`` /
``.value`` [B, H, P, D] and returns ``logits`` [B, T, V] and ``present.{i}.key`` / ``.value``
[B, H, P+T, D]. Positions are implicit: token t of ``input_ids`` sits at position P + t, P being the past
length, so the first step feeds an empty cache (P = 0).

``OnnxGenerator`` mirrors ``llm.inference.generate``: the same sampling rules (temperature, top-k, top-p), the same
stopping rules and the same sliding-window policy, so greedy output is identical to PyTorch's. Seeded
sampling is reproducible here, but draws from numpy's generator, not torch's, so it does not reproduce
the PyTorch samples.

This module must never import torch (nor ``llm.model.gpt``/``llm.inference.generate``, which do): a test checks it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm.data.tokenizer import Tokenizer, load_tokenizer

CONFIG_FILE = "generation_config.json"
MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"  # written by export_onnx(quantize=True)
TOKENIZER_DIR = "tokenizer"


@dataclass(frozen=True)
class GenerationParams:
    """How to pick each new token and when to stop; the fields and meaning of ``llm.inference.generate.SamplingParams``.

    Any object with these attributes (a ``SamplingParams`` included) is accepted wherever this is.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_ids", tuple(int(t) for t in self.stop_ids))  # lists and sets welcome
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError(f"top_k must be > 0 or None, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1] or be None, got {self.top_p}")

    @classmethod
    def from_object(cls, params: Any) -> GenerationParams:
        """Copy the sampling fields of any object that has them (e.g. ``SamplingParams``), or of a dict."""
        if isinstance(params, cls):
            return params
        get = params.get if isinstance(params, dict) else lambda name, default: getattr(params, name, default)
        defaults = cls()
        return cls(
            max_new_tokens=int(get("max_new_tokens", defaults.max_new_tokens)),
            temperature=float(get("temperature", defaults.temperature)),
            top_k=get("top_k", None),
            top_p=get("top_p", None),
            seed=get("seed", None),
            stop_ids=get("stop_ids", ()) or (),
        )


def sample_next_token_np(
    logits: np.ndarray,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Pick one token per row of ``logits`` [B, V] (or [V]); returns int64 ids [B] (or a 0-d array).

    The rules of ``llm.inference.generate.sample_next_token``: temperature 0 is argmax. Otherwise the logits are
    divided by the temperature, cut to the ``top_k`` most likely tokens (ties with the k-th survive), then
    to the smallest set whose probability reaches ``top_p`` (the most likely token always survives), and
    one token is drawn from what is left with ``rng``.
    """
    logits = np.asarray(logits)
    if logits.ndim == 1:
        return sample_next_token_np(logits[None, :], temperature, top_k, top_p, rng)[0]
    if temperature == 0:
        return logits.argmax(axis=-1).astype(np.int64)
    rng = rng if rng is not None else np.random.default_rng()
    scaled = logits.astype(np.float64) / temperature
    vocab = scaled.shape[-1]
    if top_k is not None and top_k < vocab:
        kth = np.partition(scaled, vocab - top_k, axis=-1)[:, vocab - top_k : vocab - top_k + 1]  # [B, 1]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-scaled, axis=-1, kind="stable")
        sorted_logits = np.take_along_axis(scaled, order, axis=-1)
        probs = _softmax(sorted_logits)
        before = np.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above each one
        sorted_logits = np.where(before >= top_p, -np.inf, sorted_logits)
        np.put_along_axis(scaled, order, sorted_logits, axis=-1)
    probs = _softmax(scaled)
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random(len(cdf))[:, None] * cdf[:, -1:]
    picks = (cdf <= u).sum(axis=-1)  # inverse CDF: the first token whose cumulative probability passes u
    last_kept = vocab - 1 - np.argmax(probs[:, ::-1] > 0, axis=-1)  # rounding can push u to the very end
    return np.minimum(picks, last_kept).astype(np.int64)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def session_options(intra_op_num_threads: int | None = None, optimized_model_path: str | Path | None = None):
    """onnxruntime SessionOptions: every graph optimisation (ORT_ENABLE_ALL), sequential execution.

    ``intra_op_num_threads`` None lets onnxruntime use one thread per physical core. With
    ``optimized_model_path`` the optimised graph is saved there, so a later session can load it directly.
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
    options.log_severity_level = 3  # errors only: the exporter's unused-initializer notes are noise here
    return options


def read_generation_config(onnx_dir: str | Path) -> dict[str, Any]:
    """Parse ``generation_config.json`` of an export folder. Raises FileNotFoundError naming the file."""
    path = Path(onnx_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: not an ONNX export folder (export one with `llm export`)")
    return json.loads(path.read_text())


class OnnxGenerator:
    """Continue token sequences with an exported decoder and onnxruntime; the ``llm.inference.generate`` API without torch.

    ``int8`` runs the int8 model of a quantized export (``export_onnx(quantize=True)``): in
    bench/generate.py it decodes 1.4x (demo shape) to 2.5x (10x larger) faster on one CPU thread, for a loss
    change below 1e-3 bits per byte; ``model_file`` names any other graph in the folder.
    ``intra_op_num_threads`` sets onnxruntime's thread count (None: one per physical core); ``providers``
    defaults to the CPU; ``optimized_model_path`` saves the optimised graph there. Raises FileNotFoundError
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
            sess_options=session_options(intra_op_num_threads, optimized_model_path),
            providers=providers or ["CPUExecutionProvider"],
        )
        self.n_layer = int(self.config["n_layer"])
        self.n_head = int(self.config["n_head"])
        self.head_dim = int(self.config["head_dim"])
        self.vocab_size = int(self.config["vocab_size"])
        self.context_length = int(self.config["context_length"])
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(self.n_layer) for kv in ("key", "value")]
        self.output_names = ["logits"] + [f"present.{i}.{kv}" for i in range(self.n_layer) for kv in ("key", "value")]
        self._tokenizer: Tokenizer | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer shipped in the export folder, loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.onnx_dir / TOKENIZER_DIR)
        return self._tokenizer

    def default_params(self, **overrides: Any) -> GenerationParams:
        """The export's default sampling settings (``generation_config.json``), with ``overrides`` applied."""
        return GenerationParams.from_object({**self.config.get("sampling", {}), **overrides})

    def empty_cache(self, batch_size: int = 1) -> list[np.ndarray]:
        """A cache holding nothing (past length 0): the input of the first step."""
        shape = (batch_size, self.n_head, 0, self.head_dim)
        return [np.zeros(shape, dtype=np.float32) for _ in self.past_names]

    def forward(
        self, input_ids: np.ndarray, past: list[np.ndarray] | None = None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder call: ``input_ids`` [B, T] after ``past`` (flat [k0, v0, k1, v1, ...], each [B, H, P, D]).

        Returns ``(logits [B, T, V], present)`` with ``present`` flat like ``past``, each [B, H, P+T, D].
        Raises ValueError when P + T exceeds the context length.
        """
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        if past is None:
            past = self.empty_cache(input_ids.shape[0])
        P, T = past[0].shape[2], input_ids.shape[1]
        if P + T > self.context_length:
            raise ValueError(
                f"sequence of {P + T} tokens ({P} cached + {T} new) exceeds context_length={self.context_length}"
            )
        if len(past) != len(self.past_names):
            raise ValueError(f"past must hold {len(self.past_names)} arrays (key and value per layer), got {len(past)}")
        feed = {"input_ids": input_ids, **dict(zip(self.past_names, past, strict=True))}
        logits, *present = self.session.run(self.output_names, feed)
        return logits, present

    def stream_generate(self, prompt_ids: list[int], params: Any = None) -> Iterator[int]:
        """Yield new token ids one at a time, continuing ``prompt_ids``: ``llm.inference.generate.stream_generate`` in numpy.

        ``params`` is a GenerationParams or any object with its attributes (``SamplingParams`` works); None
        uses the export's defaults. The prompt keeps its last ``context_length`` tokens and is prefilled
        once; then each token is decoded with the cache. When the window would pass ``context_length`` it
        keeps its last ``context_length // 2`` tokens, re-encoded from position 0. Stops after
        ``max_new_tokens`` ids or right after yielding one of ``stop_ids``.

        Raises ValueError for an empty prompt (prepend the <|bos|> id) or out-of-vocabulary ids.
        """
        params = self.default_params() if params is None else GenerationParams.from_object(params)
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise ValueError("prompt_ids is empty: prepend the tokenizer's <|bos|> id to start from nothing")
        if any(not 0 <= t < self.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt_ids must lie in [0, {self.vocab_size}); got {min(prompt_ids)}..{max(prompt_ids)}")
        context = self.context_length
        keep = max(1, context // 2)
        rng = np.random.default_rng(params.seed)
        stop_ids = set(params.stop_ids)

        def step(ids: list[int], past=None) -> tuple[np.ndarray, list[np.ndarray]]:
            logits, present = self.forward(np.array([ids], dtype=np.int64), past)
            return logits[:, -1, :], present  # [1, V]

        window = prompt_ids[-context:]
        logits, cache = step(window)
        for i in range(params.max_new_tokens):
            token = int(sample_next_token_np(logits, params.temperature, params.top_k, params.top_p, rng)[0])
            yield token
            if token in stop_ids or i + 1 == params.max_new_tokens:
                return
            window.append(token)
            if len(window) > context:  # slide, and re-encode the kept tokens from position 0
                window = window[-keep:]
                logits, cache = step(window)
            else:
                logits, cache = step([token], cache)

    def generate(self, prompt_ids: list[int], params: Any = None) -> list[int]:
        """The new ids ``stream_generate`` yields, as a list (the prompt is not included)."""
        return list(self.stream_generate(prompt_ids, params))

    def stream_text(self, prompt: str, params: Any = None) -> Iterator[str]:
        """Continue ``prompt`` (after ``<|bos|>``) and yield text pieces as soon as they decode.

        Multi-byte characters split across tokens are held back until complete; stop ids end the stream
        without being printed (``llm.inference.generate.stream_text``).
        """
        params = self.default_params() if params is None else GenerationParams.from_object(params)
        tokenizer = self.tokenizer
        decoder = tokenizer.stream_decoder(skip_special=True)
        for token_id in self.stream_generate([tokenizer.bos_id, *tokenizer.encode(prompt)], params):
            if token_id in params.stop_ids:
                break
            piece = decoder.feed(token_id)
            if piece:
                yield piece
        tail = decoder.finish()
        if tail:
            yield tail

    def text(self, prompt: str, params: Any = None) -> str:
        """The whole continuation of ``prompt`` as one string."""
        return "".join(self.stream_text(prompt, params))

