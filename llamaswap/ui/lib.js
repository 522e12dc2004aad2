// Shared helpers: fetch with the session, stream readers, the /api/events bus, DOM bits.

export const $ = (sel, root = document) => root.querySelector(sel);
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** h('td', {class: 'x', text: 'hi'}, child...) */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'text') el.textContent = v;
    else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) if (c != null && c !== false) el.append(c);
  return el;
}

/** A model id in a URL path: ids may contain '/', so encode each segment. */
export const pathOf = (id) => id.split('/').map(encodeURIComponent).join('/');

/** The login page, coming back to this view afterwards. */
export function toLogin() {
  location.assign('/ui/login.html' + (location.hash ? '?next=' + encodeURIComponent(location.hash) : ''));
}

/** fetch() from this page: the session cookie goes along; a 401 means log in (again). */
export async function api(path, opts = {}) {
  const res = await fetch(path, { ...opts, credentials: 'same-origin' });
  if (res.status === 401) toLogin();
  return res;
}

export class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

/** The message of an OpenAI-shaped error body, or the status line. */
export function errorText(body, res) {
  const e = body && body.error;
  return (e && (e.message || (typeof e === 'string' && e))) || `${res.status} ${res.statusText}`.trim();
}

/** The body of a response as JSON (null if it is not); throws HttpError unless 2xx. */
export async function body(res) {
  let doc = null;
  try { doc = JSON.parse(await res.text()); } catch { /* not JSON */ }
  if (!res.ok) throw new HttpError(res.status, errorText(doc, res));
  return doc;
}

export const json = async (path, opts) => body(await api(path, opts));

/** Replace a <select>'s options when they changed, keeping the choice if it still exists. */
export function fill(select, values, fallback, first = []) {
  const all = [...first, ...values];
  if (all.join('\n') === [...select.options].map((o) => o.value).join('\n')) return;
  const current = select.value || fallback;
  select.replaceChildren(...all.map((v) => h('option', { value: v, text: v || 'all models' })));
  select.value = all.includes(current) ? current : all[0] || '';
}

/** Call onLine for each \n-separated line of a streamed body. */
export async function readLines(res, onLine) {
  const reader = res.body.getReader();
  const dec = new TextDecoder();
  let buf = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      const parts = buf.split('\n');
      buf = parts.pop();
      for (const p of parts) onLine(p.endsWith('\r') ? p.slice(0, -1) : p);
    }
    buf += dec.decode();
    if (buf) onLine(buf);
  } finally {
    reader.cancel().catch(() => {});
  }
}

/** Parse a text/event-stream body: onEvent(type, data). */
export async function readSSE(res, onEvent) {
  let type = '';
  let data = [];
  const dispatch = () => {
    if (data.length) onEvent(type || 'message', data.join('\n'));
    type = '';
    data = [];
  };
  await readLines(res, (line) => {
    if (line === '') return dispatch();
    if (line[0] === ':') return;
    const i = line.indexOf(':');
    const field = i < 0 ? line : line.slice(0, i);
    let val = i < 0 ? '' : line.slice(i + 1);
    if (val[0] === ' ') val = val.slice(1);
    if (field === 'event') type = val;
    else if (field === 'data') data.push(val);
  });
  dispatch();
}

/** The live event bus: /api/events over fetch (its errors are ours to handle). */
const listeners = {};
export const events = {
  state: 'connecting', // connecting | live | polling (no event stream) | offline
  on(type, fn) { (listeners[type] ||= []).push(fn); },
  emit(type, data) {
    for (const fn of listeners[type] || []) {
      try { fn(data); } catch (e) { console.error(e); }
    }
  },
  set(state) {
    if (state !== this.state) { this.state = state; this.emit('status', state); }
  },
  async start() {
    let delay = 1000;
    for (;;) {
      try {
        const res = await api('/api/events', { headers: { Accept: 'text/event-stream' } });
        if ([403, 404, 405].includes(res.status)) return this.set('polling');
        if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
        this.set('live');
        delay = 1000;
        await readSSE(res, (type, data) => {
          let doc;
          try { doc = JSON.parse(data); } catch { return; }
          this.emit(type, doc);
        });
      } catch { /* reconnect below */ }
      this.set('offline');
      await sleep(delay * (0.75 + Math.random() / 2));
      delay = Math.min(delay * 2, 30000);
    }
  },
};

export function toast(message, kind = 'info') {
  const el = h('div', { class: 'toast ' + kind, role: 'status', text: message });
  $('#toasts').append(el);
  setTimeout(() => el.remove(), kind === 'error' ? 9000 : 4000);
  el.addEventListener('click', () => el.remove());
}

export function duration(seconds) {
  if (seconds == null || !isFinite(seconds)) return '';
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 60) return seconds + 's';
  const m = Math.floor(seconds / 60);
  if (m < 60) return `${m}m ${seconds % 60}s`;
  const hr = Math.floor(m / 60);
  return hr < 48 ? `${hr}h ${m % 60}m` : `${Math.floor(hr / 24)}d ${hr % 24}h`;
}

export const num = (x, digits = 0) =>
  x == null || !isFinite(x) ? '' : Number(x).toLocaleString(undefined, { maximumFractionDigits: digits });
