"""The web page served at ``/``: plain HTML and JavaScript, no build step, no external resources.

Pick or drop an image, see the method's plan drawn over it (``POST /v1/plan``: the view boxes
are drawn over the image in the page, and the server's :func:`draw_plan` picture shows the views
as the encoder receives them), ask a question and watch the answer stream in (``POST
/v1/chat/completions`` with ``stream: true``, the same API any client uses).
"""

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
  main { display:grid; grid-template-columns:minmax(320px, 1fr) minmax(320px, 1fr); gap:20px; padding:20px; }
  @media (max-width: 900px) { main { grid-template-columns:1fr; } }
  section { background:#fff; border:1px solid var(--line); border-radius:8px; padding:16px; min-width:0; }
  h2 { font-size:15px; margin:0 0 10px; }
  #drop { border:2px dashed var(--line); border-radius:8px; padding:18px; text-align:center; color:var(--muted); cursor:pointer; }
  #drop.over { border-color:var(--accent); color:var(--accent); background:#f0f4fa; }
  #stage { position:relative; margin-top:12px; display:none; line-height:0; }
  #stage img { width:100%; height:auto; display:block; border-radius:4px; }
  #boxes { position:absolute; inset:0; width:100%; height:100%; pointer-events:none; }
  #boxes text { font:bold 13px system-ui, sans-serif; paint-order:stroke; stroke:#fff; stroke-width:3px; }
  #plan-summary { color:var(--muted); font-size:13px; margin:8px 0; min-height:1em; }
  #overlay { width:100%; height:auto; display:none; border:1px solid var(--line); border-radius:4px; margin-top:8px; }
  textarea { width:100%; min-height:70px; font:inherit; padding:8px; border:1px solid var(--line); border-radius:6px; resize:vertical; }
  .row { display:flex; gap:12px; align-items:center; margin:10px 0; flex-wrap:wrap; }
  .row label { font-size:13px; color:var(--muted); }
  .row input[type=number] { width:80px; font:inherit; padding:3px 6px; }
  button { font:inherit; padding:7px 18px; border-radius:6px; border:0; background:var(--accent); color:#fff; cursor:pointer; }
  button:disabled { opacity:.5; cursor:default; }
  #answer { white-space:pre-wrap; word-break:break-word; min-height:80px; padding:10px; border:1px solid var(--line); border-radius:6px; background:#fcfcfd; }
  #status { font-size:13px; color:var(--muted); margin-top:8px; }
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
    <div id="stage"><img id="preview" alt="the chosen image"><svg id="boxes" preserveAspectRatio="none"></svg></div>
    <div id="plan-summary"></div>
    <img id="overlay" alt="the plan: view boxes over the image and the views as the encoder receives them">
    <div id="error"></div>
  </section>
  <section>
    <h2>Ask</h2>
    <textarea id="question" placeholder="Ask about the image">What is in the image?</textarea>
    <div class="row">
      <label>max tokens <input id="max-tokens" type="number" min="1" value="64"></label>
      <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0"></label>
      <button id="ask">Ask</button>
    </div>
    <div id="answer" aria-live="polite"></div>
    <div id="status" data-state="idle" data-chunks="0"></div>
  </section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const COLOURS = { slice:"#e63946", overview:"#1d3557", base:"#1d3557", tile:"#e63946", local:"#e63946",
  global:"#2a9d8f", thumbnail:"#1d3557", highres:"#e63946", lowres:"#2a9d8f", image:"#e63946" };
let model = null, imageUrl = null;
window.lastAnswer = "";

function showError(msg) { $("error").textContent = msg || ""; }
async function errorText(resp) {
  try { const j = await resp.json(); return (j.error && j.error.message) || JSON.stringify(j); }
  catch (e) { return resp.status + " " + resp.statusText; }
}

fetch("/v1/models").then((r) => r.json()).then((j) => {
  model = j.data[0];
  $("model").textContent = `${model.id} · method ${model.method} · template ${model.chat_template} · context ${model.max_model_len}`;
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

async function setImage(url) {
  imageUrl = url;
  showError("");
  $("preview").src = url;
  $("stage").style.display = "block";
  $("boxes").innerHTML = "";
  $("overlay").style.display = "none";
  $("plan-summary").textContent = "planning…";
  const resp = await fetch("/v1/plan", { method:"POST", headers:{ "Content-Type":"application/json" },
                                         body: JSON.stringify({ image: url }) });
  if (!resp.ok) { $("plan-summary").textContent = ""; showError(await errorText(resp)); return; }
  const j = await resp.json();
  drawPlan(j.plan);
  $("overlay").src = j.overlay;
  $("overlay").style.display = "block";
}

function drawPlan(plan) {
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
                                  `${plan.num_visual_tokens} visual tokens`;
}

async function ask() {
  if (!model) { showError("the model list has not loaded yet"); return; }
  const question = $("question").value.trim();
  if (!question && !imageUrl) { showError("ask something, or pick an image"); return; }
  const content = [];
  if (imageUrl) content.push({ type:"image_url", image_url:{ url: imageUrl } });
  if (question) content.push({ type:"text", text: question });
  const body = { model: model.id, messages:[{ role:"user", content }], stream:true,
                 stream_options:{ include_usage:true },
                 max_tokens: parseInt($("max-tokens").value, 10) || 64,
                 temperature: parseFloat($("temperature").value) || 0 };
  const status = $("status"), answer = $("answer");
  answer.textContent = ""; window.lastAnswer = ""; showError("");
  status.dataset.state = "streaming"; status.dataset.chunks = "0"; status.textContent = "waiting for the model…";
  $("ask").disabled = true;
  let finish = null, usage = null, chunks = 0;
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
            window.lastAnswer += c.delta.content;
            answer.textContent = window.lastAnswer;
            chunks += 1; status.dataset.chunks = String(chunks);
            status.textContent = "streaming…";
          }
          if (c.finish_reason) finish = c.finish_reason;
        }
      }
    }
    status.dataset.state = "done";
    status.textContent = `done (${finish || "?"})` + (usage ?
      ` · ${usage.prompt_tokens} prompt tokens (visual included) · ${usage.completion_tokens} completion tokens` : "");
  } catch (e) {
    status.dataset.state = "error";
    status.textContent = "error: " + e.message;
  } finally {
    $("ask").disabled = false;
  }
}
$("ask").addEventListener("click", ask);
$("question").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) ask(); });
</script>
</body>
</html>
"""
