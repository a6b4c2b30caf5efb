"""A multi-turn conversation with a model: history, system prompt, and fitting it into the context.

The session works on any ``TextGenerator`` of the decoding core (PyTorch or ONNX Runtime) and imports no
torch; the REPL around it is ``llm.chat``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from llm.data.chat_template import fit_chat, generation_stop_ids
from llm.data.source_template import ChatTemplateError
from llm.inference.decoding import SamplingParams, TextGenerator, stream_text


class ChatSession:
    """A conversation with ``model``: its messages, an optional system prompt and the sampling settings.

    Before each answer the conversation is fitted (``llm.data.chat_template.fit_chat``) into the context
    minus room for the answer (``min(max_new_tokens, context_length // 2)`` tokens): the oldest messages go
    first, and ``notify`` is told. Generation stops at ``<|end|>`` (or any other control token). With a
    ``seed``, answer n is sampled with seed + n, so a scripted conversation is reproducible.
    """

    def __init__(
        self,
        model: TextGenerator,
        *,
        system: str | None = None,
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = 50,
        top_p: float | None = None,
        seed: int | None = None,
        notify: Callable[[str], None] = lambda message: None,
    ):
        self.model, self.tokenizer = model, model.tokenizer
        self.system = system or None
        self.messages: list[dict[str, str]] = []
        self.notify = notify
        self.seed, self.turns = seed, 0
        self.sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                       top_p=top_p, stop_ids=generation_stop_ids(self.tokenizer))
        self.reserve = min(max_new_tokens, model.context_length // 2)

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = []

    def set_system(self, text: str | None) -> None:
        """Set the system prompt; None or "" removes it."""
        self.system = text or None

    @property
    def history(self) -> list[dict[str, str]]:
        """The conversation as messages, the system prompt first when there is one."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + list(self.messages)

    def reply(self, text: str) -> Iterator[str]:
        """Add a user message and yield the answer's text as it is generated.

        The answer (what was generated so far, if the stream is closed early, e.g. on Ctrl-C) joins the
        history when the iteration ends. Yields nothing when even the newest message cannot fit.
        """
        self.messages.append({"role": "user", "content": text})
        ids = self._fit()
        if ids is None:
            self.messages.pop()
            return
        seed = None if self.seed is None else self.seed + self.turns
        self.turns += 1
        params = self.sampling.model_copy(update={"seed": seed})
        pieces: list[str] = []
        stream = stream_text(self.model.stream_generate(ids, params), self.tokenizer, params.stop_ids)
        try:
            for piece in stream:
                pieces.append(piece)
                yield piece
        finally:
            stream.close()  # stops the model's generation too
            self.messages.append({"role": "assistant", "content": "".join(pieces)})

    def _fit(self) -> list[int] | None:
        """The conversation's ids with room for the answer, dropping old messages (with a notice)."""
        context = self.model.context_length
        try:
            fitted = fit_chat(self.tokenizer, self.history, context - self.reserve, add_generation_prompt=True)
        except ChatTemplateError as err:  # an imported model's own template refuses it (a role it does not know)
            self.notify(f"[the model's chat template refuses this conversation: {err}]")
            return None
        if fitted is None:
            self.notify(f"[the system prompt leaves no room in the {context}-token context; shorten it with /system]")
            return None
        if fitted.dropped_messages:
            del self.messages[: fitted.dropped_messages]
            self.notify(f"[context full: dropped the {fitted.dropped_messages} oldest message(s)]")
        if fitted.cut_tokens:
            self.notify(f"[message too long for the context: its first {fitted.cut_tokens} tokens are ignored]")
        return fitted.ids
