"""Generation from an ONNX export with onnxruntime, numpy and the tokenizer only: no PyTorch.

An export folder (written by ``llm.inference.export.export_onnx``) holds ``model.onnx``,
``generation_config.json`` and ``tokenizer/``. The decoder takes ``input_ids`` [B, T], ``position_ids``
[B, T], ``past_mask`` [B, P] and the cache ``past_key_values.{i}.key`` / ``.value`` [B, Hkv, P, D] and returns
``logits`` [B, T, V] and ``present.{i}.key`` / ``.value`` [B, Hkv, P+T, D], Hkv the model's key/value heads
(``n_kv_head`` of the generation config; ``n_head`` in exports older than grouped-query attention), D its
head size; the first step feeds an empty cache
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
STATIC_FILE = "model.static.onnx"  # the serving graph: a static cache updated in place (format 3 exports)
STATIC_INT8_FILE = "model.static.int8.onnx"
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


def read_generation_config(export_dir: str | Path) -> dict[str, Any]:
    """Parse ``generation_config.json`` of an export folder. Raises FileNotFoundError naming the file."""
    path = Path(export_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: not an ONNX export folder (export one with `llm export`)")
    return json.loads(path.read_text())


def kv_heads(config: dict[str, Any]) -> int:
    """The key/value heads of an export's cache from its generation config: ``n_kv_head``, or ``n_head`` for an
    export written before grouped-query attention (where the two were the same)."""
    return int(config.get("n_kv_head") or config["n_head"])


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
        export_dir: str | Path,
        *,
        int8: bool = False,
        model_file: str | None = None,
        intra_op_num_threads: int | None = None,
        providers: list[str] | None = None,
        optimized_model_path: str | Path | None = None,
        spinning: bool = True,
        static_cache: bool = True,
    ):
        import onnxruntime as ort

        self.export_dir = Path(export_dir)
        self.config = read_generation_config(self.export_dir)
        if int8 and model_file is None:
            model_file = self.config.get("int8_model_file") or INT8_FILE
        model_path = self.export_dir / (model_file or self.config.get("model_file", MODEL_FILE))
        if not model_path.exists():
            hint = "; export with quantize=True for an int8 model" if int8 else ""
            raise FileNotFoundError(f"{model_path}: missing from the ONNX export{hint}")
        self.model_path = model_path
        self.int8 = model_path.name == (self.config.get("int8_model_file") or INT8_FILE)
        self._options = {"intra_op_num_threads": intra_op_num_threads, "spinning": spinning}
        self.providers = providers or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(
            str(model_path),
            sess_options=session_options(intra_op_num_threads, optimized_model_path, spinning),
            providers=self.providers,
        )
        self.n_layer = int(self.config["n_layer"])
        self.n_head = int(self.config["n_head"])
        self.n_kv_head = kv_heads(self.config)
        self.head_dim = int(self.config["head_dim"])
        self.vocab_size = int(self.config["vocab_size"])
        self.context_length = int(self.config["context_length"])
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(self.n_layer) for kv in ("key", "value")]
        self.output_names = ["logits"] + [f"present.{i}.{kv}" for i in range(self.n_layer) for kv in ("key", "value")]
        # format 2 graphs take per-row positions and a cache mask, so rows of different lengths can share a batch
        self.batched = {"position_ids", "past_mask"} <= {i.name for i in self.session.get_inputs()}
        self._tokenizer: Tokenizer | None = None
        self.static_cache = static_cache and self._has_static_graph()
        self._static_session: Any = None

    def _has_static_graph(self) -> bool:
        static = self.config.get("static_cache") or {}
        name = static.get("int8_model_file" if self.int8 else "model_file")
        # the graph was checked on the CPU provider's GroupQueryAttention; other providers use the portable one
        return bool(name) and (self.export_dir / name).exists() and self.providers == ["CPUExecutionProvider"]

    def static_cache_decoder(self, slots: int) -> StaticCacheDecoder | None:
        """The export's static-cache graph with ``slots`` rows of buffers of its own (int8 when this generator
        runs int8), sharing one onnxruntime session on this generator's threads; None when the generator does
        not use it (``static_cache=False``, an export without one, or a provider other than the CPU's)."""
        if not self.static_cache:
            return None
        decoder = StaticCacheDecoder(self.export_dir, slots, int8=self.int8, session=self._static_session,
                                     **self._options)
        self._static_session = decoder.session
        return decoder

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer shipped in the export folder, loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.export_dir / TOKENIZER_DIR)
        return self._tokenizer

    def default_params(self, **overrides: Any) -> SamplingParams:
        """The export's default sampling settings (``generation_config.json``), with ``overrides`` applied."""
        return SamplingParams(**{**self.config.get("sampling", {}), **overrides})

    def _params(self, params: SamplingParams | dict | None) -> SamplingParams:
        return self.default_params() if params is None else SamplingParams.model_validate(params)

    def empty_cache(self, batch_size: int = 1) -> list[np.ndarray]:
        """A cache holding nothing (past length 0): the input of the first step."""
        shape = (batch_size, self.n_kv_head, 0, self.head_dim)
        return [np.zeros(shape, dtype=np.float32) for _ in self.past_names]

    def forward(
        self,
        input_ids: np.ndarray,
        past: list[np.ndarray] | None = None,
        *,
        position_ids: np.ndarray | None = None,
        past_mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder call: ``input_ids`` [B, T] after ``past`` (flat [k0, v0, k1, v1, ...], each [B, Hkv, P, D]).

        ``position_ids`` [B, T] (None: P..P+T-1 for every row) and ``past_mask`` [B, P] (None: every cache slot
        holds a token) let rows of different lengths share the batch; they need a format 2 export.
        Returns ``(logits [B, T, V], present)`` with ``present`` flat like ``past``, each [B, Hkv, P+T, D].
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
        static = self.static_cache_decoder(1)
        if static is not None:  # one slot of buffers for this sequence; the cache is written in place

            def step(ids: list[int], cached: int | None) -> tuple[np.ndarray, int]:
                if cached is None:
                    return static.prefill(0, ids)[None], len(ids)
                return static.step(ids, [cached]), cached + 1  # [1, V]
        else:

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


class StaticCacheDecoder:
    """The export's static-cache graph (``model.static.onnx``): cache buffers allocated once and written in place.

    It holds, per layer, key and value buffers [slots, Hkv, L, D] (L: the context length, Hkv: the key/value
    heads). Row r of a call is slot r, and its cached tokens sit in slots' positions 0..n_r-1. ``prefill``
    encodes a sequence into one slot; ``step`` feeds one new token to each of slots 0..B-1, which onnxruntime's
    GroupQueryAttention writes in place at position n_r (each present output is bound to its past input), so a
    step copies no cache: its cost does not grow with the cached tokens beyond reading them. ``move`` copies one
    slot to another, so that the rows in use stay a prefix 0..B-1. Needs onnxruntime's CPU provider, whose
    contrib operators include GroupQueryAttention. Raises FileNotFoundError when the export has no static graph.
    """

    def __init__(self, export_dir: str | Path, slots: int, *, int8: bool = False,
                 intra_op_num_threads: int | None = None, spinning: bool = True, session: Any = None):
        import onnxruntime as ort

        self.export_dir = Path(export_dir)
        config = read_generation_config(self.export_dir)
        static = config.get("static_cache") or {}
        name = static.get("int8_model_file" if int8 else "model_file")
        if not name or not (self.export_dir / name).exists():
            missing = STATIC_INT8_FILE if int8 else STATIC_FILE
            raise FileNotFoundError(f"{self.export_dir}: the export has no {missing} (the static-cache graph); "
                                    "export it again with `llm export onnx`")
        self.model_path = self.export_dir / name
        # ``session``: one already open on this graph (sessions are thread-safe; each decoder has its buffers)
        self.session = session or ort.InferenceSession(
            str(self.model_path), sess_options=session_options(intra_op_num_threads, None, spinning),
            providers=["CPUExecutionProvider"])
        self._ort = ort
        self.n_layer, self.n_head, self.n_kv_head = int(config["n_layer"]), int(config["n_head"]), kv_heads(config)
        self.head_dim, self.vocab_size = int(config["head_dim"]), int(config["vocab_size"])
        self.context_length = int(config["context_length"])
        self.slots = slots
        shape = (slots, self.n_kv_head, self.context_length, self.head_dim)
        self.buffers = [np.zeros(shape, dtype=np.float32) for _ in range(2 * self.n_layer)]
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(self.n_layer) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(self.n_layer) for kv in ("key", "value")]
        self._bindings: dict[tuple[int, int], Any] = {}  # (first slot, count) -> an IOBinding over those slots
        # a step's inputs and logits live in arrays bound once per batch size: a step writes its ids and
        # positions into them instead of binding three new inputs and an output (about 10% of a batch-8 step)
        self._step_ids = np.zeros((slots, 1), dtype=np.int64)
        self._step_positions = np.zeros((slots, 1), dtype=np.int64)
        self._step_last = np.zeros(slots, dtype=np.int32)
        self._step_logits = np.zeros((slots, 1, self.vocab_size), dtype=np.float32)
        self._step_bindings: dict[int, Any] = {}  # batch size -> the IOBinding of a step over slots 0..B-1

    def _binding(self, first: int, count: int) -> Any:
        """The IOBinding for slots first..first+count-1: each present output bound to its past input, so
        onnxruntime writes the new keys and values into the buffers. Made once per (first, count)."""
        key = (first, count)
        if key not in self._bindings:
            binding = self.session.io_binding()
            binding.bind_output("logits")  # first: get_outputs() lists the outputs in the order they were bound
            for past, present, buffer in zip(self.past_names, self.present_names, self.buffers, strict=True):
                value = self._ort.OrtValue.ortvalue_from_numpy(buffer[first:first + count])  # a view: no copy
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)
            self._bindings[key] = binding
        return self._bindings[key]

    def _step_binding(self, count: int) -> Any:
        """The IOBinding of a step over slots 0..count-1: the cache as ``_binding`` binds it, and the step's
        inputs and logits bound to views of the step arrays. Made once per batch size."""
        if count not in self._step_bindings:
            binding = self.session.io_binding()
            value = self._ort.OrtValue.ortvalue_from_numpy
            binding.bind_ortvalue_output("logits", value(self._step_logits[:count]))
            for past, present, buffer in zip(self.past_names, self.present_names, self.buffers, strict=True):
                cache = value(buffer[:count])
                binding.bind_ortvalue_input(past, cache)
                binding.bind_ortvalue_output(present, cache)
            binding.bind_ortvalue_input("input_ids", value(self._step_ids[:count]))
            binding.bind_ortvalue_input("position_ids", value(self._step_positions[:count]))
            binding.bind_ortvalue_input("cache_last", value(self._step_last[:count]))
            self._step_bindings[count] = binding
        return self._step_bindings[count]

    def _run(self, first: int, ids: np.ndarray, positions: np.ndarray, last: np.ndarray) -> np.ndarray:
        binding = self._binding(first, len(ids))
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64))
        binding.bind_cpu_input("cache_last", np.ascontiguousarray(last, dtype=np.int32))
        binding.bind_output("logits")  # unallocated again: the last run's logits had that run's shape
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def prefill(self, slot: int, ids: Sequence[int]) -> np.ndarray:
        """Encode ``ids`` (at positions 0..T-1) into ``slot``, replacing what it held; returns the last
        token's logits [V]. Raises ValueError when the ids do not fit the context."""
        return self.prefill_rows(slot, [ids])[0]

    def prefill_rows(self, first: int, windows: Sequence[Sequence[int]]) -> np.ndarray:
        """Encode ``windows[r]`` into slot ``first + r`` for every r, in one decoder call; returns each window's
        last token's logits [n, V]. A shorter window is padded on the right (with its last id) to the longest:
        the padding's keys and values land in the slots after the window's, where the row's next tokens
        overwrite them before any query reaches them. Raises ValueError when a window is empty, does not fit
        the context, or the slots run out."""
        lengths = [len(w) for w in windows]
        T = max(lengths, default=0)
        if not lengths or min(lengths) < 1 or T > self.context_length:
            raise ValueError(f"prefills of {lengths} tokens do not fit context_length={self.context_length}")
        if not 0 <= first <= first + len(windows) <= self.slots:
            raise ValueError(f"slots {first}..{first + len(windows) - 1} are outside 0..{self.slots - 1}")
        ids = np.array([[*w, *[w[-1]] * (T - len(w))] for w in windows], dtype=np.int64)
        positions = np.broadcast_to(np.arange(T), ids.shape)
        logits = self._run(first, ids, positions, np.full(len(windows), T - 1))
        return logits[np.arange(len(windows)), np.array(lengths) - 1]

    def step(self, ids: Sequence[int], lengths: Sequence[int]) -> np.ndarray:
        """Feed ``ids[r]`` to slot r, whose cache holds ``lengths[r]`` tokens (so the token sits at that
        position), for r in 0..B-1; returns the next-token logits [B, V]. Raises ValueError when a row is full."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if len(ids) > self.slots or len(ids) != len(lengths):
            raise ValueError(f"{len(ids)} ids for {len(lengths)} lengths and {self.slots} slots")
        if lengths.size and int(lengths.max()) >= self.context_length:
            raise ValueError(f"a row holds {int(lengths.max())} tokens: no room left in "
                             f"context_length={self.context_length}")
        B = len(ids)
        binding = self._step_binding(B)
        self._step_ids[:B, 0] = ids
        self._step_positions[:B, 0] = lengths
        self._step_last[:B] = lengths
        self.session.run_with_iobinding(binding)
        return self._step_logits[:B, 0].copy()  # a copy: the next step overwrites the bound array

    def move(self, source: int, target: int, length: int) -> None:
        """Copy the first ``length`` cached tokens of slot ``source`` into slot ``target``."""
        for buffer in self.buffers:
            buffer[target, :, :length] = buffer[source, :, :length]
