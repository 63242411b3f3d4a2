// The page talks to the server's own OpenAI-compatible API: POST /v1/chat/completions with
// stream: true, reading the server-sent events as they arrive. Each chunk's `specllava.pieces`
// are [text, fromAcceptedDraft, step]: draft tokens are shaded by their verification step.
"use strict";

const $ = (id) => document.getElementById(id);
let imageUrl = null;   // the chosen image as a data: URL
let controller = null; // aborts the running request (which cancels its generation)

function setImage(file) {
  if (!file || !file.type.startsWith("image/")) return;
  const reader = new FileReader();
  reader.onload = () => {
    imageUrl = reader.result;
    $("preview").src = imageUrl;
    $("preview").hidden = false;
    $("clear-image").hidden = false;
  };
  reader.readAsDataURL(file);
}

$("image").addEventListener("change", (e) => setImage(e.target.files[0]));
$("clear-image").addEventListener("click", () => {
  imageUrl = null;
  $("image").value = "";
  $("preview").hidden = true;
  $("clear-image").hidden = true;
});
document.addEventListener("paste", (e) => {
  for (const item of e.clipboardData.items) {
    if (item.type.startsWith("image/")) setImage(item.getAsFile());
  }
});
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  setImage(e.dataTransfer.files[0]);
});

function showStats(s) {
  $("tau").textContent = s.mean_accepted_length.toFixed(2);
  $("ntok").textContent = s.completion_tokens;
  $("fwd").textContent = s.target_forwards;
  $("acc").textContent = s.draft_tokens_accepted;
  $("prop").textContent = s.draft_tokens_proposed;
  if (s.tokens_per_second != null) $("tps").textContent = s.tokens_per_second.toFixed(1);
  if (s.time_to_first_token_s != null) $("ttft").textContent = s.time_to_first_token_s.toFixed(2) + " s";
}

function addPieces(pieces) {
  const answer = $("answer");
  for (const [text, drafted, step] of pieces) {
    const span = document.createElement("span");
    span.className = drafted ? `tok draft s${step % 4}` : "tok target";
    span.dataset.step = step;
    span.textContent = text;
    answer.appendChild(span);
  }
}

async function ask() {
  const content = [{ type: "text", text: $("question").value }];
  if (imageUrl) content.push({ type: "image_url", image_url: { url: imageUrl } });
  const body = {
    messages: [{ role: "user", content }],
    max_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value),
    stream: true,
  };
  $("answer").textContent = "";
  $("status").textContent = "waiting…";
  $("status").classList.remove("error");
  for (const id of ["tau", "tps", "ttft"]) $(id).textContent = "–";
  $("send").disabled = true;
  $("stop").disabled = false;
  controller = new AbortController();
  try {
    const headers = { "Content-Type": "application/json" };
    const key = $("api-key").value.trim();
    if (key) headers.Authorization = `Bearer ${key}`;
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers,
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (resp.status === 401) $("key-box").hidden = false;
    if (!resp.ok) {
      const err = await resp.json().catch(() => ({}));
      throw new Error(err.error ? err.error.message : `HTTP ${resp.status}`);
    }
    $("status").textContent = "";
    await readEvents(resp.body.getReader());
  } catch (e) {
    $("status").textContent = e.name === "AbortError" ? "stopped" : e.message;
    $("status").classList.toggle("error", e.name !== "AbortError");
  } finally {
    $("send").disabled = false;
    $("stop").disabled = true;
    controller = null;
  }
}

async function readEvents(reader) {
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
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") { $("answer").dataset.done = "1"; return; }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.specllava && chunk.specllava.pieces) addPieces(chunk.specllava.pieces);
      if (chunk.specllava) showStats(chunk.specllava);
      const choice = chunk.choices && chunk.choices[0];
      if (choice && choice.finish_reason) $("status").textContent = `done (${choice.finish_reason})`;
    }
  }
}

// A server started with --api-key: the page asks for the key (kept in this browser's
// sessionStorage, sent only to this server's API).
$("api-key").value = sessionStorage.getItem("specllava-api-key") || "";
$("api-key").addEventListener("change", () => sessionStorage.setItem("specllava-api-key", $("api-key").value.trim()));

// Never offer more tokens than the server allows (specllava serve --max-tokens).
fetch("/health").then((r) => r.json()).then((h) => {
  if (h.auth) $("key-box").hidden = false;
  const box = $("max-tokens");
  box.max = h.max_tokens;
  if (Number(box.value) > h.max_tokens) box.value = h.max_tokens;
}).catch(() => {});

$("send").addEventListener("click", ask);
$("stop").addEventListener("click", () => controller && controller.abort());
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) ask();
});
