// The chat playground: a conversation streamed from /v1/chat/completions with the settings on the left.
import { ServerError, listModels, setApiKey, streamChat } from "./api.js";

const $ = (id) => document.getElementById(id);
const turns = []; // the conversation sent with each request: {role, content}
let controller = null; // aborts the reply being streamed

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function handleFailure(error) {
  showError(error.message);
  if (error.status === 401) {
    $("key-form").hidden = false;
    $("api-key").focus();
  }
}

async function loadModels() {
  try {
    const models = await listModels();
    const select = $("model");
    const chosen = select.value;
    select.replaceChildren(...models.map((m) => {
      const label = m.parent ? `${m.id} (LoRA adapter on ${m.parent})` : m.id;
      return new Option(label, m.id, false, m.id === chosen);
    }));
    $("key-form").hidden = true;
    showError("");
  } catch (e) {
    handleFailure(e);
  }
}

function addMessage(role, text, model) {
  $("empty").hidden = true;
  const item = document.createElement("li");
  item.className = `message ${role}`;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role === "user" ? "You" : model;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  item.append(who, content);
  $("messages").append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

// The model's thinking (a server run with --reasoning-parser sends it as reasoning_content), folded above the reply.
function thinking(item) {
  let box = item.querySelector(".reasoning");
  if (!box) {
    const details = document.createElement("details");
    details.className = "thinking";
    details.open = true;
    const summary = document.createElement("summary");
    summary.textContent = "Thinking";
    box = document.createElement("div");
    box.className = "reasoning";
    details.append(summary, box);
    item.querySelector(".content").before(details);
  }
  return box;
}

function numberField(id, integer) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const value = Number(raw);
  if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    throw new ServerError(400, `${$(id).parentElement.firstChild.textContent.trim()} must be a number, got "${raw}".`);
  }
  return value;
}

function responseFormat() {
  const kind = $("format").value;
  if (kind === "text") return undefined;
  if (kind === "json_object") return { type: "json_object" };
  let schema;
  try {
    schema = JSON.parse($("schema").value);
  } catch (e) {
    throw new ServerError(400, `The JSON schema is not valid JSON: ${e.message}`);
  }
  return { type: "json_schema", json_schema: { name: "playground", schema } };
}

function requestBody() {
  const system = $("system").value.trim();
  const stop = $("stop").value.split("\n").filter((s) => s !== "");
  const body = {
    model: $("model").value || undefined,
    messages: [...(system ? [{ role: "system", content: system }] : []), ...turns],
    temperature: numberField("temperature"),
    top_p: numberField("top-p"),
    max_tokens: numberField("max-tokens", true),
    seed: numberField("seed", true),
    stop: stop.length ? stop : undefined,
    response_format: responseFormat(),
    stream_options: { include_usage: true },
  };
  return JSON.parse(JSON.stringify(body)); // drops the fields left undefined: the server's defaults apply
}

function statsText(usage, started, first, ended, finish) {
  const parts = [];
  if (usage) parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`);
  if (first !== null) parts.push(`first token ${((first - started) / 1000).toFixed(2)} s`);
  if (usage && first !== null && usage.completion_tokens > 1 && ended > first) {
    parts.push(`${((usage.completion_tokens - 1) / ((ended - first) / 1000)).toFixed(1)} tokens/s`);
  }
  if (finish) parts.push(`finish: ${finish}`);
  return parts.join(" · ");
}

function lastIsReply() {
  return $("messages").lastElementChild?.classList.contains("assistant") ?? false;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop-button").disabled = !busy;
  $("regenerate").disabled = busy || !lastIsReply();
}

async function generate() {
  showError("");
  const item = addMessage("assistant", "", $("model").value);
  const content = item.querySelector(".content");
  const stats = document.createElement("div");
  stats.className = "stats";
  item.append(stats);
  item.dataset.state = "streaming";
  item.setAttribute("aria-busy", "true"); // screen readers read the reply once it is complete, not token by token
  controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let first = null;
  let usage = null;
  let finish = null;
  try {
    const body = requestBody(); // a setting the page cannot send fails here, as the server's refusals do below
    await streamChat(body, controller.signal, (chunk) => {
      item.querySelector(".who").textContent = chunk.model; // the model that answered, as the server names it
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices?.[0];
      if (!choice) return;
      if (choice.delta?.reasoning_content) {
        if (first === null) first = performance.now();
        thinking(item).textContent += choice.delta.reasoning_content;
      }
      if (choice.delta?.content) {
        if (first === null) first = performance.now();
        content.textContent += choice.delta.content;
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    });
    item.dataset.state = "done";
  } catch (e) {
    if (e.name === "AbortError") {
      item.dataset.state = "stopped";
      finish = "stopped";
    } else {
      item.dataset.state = "error";
      content.textContent = e.message;
      handleFailure(e);
    }
  }
  item.removeAttribute("aria-busy");
  stats.textContent = statsText(usage, started, first, performance.now(), finish);
  // A reply cleared away while it streamed, an error or an empty stop is not part of the conversation.
  // The thinking is not sent back: chat templates of reasoning models drop it from earlier turns anyway.
  if (item.isConnected && item.dataset.state !== "error" && content.textContent) {
    turns.push({ role: "assistant", content: content.textContent });
  }
  controller = null;
  setBusy(false);
}

function send(event) {
  event.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || controller) return;
  turns.push({ role: "user", content: text });
  addMessage("user", text);
  $("prompt").value = "";
  generate();
}

// The last reply again (after a stop or an error too): it is dropped from the conversation and asked for anew.
function regenerate() {
  if (controller || !lastIsReply()) return;
  if (turns.at(-1)?.role === "assistant") turns.pop();
  $("messages").lastElementChild.remove();
  generate();
}

function clear() {
  controller?.abort();
  turns.length = 0;
  $("messages").replaceChildren();
  $("empty").hidden = false;
  setBusy(false);
}

$("composer").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) send(e);
});
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && controller) controller.abort();
});
$("stop-button").addEventListener("click", () => controller?.abort());
$("regenerate").addEventListener("click", regenerate);
$("clear").addEventListener("click", clear);
$("format").addEventListener("change", () => {
  $("schema-label").hidden = $("format").value !== "json_schema";
});
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  setApiKey($("api-key").value.trim());
  $("api-key").value = "";
  loadModels();
});
if (matchMedia("(max-width: 720px)").matches) $("settings").open = false; // the chat first on a phone
loadModels();
