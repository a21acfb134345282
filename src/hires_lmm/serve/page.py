"""The web page served at ``/``: plain HTML and JavaScript, no build step, no external resources.

* **Image**: pick or drop an image; the served model's plan is drawn over it (``POST /v1/plan``),
  shown once.
* **Compare methods**: every method's plan of the same image side by side, each as the server's
  :func:`~hires_lmm.image.overlay.draw_plan` picture (view boxes and the views as the encoder
  receives them) with its visual tokens and TFLOPs per image (``/v1/plan``'s ``cost``: the cost
  model at full size). It asks nothing of the model, so it works with any model, trained or not.
* **Chat**: the conversation is kept, as a chat history: each question is sent with the earlier
  turns (``POST /v1/chat/completions`` with ``stream: true``, the same API any client uses) and
  the answer streams into its bubble. A new image starts a new conversation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

__all__ = ["PAGE", "render_page"]

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>hires-lmm</title>
<style>
  :root { --fg:#1d1d1f; --muted:#6e6e73; --line:#d2d2d7; --accent:#1d3557; --bg:#fafafa; }
  * { box-sizing: border-box; }
  body { margin:0; font:15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color:var(--fg); background:var(--bg); }
  header { padding:12px 20px; border-bottom:1px solid var(--line); background:#fff; display:flex; gap:16px; align-items:baseline; }
  header h1 { font-size:18px; margin:0; }
  header .meta { color:var(--muted); font-size:13px; }
  main { display:grid; grid-template-columns:minmax(300px, 1fr) minmax(320px, 1.2fr); gap:20px; padding:20px; }
  @media (max-width: 900px) { main { grid-template-columns:1fr; } }
  section { background:#fff; border:1px solid var(--line); border-radius:8px; padding:16px; min-width:0; }
  #compare-section { grid-column:1 / -1; }
  h2 { font-size:15px; margin:0 0 10px; }
  h2 small { font-weight:normal; color:var(--muted); }
  #drop { border:2px dashed var(--line); border-radius:8px; padding:18px; text-align:center; color:var(--muted); cursor:pointer; }
  #drop.over { border-color:var(--accent); color:var(--accent); background:#f0f4fa; }
  #stage { position:relative; margin-top:12px; display:none; line-height:0; }
  #stage img { width:100%; max-height:420px; object-fit:contain; height:auto; display:block; border-radius:4px; }
  #boxes { position:absolute; inset:0; width:100%; height:100%; pointer-events:none; }
  #boxes text { font:bold 13px system-ui, sans-serif; paint-order:stroke; stroke:#fff; stroke-width:3px; }
  #plan-summary { color:var(--muted); font-size:13px; margin:8px 0; min-height:1em; }
  #compare { display:grid; grid-template-columns:repeat(auto-fill, minmax(250px, 1fr)); gap:12px; }
  #compare:empty::before { content:"Pick an image to see every method's plan of it."; color:var(--muted); font-size:13px; }
  .card { border:1px solid var(--line); border-radius:6px; padding:8px; background:#fcfcfd; }
  .card.served { border-color:var(--accent); box-shadow:0 0 0 1px var(--accent); }
  .card h3 { font-size:14px; margin:0 0 6px; display:flex; justify-content:space-between; }
  .card h3 span { font-weight:normal; color:var(--muted); font-size:12px; }
  .card img { width:100%; height:auto; max-height:560px; object-fit:contain; display:block; border-radius:3px; min-height:40px; background:#f3f3f5; }
  .card .nums { font-size:13px; margin-top:6px; }
  .card .nums b { font-variant-numeric:tabular-nums; }
  .card[data-state=error] .nums { color:#b00020; }
  #chat { display:flex; flex-direction:column; gap:8px; max-height:460px; overflow-y:auto; padding:4px; margin-bottom:8px; }
  #chat:empty::before { content:"No messages yet."; color:var(--muted); font-size:13px; }
  .msg { max-width:88%; padding:8px 12px; border-radius:10px; white-space:pre-wrap; word-break:break-word; }
  .msg.user { align-self:flex-end; background:var(--accent); color:#fff; }
  .msg.assistant { align-self:flex-start; background:#eef0f4; min-width:3em; min-height:2.2em; }
  .msg .thumb { display:block; max-width:120px; max-height:80px; border-radius:4px; margin-bottom:4px; }
  textarea { width:100%; min-height:60px; font:inherit; padding:8px; border:1px solid var(--line); border-radius:6px; resize:vertical; }
  .row { display:flex; gap:12px; align-items:center; margin:10px 0; flex-wrap:wrap; }
  .row label { font-size:13px; color:var(--muted); }
  .row input[type=number] { width:80px; font:inherit; padding:3px 6px; }
  button { font:inherit; padding:7px 18px; border-radius:6px; border:0; background:var(--accent); color:#fff; cursor:pointer; }
  button.secondary { background:#fff; color:var(--accent); border:1px solid var(--accent); }
  button:disabled { opacity:.5; cursor:default; }
  #status { font-size:13px; color:var(--muted); margin-top:4px; }
  #status[data-state=error] { color:#b00020; }
  #error { color:#b00020; font-size:13px; white-space:pre-wrap; }
</style>
</head>
<body>
<header><h1>hires-lmm</h1><span class="meta" id="model">loading model…</span></header>
<main>
  <section>
    <h2>Image</h2>
    <div id="drop" tabindex="0">Drop an image here, or click to pick one
      <input id="file" type="file" accept="image/*" hidden>
    </div>
    <div id="stage"><img id="preview" alt="the chosen image with the served method's views"><svg id="boxes" preserveAspectRatio="none"></svg></div>
    <div id="plan-summary"></div>
    <div id="error"></div>
  </section>
  <section id="chat-section">
    <h2>Chat <small id="chat-note"></small></h2>
    <div id="chat" aria-live="polite"></div>
    <textarea id="question" placeholder="Ask about the image">What is in the image?</textarea>
    <div class="row">
      <label>max tokens <input id="max-tokens" type="number" min="1" value="64"></label>
      <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0"></label>
      <button id="ask">Send</button>
      <button id="new-chat" class="secondary">New conversation</button>
    </div>
    <div id="status" data-state="idle" data-chunks="0"></div>
  </section>
  <section id="compare-section">
    <h2>Compare methods <small>every method's plan of this image: visual tokens and TFLOPs per image
      (cost model at full size: CLIP ViT-L/14, ConvNeXt-L, a 7B LLM); no model is run</small></h2>
    <div id="compare"></div>
  </section>
</main>
<script>
"use strict";
const METHODS = __METHODS__;
const $ = (id) => document.getElementById(id);
const COLOURS = { slice:"#e63946", overview:"#1d3557", base:"#1d3557", tile:"#e63946", local:"#e63946",
  global:"#2a9d8f", thumbnail:"#1d3557", highres:"#e63946", lowres:"#2a9d8f", image:"#e63946" };
let model = null, imageUrl = null, imageSent = false, busy = false;
// the conversation so far, as OpenAI messages: what the next request sends before its new question
const conversation = [];
window.lastAnswer = "";

function showError(msg) { $("error").textContent = msg || ""; }
async function errorText(resp) {
  try { const j = await resp.json(); return (j.error && j.error.message) || JSON.stringify(j); }
  catch (e) { return resp.status + " " + resp.statusText; }
}

fetch("/v1/models").then((r) => r.json()).then((j) => {
  model = j.data && j.data[0];
  if (!model) { $("model").textContent = "no model loaded: plans and costs only"; $("chat-section").hidden = true; return; }
  $("model").textContent = `${model.id} · method ${model.method} · template ${model.chat_template} · context ${model.max_model_len}`;
  document.querySelectorAll(".card").forEach((c) => c.classList.toggle("served", c.dataset.method === model.method));
}).catch((e) => showError("cannot list models: " + e));

function pick(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) { showError(`${file.name} is not an image`); return; }
  const fr = new FileReader();
  fr.onload = () => setImage(fr.result);
  fr.readAsDataURL(file);
}
const drop = $("drop");
drop.addEventListener("click", () => $("file").click());
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
$("file").addEventListener("change", (e) => pick(e.target.files[0]));
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); pick(e.dataTransfer.files[0]); });

function postPlan(body) {
  return fetch("/v1/plan", { method:"POST", headers:{ "Content-Type":"application/json" }, body: JSON.stringify(body) });
}

async function setImage(url) {
  imageUrl = url;
  showError("");
  newConversation("new image: new conversation");
  $("preview").src = url;
  $("stage").style.display = "block";
  $("boxes").innerHTML = "";
  $("plan-summary").textContent = "planning…";
  compareAll(url);
  // the served method's boxes over the image itself (no overlay picture: that one is in the comparison)
  const resp = await postPlan({ image: url, overlay: false });
  if (!resp.ok) { $("plan-summary").textContent = ""; showError(await errorText(resp)); return; }
  const j = await resp.json();
  drawPlan(j.plan, j.cost);
}

function compareAll(url) {
  const grid = $("compare");
  grid.innerHTML = "";
  for (const m of METHODS) {
    const card = document.createElement("div");
    card.className = "card" + (model && model.method === m ? " served" : "");
    card.dataset.method = m; card.dataset.state = "loading";
    card.innerHTML = `<h3>${m}<span></span></h3><img alt="${m}'s plan of the image"><div class="nums">planning…</div>`;
    grid.appendChild(card);
    postPlan({ image: url, method: m, overlay_width: 480 }).then(async (resp) => {
      if (url !== imageUrl) return;  // a newer image replaced this one
      if (!resp.ok) { card.dataset.state = "error"; card.querySelector(".nums").textContent = await errorText(resp); return; }
      const j = await resp.json();
      const grid_ = j.plan.grid ? j.plan.grid.join("×") : "no grid";
      const nv = j.plan.views.length;
      card.querySelector("h3 span").textContent = `${nv} view${nv === 1 ? "" : "s"} · ${grid_}`;
      card.querySelector("img").src = j.overlay;
      const nums = card.querySelector(".nums");
      nums.innerHTML = "<b class='tokens'></b> visual tokens · <b class='tflops'></b> TFLOPs / image";
      nums.querySelector(".tokens").textContent = String(j.plan.num_visual_tokens) + (j.plan.extra && j.plan.extra.bound ? " (at most)" : "");
      nums.querySelector(".tflops").textContent = j.cost.tflops.total.toFixed(2);
      card.dataset.tokens = String(j.plan.num_visual_tokens);
      card.dataset.tflops = String(j.cost.tflops.total);
      card.dataset.state = "done";
    }).catch((e) => { card.dataset.state = "error"; card.querySelector(".nums").textContent = String(e); });
  }
}

function drawPlan(plan, cost) {
  const [W, H] = plan.image_size, svg = $("boxes"), NS = "http://www.w3.org/2000/svg";
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.innerHTML = "";
  const k = W / Math.max(1, svg.clientWidth || W);  // keep strokes and labels a constant on-screen size
  plan.views.forEach((v, i) => {
    if (!v.box) return;
    const [x0, y0, x1, y1] = v.box, c = COLOURS[v.role] || "#000";
    const whole = x0 <= 0.5 && y0 <= 0.5 && x1 >= W - 0.5 && y1 >= H - 0.5;
    const r = document.createElementNS(NS, "rect");
    Object.entries({ x:x0, y:y0, width:x1 - x0, height:y1 - y0, fill:"none", stroke:c,
                     "stroke-width": (whole ? 1.5 : 3) * k, "data-role": v.role }).forEach(([a, b]) => r.setAttribute(a, b));
    svg.appendChild(r);
    if (!whole) {
      const t = document.createElementNS(NS, "text");
      t.setAttribute("x", x0 + 4 * k); t.setAttribute("y", y0 + 15 * k); t.setAttribute("fill", c);
      t.setAttribute("font-size", 13 * k); t.style.strokeWidth = 3 * k;
      t.textContent = `${i} ${v.role}`;
      svg.appendChild(t);
    }
  });
  const grid = plan.grid ? plan.grid.join("×") : "none";
  $("plan-summary").textContent = `${plan.method}: image ${W}×${H}, grid ${grid}, ${plan.views.length} views, ` +
                                  `${plan.num_visual_tokens} visual tokens` + (cost ? `, ${cost.tflops.total.toFixed(2)} TFLOPs` : "");
}

function newConversation(note) {
  conversation.length = 0;
  imageSent = false;
  $("chat").innerHTML = "";
  $("chat-note").textContent = note || "";
  $("status").dataset.state = "idle"; $("status").textContent = "";
}
$("new-chat").addEventListener("click", () => newConversation(""));

function bubble(role, text, image) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  if (image) { const im = document.createElement("img"); im.className = "thumb"; im.src = image; im.alt = "the image sent"; div.appendChild(im); }
  const span = document.createElement("span");
  span.textContent = text;
  div.appendChild(span);
  $("chat").appendChild(div);
  $("chat").scrollTop = $("chat").scrollHeight;
  return span;
}

async function ask() {
  if (busy) return;
  if (!model) { showError("the model list has not loaded yet"); return; }
  const question = $("question").value.trim();
  const attach = imageUrl && !imageSent;  // the image goes with the conversation's first question
  if (!question && !attach) { showError("ask something, or pick an image"); return; }
  const content = [];
  if (attach) content.push({ type:"image_url", image_url:{ url: imageUrl } });
  if (question) content.push({ type:"text", text: question });
  const turn = { role:"user", content };
  const body = { model: model.id, messages: conversation.concat([turn]), stream:true,
                 stream_options:{ include_usage:true },
                 max_tokens: parseInt($("max-tokens").value, 10) || 64,
                 temperature: parseFloat($("temperature").value) || 0 };
  bubble("user", question, attach ? imageUrl : null);
  const answer = bubble("assistant", "");
  const status = $("status");
  window.lastAnswer = ""; showError("");
  status.dataset.state = "streaming"; status.dataset.chunks = "0"; status.textContent = "waiting for the model…";
  $("ask").disabled = true; busy = true;
  let finish = null, usage = null, chunks = 0, text = "";
  try {
    const resp = await fetch("/v1/chat/completions", { method:"POST", headers:{ "Content-Type":"application/json" },
                                                        body: JSON.stringify(body) });
    if (!resp.ok) throw new Error(await errorText(resp));
    const reader = resp.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream:true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut); buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const j = JSON.parse(data);
          if (j.error) throw new Error(j.error.message);
          if (j.usage) usage = j.usage;
          const c = j.choices && j.choices[0];
          if (!c) continue;
          if (c.delta && c.delta.content) {
            text += c.delta.content;
            window.lastAnswer = text;
            answer.textContent = text;
            chunks += 1; status.dataset.chunks = String(chunks);
            status.textContent = "streaming…";
            $("chat").scrollTop = $("chat").scrollHeight;
          }
          if (c.finish_reason) finish = c.finish_reason;
        }
      }
    }
    // the turn and its answer join the history only once answered: a failed turn is not resent
    conversation.push(turn, { role:"assistant", content: text });
    if (attach) imageSent = true;
    $("question").value = "";
    status.dataset.state = "done";
    status.textContent = `done (${finish || "?"})` + (usage ?
      ` · ${usage.prompt_tokens} prompt tokens (visual included) · ${usage.completion_tokens} completion tokens` : "");
  } catch (e) {
    answer.parentElement.remove();
    status.dataset.state = "error";
    status.textContent = "error: " + e.message;
  } finally {
    $("ask").disabled = false; busy = false;
  }
}
$("ask").addEventListener("click", ask);
$("question").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) ask(); });
</script>
</body>
</html>
"""


def render_page(methods: Sequence[str]) -> str:
    """The page with the methods its comparison shows (JSON inside the script; ``<`` escaped so
    that no name can close the script element)."""
    return PAGE.replace("__METHODS__", json.dumps(list(methods)).replace("<", "\\u003c"))
