// The gateway's HTTP API as the page uses it: bearer key from sessionStorage, JSON errors, and server-sent
// events read from a fetch() body (EventSource cannot send an Authorization header, nor POST).

const KEY = 'instgenie.apiKey';

export const apiKey = {
  get: () => sessionStorage.getItem(KEY) || '',
  set: (value) => sessionStorage.setItem(KEY, value),
};

export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code;
    this.param = err.param;
  }
}

function headers(extra) {
  return { Authorization: `Bearer ${apiKey.get()}`, ...(extra || {}) };
}

async function check(resp) {
  if (resp.ok) return resp;
  let body = null;
  try { body = await resp.json(); } catch (_) { /* not JSON: the status says enough */ }
  throw new ApiError(resp.status, body);
}

export async function getJSON(path) {
  return (await check(await fetch(path, { headers: headers() }))).json();
}

export async function postForm(path, form) {
  return (await check(await fetch(path, { method: 'POST', headers: headers(), body: form }))).json();
}

export async function getBlob(path) {
  return (await check(await fetch(path, { headers: headers() }))).blob();
}

// Calls onEvent(type, data) for every server-sent event of the response; resolves when the stream ends.
export async function streamEvents(path, init, onEvent) {
  const resp = await check(await fetch(path, { ...init, headers: headers(init && init.headers) }));
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let type = 'message';
      const data = [];
      for (const line of block.split('\n')) {
        if (line.startsWith('event:')) type = line.slice(6).trim();
        else if (line.startsWith('data:')) data.push(line.slice(5).trim());
      }
      if (data.length) onEvent(type, JSON.parse(data.join('\n')));
    }
  }
}
