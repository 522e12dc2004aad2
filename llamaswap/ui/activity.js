// Activity tab: /api/activity pages, /api/activity/stats, new rows live from /api/events.
import { $, h, api, json, body, fill, events, num } from './lib.js';

const LIMIT = 50;
const tbody = $('#activity-body');
const pick = $('#act-model');
let offset = 0;
let total = 0;
let available = true;
let visible = false;
let statsTimer = null;

function when(t) {
  const d = new Date(t * 1000);
  const today = d.toDateString() === new Date().toDateString();
  return today ? d.toLocaleTimeString() : d.toLocaleString();
}

const ms = (x) => (x == null ? '' : x >= 10000 ? num(x / 1000, 1) + ' s' : num(x) + ' ms');

function row(a) {
  const code = a.status || 0;
  const cls = code >= 500 || a.error ? 'err' : code >= 400 ? 'warn' : 'ok';
  const tps = [a.prompt_tps, a.gen_tps].map((x) => (x == null ? '–' : num(x, 1))).join(' / ');
  return h('tr', { 'data-id': a.id },
    h('td', { 'data-label': 'Time', text: when(a.time), title: new Date(a.time * 1000).toISOString() }),
    h('td', { 'data-label': 'Model', text: a.model || '' }),
    h('td', { 'data-label': 'Path', class: 'mono', text: a.path || '' }),
    h('td', { 'data-label': 'Status' }, h('span', { class: 'code ' + cls, text: code || '–' })),
    h('td', { 'data-label': 'Duration', class: 'num', text: ms(a.duration_ms) }),
    h('td', { 'data-label': 'Queue', class: 'num', text: ms(a.queue_ms) }),
    h('td', { 'data-label': 'Load', class: 'num', text: ms(a.load_ms) }),
    h('td', { 'data-label': 'Tokens in/out', class: 'num', text: `${num(a.tokens_in) || '–'} / ${num(a.tokens_out) || '–'}` }),
    h('td', { 'data-label': 'From cache', class: 'num', title: 'prompt tokens the server did not evaluate again (timings.cache_n)', text: a.cache_n == null ? '–' : num(a.cache_n) }),
    h('td', { 'data-label': 'tok/s prompt/gen', class: 'num', text: tps }),
    h('td', { 'data-label': 'Error', class: 'err small', text: a.error || '', title: a.error || null }));
}

function range() {
  $('#act-range').textContent = total ? `${offset + 1}–${Math.min(offset + LIMIT, total)} of ${total}` : 'no requests yet';
  $('#act-prev').disabled = offset === 0;
  $('#act-next').disabled = offset + LIMIT >= total;
}

function unavailable() {
  available = false;
  $('#act-na').hidden = false;
  $('#act-main').hidden = true;
}

async function loadPage() {
  const q = new URLSearchParams({ limit: LIMIT, offset });
  if (pick.value) q.set('model', pick.value);
  try {
    const res = await api('/api/activity?' + q);
    if (res.status === 404 && !pick.value) return unavailable();
    const doc = await body(res);
    total = doc.total ?? (doc.data || []).length;
    tbody.replaceChildren(...(doc.data || []).map(row));
    range();
  } catch (e) {
    $('#act-range').textContent = 'cannot load: ' + e.message;
  }
}

function stat(name, value) {
  return h('div', {}, h('span', { class: 'muted small', text: name }), h('b', { text: value }));
}

const pct = (o, f = ms) => (o && o.p50 != null ? `${f(o.p50)} · ${f(o.p95)} · ${f(o.p99)}` : '–');
const rate = (x) => (x == null ? '–' : num(x, 1));

async function loadStats() {
  try {
    const doc = await json('/api/activity/stats');
    const cards = Object.entries(doc.models || {}).map(([id, s]) =>
      h('article', { class: 'card' },
        h('h3', { text: id }),
        stat('requests', num(s.requests) + (s.errors ? ` (${num(s.errors)} failed)` : '')),
        stat('tokens in / out', `${num(s.tokens_in)} / ${num(s.tokens_out)}`),
        stat('latency p50 · p95 · p99', pct(s.latency_ms)),
        stat('gen tok/s p50 · p95 · p99', pct(s.gen_tps, rate)),
        stat('prompt tok/s p50 · p95 · p99', pct(s.prompt_tps, rate))));
    $('#act-stats').replaceChildren(...cards);
  } catch (e) {
    if (e.status === 404) return;
    $('#act-stats').replaceChildren(h('p', { class: 'muted', text: 'Stats: ' + e.message }));
  }
}

function statsSoon() {
  if (!statsTimer) statsTimer = setTimeout(() => { statsTimer = null; if (visible) loadStats(); }, 3000);
}

events.on('activity', (a) => {
  if (!available) return;
  if (pick.value && a.model !== pick.value) return;
  total++;
  if (offset === 0) {
    tbody.prepend(row(a));
    while (tbody.childElementCount > LIMIT) tbody.lastElementChild.remove();
  }
  range();
  statsSoon();
});

// local models only: the server resolves ?model= like a request (no profiles, no peers)
const local = (m) => !m.alias_of && !m.id.includes(':') && (!m.owned_by || m.owned_by === 'llamaswap');
events.on('models', (list) => fill(pick, list.filter(local).map((m) => m.id), '', ['']));

pick.addEventListener('change', () => { offset = 0; loadPage(); });
$('#act-prev').addEventListener('click', () => { offset = Math.max(0, offset - LIMIT); loadPage(); });
$('#act-next').addEventListener('click', () => { offset += LIMIT; loadPage(); });
$('#act-refresh').addEventListener('click', () => { loadPage(); loadStats(); });

// without the event stream, the first page is polled instead
setInterval(() => {
  if (visible && available && offset === 0 && events.state !== 'live') loadPage();
}, 5000);

export async function show() {
  visible = true;
  if (!available) return;
  await loadPage();
  if (available) loadStats();
}
export function hide() { visible = false; }
