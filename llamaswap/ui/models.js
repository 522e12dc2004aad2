// Models tab: /v1/models merged with /running, live from /api/events, else polled.
import { $, h, api, json, body as parse, events, toast, duration, num, pathOf } from './lib.js';

const rows = new Map(); // id -> {model, state, error, pid, progress, run, saved, at, busy, el, cells}
let list = []; // every /v1/models entry (profiles and peers too)
let visible = false;
let timer = null;
let refreshing = null;

const body = $('#models-body');

export const allIds = () => list.map((m) => m.id);
export const localIds = () => [...rows.keys()];
export const stateOf = (id) => rows.get(id)?.state;

function metaText(meta) {
  const m = meta && meta.llamaswap;
  if (!m || typeof m !== 'object') return '';
  return Object.entries(m).map(([k, v]) => `${k}: ${typeof v === 'object' ? JSON.stringify(v) : v}`).join(' · ');
}

const mib = (bytes) => `${Math.round(bytes / 2 ** 20)} MiB`;
const size = (bytes) => (bytes >= 2 ** 20 ? `${(bytes / 2 ** 20).toFixed(1)} MiB` : `${Math.ceil(bytes / 1024)} KiB`);
const count = (n) => (n >= 1e9 ? `${(n / 1e9).toFixed(1)}B` : `${Math.round(n / 1e6)}M`);

// what the model's GGUF file says (architecture, size, quantization, context)
function ggufText(meta) {
  const g = meta && meta.gguf;
  if (!g || typeof g !== 'object') return '';
  return [g.architecture, g.parameters ? count(g.parameters) + ' params' : null, g.quantization,
    g.context_length ? `ctx ${g.context_length}` : null].filter(Boolean).join(' · ');
}

// the conversations kept on disk for this model (kvCache): restored when it starts again
function savedText(saved, elapsed) {
  if (!saved.length) return '';
  return 'saved: ' + saved.map((s) => `${num(s.tokens)} tokens · ${size(s.bytes)} · ${duration(s.age + elapsed)} ago`).join('; ');
}

// the memory estimate from the file beside what the running child really uses
function memoryText(model, run) {
  const estimate = model.meta?.gguf?.estimate?.total;
  const peak = run?.memory?.peak;
  const used = peak && (peak.vram ?? peak.ram);
  const parts = [];
  if (estimate) parts.push(`memory est. ${mib(estimate)}`);
  if (used) parts.push(`measured ${mib(used)}`);
  return parts.join(' · ');
}

function makeRow(model) {
  const id = model.id;
  const c = {
    state: h('span', { class: 'badge', 'data-testid': `model-state-${id}` }),
    error: h('div', { class: 'err small row-err' }),
    // how far a start got, as the model's server reports it (hidden otherwise)
    progress: h('progress', { class: 'load', max: '100', hidden: true, 'data-testid': `model-progress-${id}` }),
    proc: h('td', { 'data-label': 'Process', class: 'mono nw' }),
    up: h('td', { 'data-label': 'Uptime', class: 'nw' }),
    req: h('td', { 'data-label': 'Requests', class: 'nw' }),
    ttl: h('td', { 'data-label': 'Idle stop', class: 'nw' }),
    load: h('button', { class: 'admin', 'data-testid': `load-${id}`, onclick: () => load(id) }, 'Load'),
    unload: h('button', { class: 'admin', 'data-testid': `unload-${id}`, onclick: () => unload(id) }, 'Unload'),
    memory: h('div', { class: 'small muted mono', 'data-testid': `model-memory-${id}` }),
    saved: h('div', { class: 'small muted', 'data-testid': `model-saved-${id}`, hidden: true }),
  };
  const aliases = (model.aliases || []).map((a) => h('span', { class: 'chip', text: a }));
  const capabilities = (model.capabilities || []).map((a) => h('span', { class: 'chip', text: a }));
  const meta = metaText(model.meta);
  const gguf = ggufText(model.meta);
  const el = h('tr', { 'data-testid': `model-row-${id}` },
    h('td', { class: 'model' },
      h('div', {}, h('strong', { text: id }), model.name && model.name !== id ? h('span', { class: 'muted', text: ' ' + model.name }) : null),
      model.description ? h('div', { class: 'small muted', text: model.description }) : null,
      aliases.length ? h('div', { class: 'chips' }, aliases) : null,
      meta ? h('div', { class: 'small muted mono', text: meta }) : null,
      gguf || capabilities.length ? h('div', { class: 'chips', 'data-testid': `model-gguf-${id}` },
        capabilities, gguf ? h('span', { class: 'small muted mono', text: ' ' + gguf }) : null) : null,
      c.memory, c.saved),
    h('td', { 'data-label': 'State' }, c.state, c.progress, c.error),
    c.proc, c.up, c.req, c.ttl,
    h('td', { class: 'actions' }, c.load, c.unload));
  return { model, el, cells: c, state: 'stopped', error: null, progress: null, run: null, saved: [], at: 0, busy: null };
}

function paint(r) {
  const { cells: c, run } = r;
  const state = r.busy === 'load' && r.state === 'stopped' ? 'starting' : r.state;
  c.state.textContent = state;
  c.state.dataset.state = state;
  const loading = state === 'starting' && r.progress != null;
  c.progress.hidden = !loading;
  if (loading) {
    c.progress.value = Math.round(r.progress * 100);
    c.progress.title = c.progress.textContent = `${Math.round(r.progress * 100)} %`;
  }
  c.error.textContent = r.error || '';
  c.error.hidden = !r.error;
  const pid = run?.pid ?? r.pid;
  const active = state !== 'stopped' && state !== 'failed';
  c.proc.textContent = active && pid ? `pid ${pid}${run?.port ? ' · :' + run.port : ''}` : '';
  const elapsed = (Date.now() - r.at) / 1000;
  c.up.textContent = active && run?.uptime != null ? duration(run.uptime + elapsed) : '';
  c.req.textContent = active && run ? `${run.in_flight ?? 0} running · ${run.queued ?? 0} queued` : '';
  let ttl = '';
  if (active && run && run.ttl) {
    ttl = run.ttl_left != null ? 'in ' + duration(run.in_flight ? run.ttl_left : run.ttl_left - elapsed) : `after ${duration(run.ttl)} idle`;
  }
  c.ttl.textContent = ttl;
  c.load.disabled = !!r.busy || state === 'ready';
  c.load.textContent = r.busy === 'load' ? 'Loading…' : 'Load';
  c.unload.disabled = !!r.busy || !active;
  c.unload.textContent = r.busy === 'unload' ? 'Unloading…' : 'Unload';
  c.memory.textContent = memoryText(r.model, active ? run : null);
  c.memory.hidden = !c.memory.textContent;
  c.saved.textContent = savedText(r.saved, elapsed);
  c.saved.hidden = !c.saved.textContent;
}

function render() {
  const local = [];
  const extra = [];
  for (const m of list) {
    if (m.alias_of) continue;
    if (m.id.includes(':') || (m.owned_by && m.owned_by !== 'llamaswap')) extra.push(m);
    else local.push(m);
  }
  const seen = new Set();
  local.forEach((m, i) => {
    seen.add(m.id);
    let r = rows.get(m.id);
    if (!r) { r = makeRow(m); rows.set(m.id, r); }
    r.model = m;
    if (body.children[i] !== r.el) body.insertBefore(r.el, body.children[i] || null);
  });
  for (const [id, r] of rows) if (!seen.has(id)) { r.el.remove(); rows.delete(id); }
  rows.forEach(paint);
  body.parentElement.classList.toggle('empty', !rows.size);
  const profiles = extra.filter((m) => m.id.includes(':')).map((m) => h('span', { class: 'chip', text: m.id }));
  const peers = extra.filter((m) => !m.id.includes(':')).map((m) => h('span', { class: 'chip', text: m.id }));
  $('#models-extra').replaceChildren(
    profiles.length ? h('p', {}, h('span', { class: 'muted', text: 'Profiles ' }), profiles) : '',
    peers.length ? h('p', {}, h('span', { class: 'muted', text: 'Remote ' }), peers) : '');
}

let again = false;
/** Fetch /v1/models and /running and merge them. */
export function refresh() {
  if (refreshing) {
    again = true; // what is in flight may predate the change that asked for this one
    return refreshing;
  }
  refreshing = (async () => {
    try {
      // a key with role inference may not read /running: its models' states come from /v1/models
      const runningOrNone = json('/running').catch((e) => (e.status === 403 ? { running: [] } : Promise.reject(e)));
      const [models, running] = await Promise.all([json('/v1/models'), runningOrNone]);
      list = models.data || [];
      const byId = Object.fromEntries((running.running || []).map((x) => [x.model, x]));
      const saved = new Map();
      for (const s of running.saved_states || []) saved.set(s.model, [...(saved.get(s.model) || []), s]);
      const now = Date.now();
      render();
      for (const [id, r] of rows) {
        const run = byId[id] || null;
        const status = r.model.status || {};
        Object.assign(r, { run, saved: saved.get(id) || [], at: now, state: run ? run.state : status.value || 'stopped', progress: run ? run.progress : null });
        if (!r.busy) r.error = status.error || null;
        paint(r);
      }
      $('#models-error').hidden = true;
      events.emit('models', list);
    } catch (e) {
      $('#models-error').textContent = `Cannot reach llamaswap: ${e.message}`;
      $('#models-error').hidden = false;
    } finally {
      refreshing = null;
      if (again) { again = false; refresh(); }
    }
  })();
  return refreshing;
}

let soon = null;
function refreshSoon() {
  clearTimeout(soon);
  soon = setTimeout(refresh, 150);
}

async function act(id, kind, path) {
  const r = rows.get(id);
  if (!r || r.busy) return;
  r.busy = kind;
  r.error = null;
  paint(r);
  try {
    const doc = await parse(await api(path, { method: 'POST' }));
    if (doc && doc.state) r.state = doc.state;
    else if (kind === 'unload') r.state = 'stopped';
  } catch (e) {
    r.error = e.message;
    toast(`${kind === 'load' ? 'Load' : 'Unload'} ${id}: ${short(e.message)}`, 'error');
  } finally {
    r.busy = null;
    const error = r.error;
    paint(r);
    await refresh();
    if (error) { r.error = error; paint(r); }
  }
}

// the first line of a start error, without the child's last output (the row shows it all)
const short = (m) => { const s = m.split(/; last output:|\n/)[0]; return s.length > 200 ? s.slice(0, 200) + '…' : s; };

const load = (id) => act(id, 'load', '/api/models/load/' + pathOf(id));
const unload = (id) => act(id, 'unload', '/api/models/unload/' + pathOf(id));

$('#unload-all').addEventListener('click', async (ev) => {
  ev.target.disabled = true;
  try {
    await json('/api/models/unload', { method: 'POST' });
    toast('Every model is stopped.');
  } catch (e) {
    toast('Unload all: ' + e.message, 'error');
  } finally {
    ev.target.disabled = false;
    refresh();
  }
});
$('#models-refresh').addEventListener('click', () => refresh());

events.on('model', (ev) => {
  const r = rows.get(ev.id);
  if (!r) return;
  r.state = ev.state || r.state;
  if (ev.pid !== undefined) r.pid = ev.pid;
  if (ev.error !== undefined && !r.busy) r.error = ev.error || null;
  if (r.state === 'stopped' || r.state === 'failed') r.run = null;
  if (r.state !== 'starting') r.progress = null;
  paint(r);
  refreshSoon(); // port, uptime, ttl
});
events.on('progress', (ev) => {
  const r = rows.get(ev.id);
  if (!r) return;
  r.progress = ev.progress;
  paint(r);
});
events.on('queue', (ev) => {
  const r = rows.get(ev.model);
  if (!r || !r.run) return;
  r.run.in_flight = ev.in_flight;
  r.run.queued = ev.queued;
  paint(r);
});
events.on('status', (state) => { if (state === 'live') refresh(); });

// Without the event stream (or while it is down), poll /running every 2 s;
// with it, tick the clocks each second and resync every 30 s.
let ticks = 0;
function tick() {
  ticks++;
  if (!visible) return;
  if (events.state !== 'live' && ticks % 2 === 0) refresh();
  else if (ticks % 30 === 0) refresh();
  else rows.forEach(paint);
}

export function show() {
  visible = true;
  refresh();
  timer ||= setInterval(tick, 1000);
}
export function hide() { visible = false; }
