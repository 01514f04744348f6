// mlx-kto web chat: conversation in the page, replies streamed from /api/reply
// (server-sent events over a POST fetch), ratings appended by /api/rate.
"use strict";

const state = { messages: [], busy: false };
const $ = (sel) => document.querySelector(sel);
const STORE = "mlx-kto-chat"; // the conversation survives a reload of the tab

function save() {
  sessionStorage.setItem(STORE, JSON.stringify(state.messages));
}

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  };
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(data.error || `HTTP ${r.status}`);
  return data;
}

function setStatus(text, isError) {
  const el = $("#status");
  el.textContent = text;
  el.className = isError ? "error" : "";
}

function bubble(role, text) {
  // Only the latest reply can be regenerated: drop older replies' buttons.
  document.querySelectorAll(".msg .regen").forEach((b) => b.remove());
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  el.appendChild(body);
  $("#messages").appendChild(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

function button(cls, label, title, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = cls;
  b.textContent = label;
  b.title = title;
  b.addEventListener("click", onClick);
  return b;
}

function markRated(el, label) {
  el.querySelector(".up").classList.toggle("active", label === true);
  el.querySelector(".down").classList.toggle("active", label === false);
  el.dataset.label = label === null ? "" : String(label);
  const m = state.messages.find((x) => x.reply_id === el.dataset.replyId);
  if (m) {
    m.label = label;
    save();
  }
}

async function rate(el, label) {
  let res;
  try {
    res = await api("/api/rate", { reply_id: el.dataset.replyId, label });
  } catch (e) {
    setStatus(`not saved: ${e.message}`, true);
    return;
  }
  el.dataset.ratingId = res.rating_id;
  markRated(el, label);
  setStatus(`saved: thumbs ${label ? "up" : "down"}`);
  await refreshRatings();
}

function addActions(el) {
  const bar = document.createElement("div");
  bar.className = "actions";
  bar.appendChild(button("up", "▲ good", "Thumbs up (a good reply)", () => rate(el, true)));
  bar.appendChild(button("down", "▼ bad", "Thumbs down (a bad reply)", () => rate(el, false)));
  bar.appendChild(button("regen", "↻ again", "Regenerate this reply", () => regenerate(el)));
  el.appendChild(bar);
}

function parseEvents(buffer, onEvent) {
  // Split complete SSE events ("event: x\ndata: {...}\n\n"); return the rest.
  let idx;
  while ((idx = buffer.indexOf("\n\n")) >= 0) {
    const chunk = buffer.slice(0, idx);
    buffer = buffer.slice(idx + 2);
    let name = "message", data = "";
    for (const line of chunk.split("\n")) {
      if (line.startsWith("event: ")) name = line.slice(7);
      else if (line.startsWith("data: ")) data += line.slice(6);
    }
    onEvent(name, data ? JSON.parse(data) : {});
  }
  return buffer;
}

async function generate() {
  state.busy = true;
  $("#send").disabled = true;
  const el = bubble("assistant", "");
  el.classList.add("streaming");
  const textEl = el.querySelector(".text");
  let done = null, error = null;
  try {
    const r = await fetch("/api/reply", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ messages: state.messages }),
    });
    if (!r.ok) throw new Error((await r.json().catch(() => ({}))).error || `HTTP ${r.status}`);
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done: end } = await reader.read();
      if (end) break;
      buffer = parseEvents(buffer + decoder.decode(value, { stream: true }), (name, data) => {
        if (name === "token") textEl.textContent += data.text;
        else if (name === "done") done = data;
        else if (name === "error") error = data.error;
      });
      el.scrollIntoView({ block: "end" });
    }
    if (error) throw new Error(error);
    if (!done) throw new Error("the reply stream ended early");
  } catch (e) {
    el.remove();
    setStatus(`generation failed: ${e.message}`, true);
    state.busy = false;
    $("#send").disabled = false;
    return;
  }
  el.classList.remove("streaming");
  if (textEl.textContent !== done.text) textEl.textContent = done.text; // the saved (trimmed) text
  el.classList.add("done");
  el.dataset.replyId = done.id;
  addActions(el);
  state.messages.push({ role: "assistant", content: done.text, reply_id: done.id, label: null });
  save();
  state.busy = false;
  $("#send").disabled = false;
  setStatus("");
}

async function regenerate(el) {
  if (state.busy) return;
  const last = $("#messages").lastElementChild;
  if (last !== el) {
    setStatus("only the latest reply can be regenerated", true);
    return;
  }
  el.remove();
  state.messages.pop();
  save();
  await generate();
}

async function send(ev) {
  ev.preventDefault();
  const text = $("#input").value;
  if (state.busy || !text.trim()) return;
  $("#input").value = "";
  state.messages.push({ role: "user", content: text });
  save();
  bubble("user", text);
  await generate();
}

async function undo(id) {
  let res;
  try {
    res = await api("/api/undo", { rating_id: id });
  } catch (e) {
    setStatus(`undo failed: ${e.message}`, true);
    return;
  }
  const el = res.reply_id && document.querySelector(`.msg[data-reply-id="${res.reply_id}"]`);
  if (el) markRated(el, null);
  await refreshRatings();
  setStatus("rating undone");
}

async function refreshRatings() {
  // A problem with the list (e.g. a malformed line in the feedback file) shows in the
  // panel; it does not hide that the rating itself was saved.
  const list = $("#ratings");
  let data;
  try {
    data = await api("/api/ratings");
  } catch (e) {
    const li = document.createElement("li");
    li.className = "rating error";
    li.textContent = `cannot list the ratings: ${e.message}`;
    list.replaceChildren(li);
    $("#rating-count").textContent = "";
    return;
  }
  list.replaceChildren();
  for (const r of data.ratings) {
    const li = document.createElement("li");
    const word = r.label === true ? "▲ good" : r.label === false ? "▼ bad" : "? unlabelled";
    li.className = `rating ${r.label === true ? "up" : r.label === false ? "down" : ""}`;
    li.dataset.id = r.id || "";
    const head = document.createElement("div");
    head.className = "head";
    head.textContent = `${word} · ${(r.time || "").replace("T", " ").replace("+00:00", " UTC")}`;
    const q = document.createElement("div");
    q.className = "q";
    q.textContent = r.prompt || "";
    const a = document.createElement("div");
    a.className = "a";
    a.textContent = r.completion || "";
    li.append(head, q, a);
    if (r.undoable) li.appendChild(button("undo", "undo", "Retract this rating", () => undo(r.id)));
    list.appendChild(li);
  }
  $("#rating-count").textContent = `(${data.ratings.length})`;
}

function restore() {
  let saved = [];
  try {
    saved = JSON.parse(sessionStorage.getItem(STORE) || "[]");
  } catch (e) {
    saved = [];
  }
  state.messages = Array.isArray(saved) ? saved : [];
  for (const m of state.messages) {
    const el = bubble(m.role, m.content);
    if (m.role === "assistant") {
      el.classList.add("done");
      el.dataset.replyId = m.reply_id || "";
      addActions(el);
      markRated(el, m.label === undefined ? null : m.label);
    }
  }
}

async function init() {
  restore();
  $("#composer").addEventListener("submit", send);
  $("#input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) send(ev);
  });
  $("#new-chat").addEventListener("click", () => {
    if (state.busy) return;
    state.messages = [];
    save();
    $("#messages").replaceChildren();
    setStatus("");
  });
  try {
    const info = await api("/api/info");
    const s = info.sampling;
    $("#info").textContent = `${info.model}${info.adapter ? " + " + info.adapter : ""} · temp ${s.temp} · ratings → ${info.feedback}`;
    await refreshRatings();
  } catch (e) {
    setStatus(`cannot reach the server: ${e.message}`, true);
  }
}

init();
