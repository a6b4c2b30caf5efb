// The chat page of `llm serve`: talks to this server's /v1/chat/completions as a stream of server-sent events.
// Model and user text only ever goes into the page as text (textContent, Text nodes), never as HTML.
"use strict";

const KEY_STORAGE = "llm-api-key"; // sessionStorage: gone with the tab, never in the URL
const $ = (id) => document.getElementById(id);

const state = {
  config: null, // ui/config.json: the model id, whether a key is needed, the limits
  history: [], // [{role, content}] of the conversation shown (user and assistant turns)
  controller: null, // the AbortController of the answer being streamed
  chat: 0, // counts new chats: an answer of an earlier chat that ends late changes nothing
};

// ------------------------------------------------------------------------------------------- the page

function addMessage(role, text) {
  const box = document.createElement("div");
  box.className = `message ${role}`;
  const who = document.createElement("span");
  who.className = "role";
  who.textContent = role === "user" ? "you" : state.config.model;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  box.append(who, body);
  $("messages").append(box);
  scrollDown();
  return body;
}

function notice(text, kind = "info") {
  const line = document.createElement("p");
  line.className = `notice ${kind}`;
  line.textContent = text;
  $("messages").append(line);
  scrollDown();
}

function scrollDown() {
  const messages = $("messages");
  messages.scrollTop = messages.scrollHeight;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("status").textContent = busy ? "Answering… (Stop ends the answer)" : "Ready.";
}

// ------------------------------------------------------------------------------------------- settings

function readSettings() {
  // the request's sampling fields, or an error message naming the setting that is out of range
  const limits = state.config;
  const temperature = Number($("temperature").value);
  const topP = Number($("top-p").value);
  const maxTokens = Number($("max-tokens").value);
  if ($("temperature").value === "" || !(temperature >= 0 && temperature <= 2)) {
    return { error: "Temperature must be a number from 0 to 2." };
  }
  if ($("top-p").value === "" || !(topP > 0 && topP <= 1)) {
    return { error: "Top-p must be a number above 0 and at most 1." };
  }
  if (!Number.isInteger(maxTokens) || maxTokens < 1 || maxTokens > limits.max_tokens) {
    return { error: `Max tokens must be a whole number from 1 to ${limits.max_tokens} (the server's limit).` };
  }
  return { temperature, top_p: topP, max_tokens: maxTokens };
}

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// ------------------------------------------------------------------------------------------- errors

class ServerError extends Error {
  // an answer the server refused (status) or ended with an error event (status 0)
  constructor(status, error) {
    super((error && error.message) || `HTTP ${status}`);
    this.status = status;
    this.code = (error && error.code) || null;
  }
}

// an error event that ends a stream, as the status the same error has before a stream begins
const STREAM_ERRORS = { request_timeout: 504, engine_unavailable: 503, generation_failed: 500 };

function explain(err) {
  // one line for the user: what happened and what to do
  const limits = state.config;
  switch (err.status) {
    case 401:
      return "The server needs an API key: enter it under Settings (it is kept in this tab only), then send again.";
    case 413:
      return `The conversation is larger than the server accepts (${limits.max_request_bytes} bytes a request): ` +
        "shorten the message or start a new chat.";
    case 429:
      return "The server is busy (its queue is full): wait a moment and send again.";
    case 503:
      return "The model's engine is not running (it may be restarting): send again shortly.";
    case 504:
      return "The answer took longer than the server allows: ask for fewer tokens or send again.";
    case 400:
      if (err.code === "context_length_exceeded") {
        return `The message alone is longer than the model's context (${limits.max_prompt_tokens} tokens): ` +
          "shorten it or the system prompt.";
      }
      return `The server refused the request: ${err.message}`;
    default:
      return err.status ? `The server answered ${err.status}: ${err.message}` : `The answer failed: ${err.message}`;
  }
}

// ------------------------------------------------------------------------------------------- the request

async function* serverSentEvents(response) {
  // each `data:` payload of the response body, as it arrives
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data) yield data;
    }
  }
}

function requestBody(messages, settings) {
  const system = $("system").value.trim();
  const all = system ? [{ role: "system", content: system }, ...messages] : messages;
  return JSON.stringify({ model: state.config.model, messages: all, stream: true, ...settings });
}

function fitted(messages, settings) {
  // the conversation less its oldest turns until the body fits the server's byte limit (null: even the last
  // message alone does not)
  let kept = messages;
  while (new TextEncoder().encode(requestBody(kept, settings)).length > state.config.max_request_bytes) {
    if (kept.length <= 1) return null;
    kept = kept.slice(kept[0].role === "user" && kept.length > 2 ? 2 : 1);
  }
  return kept;
}

async function post(messages, settings, signal) {
  const response = await fetch("v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json", ...authHeaders() },
    body: requestBody(messages, settings),
    signal,
    cache: "no-store",
  });
  if (!response.ok) {
    let error = null;
    try {
      error = (await response.json()).error;
    } catch (_) {
      // not JSON (a proxy's page): the status says enough
    }
    throw new ServerError(response.status, error);
  }
  return response;
}

async function streamInto(response, body) {
  // append the answer's pieces to `body` as they arrive; returns {text, finish}
  let text = "";
  let finish = null;
  for await (const data of serverSentEvents(response)) {
    if (data === "[DONE]") break;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new ServerError(STREAM_ERRORS[chunk.error.code] || 0, chunk.error);
    const choice = chunk.choices && chunk.choices[0];
    if (choice && choice.delta && choice.delta.content) {
      text += choice.delta.content;
      body.textContent = text;
      scrollDown();
    }
    if (choice && choice.finish_reason) finish = choice.finish_reason;
  }
  return { text, finish };
}

async function answer(messages, settings) {
  // send the conversation, dropping its oldest turns while the server says the prompt is too long
  let kept = messages;
  for (;;) {
    try {
      return { kept, response: await post(kept, settings, state.controller.signal) };
    } catch (err) {
      const tooLong = err.status === 400 && err.code === "context_length_exceeded";
      if (!tooLong || kept.length <= 1) throw err;
      kept = kept.slice(kept[0].role === "user" && kept.length > 2 ? 2 : 1);
    }
  }
}

async function send(text) {
  const settings = readSettings();
  if (settings.error) {
    notice(settings.error, "error");
    return;
  }
  const messages = fitted([...state.history, { role: "user", content: text }], settings);
  if (messages === null) {
    notice(explain({ status: 413 }), "error");
    return;
  }
  $("message").value = "";
  const asked = addMessage("user", text).parentElement;
  const chat = state.chat;
  state.controller = new AbortController();
  setBusy(true);
  let body = null;
  try {
    const { kept, response } = await answer(messages, settings);
    if (kept.length < messages.length) {
      notice(`The oldest ${messages.length - kept.length} messages were left out to fit the model's context.`);
    }
    body = addMessage("assistant", "");
    const { text: reply, finish } = await streamInto(response, body);
    state.history = [...kept, { role: "assistant", content: reply }];
    if (finish === "length") notice("The answer reached max tokens.");
  } catch (err) {
    if (chat === state.chat) failed(err, text, asked, body);
  } finally {
    state.controller = null;
    setBusy(false);
    $("message").focus();
  }
}

function failed(err, text, asked, body) {
  // an answer stopped after it began is kept as far as it went; a message left unanswered goes back into the
  // message box
  const partial = body ? body.textContent : "";
  if (partial) {
    state.history.push({ role: "user", content: text }, { role: "assistant", content: partial });
  } else {
    asked.remove();
    if (body) body.parentElement.remove();
    $("message").value = text;
  }
  if (err.name === "AbortError") {
    notice(partial ? "Stopped." : "Stopped before the answer began.");
  } else if (err instanceof ServerError) {
    notice(explain(err), "error");
  } else {
    notice(`Cannot reach the server (${err.message}): is llm serve running?`, "error");
  }
}

// ------------------------------------------------------------------------------------------- start

function newChat() {
  state.chat += 1;
  if (state.controller) state.controller.abort();
  state.history = [];
  $("messages").replaceChildren();
  $("message").focus();
}

function wire() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("message").value.trim();
    if (text && !state.controller) send(text);
  });
  $("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", newChat);
  $("api-key").addEventListener("input", () => sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim()));
}

async function start() {
  wire();
  try {
    const response = await fetch("ui/config.json", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    state.config = await response.json();
  } catch (err) {
    $("status").textContent = `Cannot load the server's settings (${err.message}): is llm serve running?`;
    return;
  }
  const config = state.config;
  $("model").textContent = config.model;
  $("max-tokens").max = String(config.max_tokens);
  $("max-tokens").value = String(config.default_max_tokens);
  $("key-row").hidden = !config.api_key_required;
  $("api-key").value = sessionStorage.getItem(KEY_STORAGE) || "";
  $("limits").textContent = `Server limits: ${config.max_tokens} new tokens, ${config.max_prompt_tokens} prompt ` +
    `tokens (context ${config.context_length}), ${config.max_request_bytes} bytes a request.`;
  setBusy(false);
  $("message").focus();
}

start();
