// The server's own OpenAI routes, from the page: the API key (kept in this tab's sessionStorage, sent as a bearer
// token), errors as the server's own message, and chat completions streamed as server-sent events.

const KEY_ITEM = "lmforge.apiKey";

export function apiKey() {
  return sessionStorage.getItem(KEY_ITEM) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_ITEM, key);
  else sessionStorage.removeItem(KEY_ITEM);
}

// An answer that was not a success: the status and the server's message (OpenAI's {"error": {"message"}} shape).
export class ServerError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function errorOf(response) {
  const text = await response.text();
  try {
    const message = JSON.parse(text).error?.message;
    if (message) return new ServerError(response.status, message);
  } catch {
    // not JSON: a proxy's page, say; shown as it came
  }
  return new ServerError(response.status, `HTTP ${response.status} ${response.statusText}: ${text.slice(0, 300)}`);
}

export async function request(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { ...options, headers, body: options.body && JSON.stringify(options.body) });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ServerError(0, `The server could not be reached (${e.message}).`);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function listModels() {
  return (await (await request("/v1/models")).json()).data;
}

// POSTs a streamed chat completion and calls onChunk(chunk) for each event until [DONE]. An error event in the
// stream (the server cutting it) is thrown as a ServerError; an abort through `signal` as the AbortError.
export async function streamChat(body, signal, onChunk) {
  const response = await request("/v1/chat/completions", { method: "POST", body: { ...body, stream: true }, signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ServerError(500, chunk.error.message);
        onChunk(chunk);
      }
    }
  }
}
