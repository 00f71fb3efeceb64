// The annotator's page: log in with a token, rank the responses of one task, submit, repeat.
// Text from tasks is only ever set with textContent, never parsed as HTML.
"use strict";

const TOKEN_KEY = "chatrl-label-token";
const FLAGS = ["harmful", "untruthful"];

const state = {
  token: localStorage.getItem(TOKEN_KEY),
  assignment: null,
  order: [], // response indices as shown in the ranking list, best first
  placed: 0, // how many of `order` the annotator has placed; ranked when placed === K
  flags: { harmful: new Set(), untruthful: new Set() },
  pendingFlag: null, // "harmful" or "untruthful" after h or u, until a number follows
  busy: false,
};

const $ = (id) => document.getElementById(id);

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function show(section) {
  for (const id of ["login", "work", "done"]) $(id).hidden = id !== section;
  $("logout").hidden = section === "login";
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${state.token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401) {
    logout("Your token was not accepted; log in again.");
    throw new Error("not logged in");
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail);
    throw new Error(detail || `HTTP ${response.status}`);
  }
  return data;
}

function logout(message) {
  localStorage.removeItem(TOKEN_KEY);
  state.token = null;
  $("who").textContent = "";
  $("progress").textContent = "";
  $("login-error").textContent = message || "";
  show("login");
  $("token").focus();
}

async function login(token) {
  state.token = token;
  const me = await api("GET", "/api/me");
  localStorage.setItem(TOKEN_KEY, token);
  $("who").textContent = me.name;
  await loadNext();
}

function showProgress(progress) {
  $("progress").textContent = `${progress.done} ranked · ${progress.remaining} to go`;
}

async function loadNext() {
  const data = await api("GET", "/api/next");
  showProgress(data.progress);
  state.assignment = data.assignment;
  if (!state.assignment) {
    show("done");
    $("check-again").focus();
    return;
  }
  const k = state.assignment.responses.length;
  state.order = [...Array(k).keys()];
  state.placed = 0;
  state.flags = { harmful: new Set(), untruthful: new Set() };
  state.pendingFlag = null;
  $("rewrite").value = "";
  $("message").textContent = "";
  renderTask();
  show("work");
  document.activeElement?.blur();
}

function renderTask() {
  const conversation = $("conversation");
  conversation.replaceChildren();
  for (const message of state.assignment.prompt) {
    const turn = element("div", `turn ${message.role}`);
    turn.append(element("div", "role", message.role), element("div", "text", message.content));
    conversation.append(turn);
  }
  const cards = $("responses");
  cards.replaceChildren();
  state.assignment.responses.forEach((text, index) => {
    const card = element("article", "response");
    card.dataset.index = index;
    const head = element("div", "response-head");
    head.append(element("span", "number", `Response ${index + 1}`), element("span", "rank"));
    const flags = element("div", "flags");
    for (const kind of FLAGS) {
      const label = element("label", "flag");
      const box = element("input");
      box.type = "checkbox";
      box.dataset.flag = kind;
      box.addEventListener("change", () => setFlag(kind, index, box.checked));
      label.append(box, ` ${kind}`);
      flags.append(label);
    }
    card.append(head, flags, element("div", "text", text));
    cards.append(card);
  });
  renderRanking();
}

function renderRanking() {
  const k = state.order.length;
  const list = $("ranking");
  list.replaceChildren();
  state.order.forEach((index, position) => {
    const item = element("li", position < state.placed ? "placed" : "unplaced");
    item.draggable = true;
    item.dataset.index = index;
    const snippet = state.assignment.responses[index].replace(/\s+/g, " ").slice(0, 80);
    item.append(element("strong", "", `Response ${index + 1}`), element("span", "snippet", snippet));
    item.addEventListener("dragstart", (event) => {
      event.dataTransfer.setData("text/plain", String(index));
      event.dataTransfer.effectAllowed = "move";
    });
    item.addEventListener("dragover", (event) => event.preventDefault());
    item.addEventListener("drop", (event) => {
      event.preventDefault();
      moveTo(Number(event.dataTransfer.getData("text/plain")), position);
    });
    list.append(item);
  });
  for (const card of document.querySelectorAll("#responses .response")) {
    const position = state.order.indexOf(Number(card.dataset.index));
    card.querySelector(".rank").textContent =
      position < state.placed ? `ranked #${position + 1}` : "";
    for (const box of card.querySelectorAll("input[data-flag]")) {
      box.checked = state.flags[box.dataset.flag].has(Number(card.dataset.index));
    }
  }
  const ranked = state.placed === k;
  $("submit").disabled = !ranked || state.busy;
  const pending = state.pendingFlag ? ` Flag which response as ${state.pendingFlag}?` : "";
  $("ranking-state").textContent =
    (ranked
      ? "Ranked. Press Enter to submit."
      : `Type the number of the best response not yet placed (${state.placed} of ${k} placed).`) +
    pending;
}

// Dragging arranges the whole list, so afterwards every response counts as placed.
function moveTo(index, position) {
  const order = state.order.filter((i) => i !== index);
  order.splice(position, 0, index);
  state.order = order;
  state.placed = order.length;
  renderRanking();
}

function place(index) {
  const k = state.order.length;
  if (index >= k || state.order.indexOf(index) < state.placed) return;
  const rest = state.order.filter((i) => i !== index);
  rest.splice(state.placed, 0, index);
  state.order = rest;
  state.placed += 1;
  if (state.placed === k - 1) state.placed = k;
  renderRanking();
}

function setFlag(kind, index, on) {
  if (on) state.flags[kind].add(index);
  else state.flags[kind].delete(index);
  renderRanking();
}

async function submit() {
  const k = state.order.length;
  if (!state.assignment || state.placed !== k || state.busy) return;
  state.busy = true;
  $("submit").disabled = true;
  $("message").textContent = "Saving…";
  const flags = {};
  for (const kind of FLAGS) flags[kind] = [...state.flags[kind]].sort((a, b) => a - b);
  try {
    await api("POST", `/api/assignments/${state.assignment.id}`, {
      ranking: state.order,
      flags,
      rewrite: $("rewrite").value.trim() || null,
    });
    await loadNext();
  } catch (error) {
    $("message").textContent = `Not saved: ${error.message}`;
  } finally {
    state.busy = false;
    if (state.assignment) renderRanking();
  }
}

function onKey(event) {
  if ($("work").hidden) return;
  const target = event.target;
  if (target.tagName === "TEXTAREA" || target.tagName === "INPUT") {
    if (target.id === "rewrite" && event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      submit();
    } else if (target.id === "rewrite" && event.key === "Escape") {
      target.blur();
    }
    if (target.type !== "checkbox") return;
  }
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key;
  if (/^[1-9]$/.test(key)) {
    const index = Number(key) - 1;
    if (state.pendingFlag) {
      if (index < state.order.length) {
        const kind = state.pendingFlag;
        state.pendingFlag = null;
        setFlag(kind, index, !state.flags[kind].has(index));
      }
    } else {
      place(index);
    }
  } else if (key === "h" || key === "u") {
    state.pendingFlag = key === "h" ? "harmful" : "untruthful";
    renderRanking();
  } else if (key === "w") {
    event.preventDefault(); // or the "w" would land in the box
    $("rewrite").focus();
  } else if (key === "Backspace") {
    // A full ranking's last response placed itself: take back the last one typed.
    const k = state.order.length;
    state.placed = Math.max(0, state.placed === k ? k - 2 : state.placed - 1);
    renderRanking();
  } else if (key === "Escape") {
    state.order = [...state.order].sort((a, b) => a - b);
    state.placed = 0;
    state.pendingFlag = null;
    renderRanking();
  } else if (key === "Enter") {
    event.preventDefault(); // a focused button would submit a second time
    submit();
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    $("login-error").textContent = "";
    login($("token").value.trim()).catch((error) => {
      if (state.token) $("login-error").textContent = error.message;
    });
  });
  $("logout").addEventListener("click", () => logout());
  $("submit").addEventListener("click", submit);
  $("check-again").addEventListener("click", () => loadNext());
  document.addEventListener("keydown", onKey);
  if (state.token) {
    login(state.token).catch(() => {});
  } else {
    logout();
  }
});
