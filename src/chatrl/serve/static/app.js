// The chat page: a conversation with the served model over its OpenAI API, streamed.
// Text from the model or the user is only ever set with textContent, never parsed as HTML.
"use strict";

const KEY_STORE = "chatrl-api-key";

const state = {
  history: [], // the turns of this chat; the system message is added to each request
  controller: null, // AbortController of the reply being streamed, null when idle
};

const $ = (id) => document.getElementById(id);

function element(tag, className, text) {
  const node = document.createElement(tag);
  node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function addMessage(role, text) {
  const node = element("div", `message ${role}`);
  node.append(element("div", "role", role === "user" ? "You" : "Assistant"));
  node.append(element("div", "text", text));
  $("messages").append(node);
  node.scrollIntoView({ block: "end" });
  return node;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

async function errorMessage(response) {
  const data = await response.json().catch(() => null);
  if (response.status === 401) {
    $("settings").open = true;
    return "This server needs an API key: enter it under Settings.";
  }
  return data?.error?.message || `HTTP ${response.status}`;
}

async function showModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    setStatus(await errorMessage(response), true);
    return;
  }
  const data = await response.json();
  $("model").textContent = data.data.length ? data.data[0].id : "";
  setStatus("");
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history);
  const body = { messages, stream: true };
  const temperature = parseFloat($("temperature").value);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (!Number.isNaN(maxTokens)) body.max_tokens = maxTokens;
  return body;
}

// The JSON payloads of a server-sent event stream, up to "data: [DONE]".
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice("data: ".length);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  const controller = new AbortController();
  state.controller = controller;
  state.history.push({ role: "user", content: text });
  const question = addMessage("user", text);
  const reply = addMessage("assistant", "");
  const output = reply.querySelector(".text");
  reply.classList.add("streaming");
  setBusy(true);
  setStatus("");
  let note = null;
  let failure = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(requestBody()),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      if (!choice) continue;
      if (choice.delta.content) {
        output.textContent += choice.delta.content;
        reply.scrollIntoView({ block: "end" });
      }
      if (choice.finish_reason === "length") note = "cut at max tokens";
    }
  } catch (error) {
    if (controller.signal.aborted) note = "stopped";
    else failure = error;
  }
  if (state.controller !== controller) return; // "New chat" abandoned this reply
  state.controller = null;
  setBusy(false);
  reply.classList.remove("streaming");
  if (failure) {
    // The turn did not happen: take it back so that it can be edited and sent again.
    state.history.pop();
    question.remove();
    reply.remove();
    if (!$("input").value) $("input").value = text;
    setStatus(failure.message, true);
  } else {
    state.history.push({ role: "assistant", content: output.textContent });
    if (note) reply.append(element("div", "note", note));
  }
  $("input").focus();
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.controller = null;
  state.history = [];
  $("messages").replaceChildren();
  setBusy(false);
  setStatus("");
  $("input").focus();
}

function start() {
  $("api-key").value = localStorage.getItem(KEY_STORE) || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem(KEY_STORE, $("api-key").value.trim());
    showModel();
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("new-chat").addEventListener("click", newChat);
  $("input").focus();
  showModel();
}

start();
