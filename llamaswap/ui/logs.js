// Logs tab: /logs/stream[/<source>] read as a text stream, history first.
import { $, h, api, readLines, sleep, fill, events, pathOf } from './lib.js';

const MAX = 5000;
const view = $('#log-view');
const source = $('#log-source');
const follow = $('#log-follow');
const pauseBtn = $('#log-pause');
const filter = $('#log-filter');
const status = $('#log-status');

let ctl = null;
let paused = false;
let held = []; // lines received while paused
let pending = []; // lines waiting for the next frame
let scheduled = false;
let needle = '';

function kind(line) {
  if (/\b(error|fail(ed|ure)?|GGML_ASSERT|traceback|exit(ed)? with)\b/i.test(line)) return 'line err';
  if (/\bwarn(ing)?\b/i.test(line)) return 'line warn';
  return 'line';
}

function flush() {
  scheduled = false;
  if (!pending.length) return;
  const lines = pending.length > MAX ? pending.slice(-MAX) : pending;
  pending = [];
  const frag = document.createDocumentFragment();
  for (const line of lines) {
    const el = h('div', { class: kind(line), text: line });
    if (needle && !line.toLowerCase().includes(needle)) el.hidden = true;
    frag.append(el);
  }
  view.append(frag);
  let extra = view.childElementCount - MAX;
  while (extra-- > 0) view.firstElementChild.remove();
  if (follow.checked) view.scrollTop = view.scrollHeight;
}

function add(line) {
  if (paused) {
    held.push(line);
    if (held.length > MAX) held.shift();
    pauseBtn.textContent = `Resume (${held.length} new)`;
    return;
  }
  pending.push(line);
  if (!scheduled) {
    scheduled = true;
    // a hidden tab gets no animation frames; the timeout keeps the DOM current anyway
    requestAnimationFrame(flush);
    setTimeout(flush, 250);
  }
}

async function connect() {
  ctl?.abort();
  const c = (ctl = new AbortController());
  const src = source.value;
  const path = src === 'all' ? '/logs/stream' : '/logs/stream/' + pathOf(src);
  let first = true;
  let delay = 1000;
  while (ctl === c) {
    status.textContent = 'connecting…';
    try {
      // after a reconnect only new lines: the history is already on screen
      const res = await api(first ? path : path + '?no-history', { signal: c.signal });
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      if (!first) add('── reconnected ──');
      first = false;
      delay = 1000;
      status.textContent = 'live';
      await readLines(res, (line) => ctl === c && add(line));
    } catch (e) {
      if (c.signal.aborted) return;
      status.textContent = `disconnected (${e.message}), retrying…`;
    }
    if (ctl !== c) return;
    await sleep(delay);
    delay = Math.min(delay * 2, 15000);
  }
}

function clear() {
  view.replaceChildren();
  pending = [];
  held = [];
  if (paused) pauseBtn.textContent = 'Resume (0 new)';
}

function setPaused(on) {
  paused = on;
  pauseBtn.setAttribute('aria-pressed', on);
  pauseBtn.textContent = on ? 'Resume (0 new)' : 'Pause';
  if (!on) {
    const lines = held;
    held = [];
    lines.forEach(add);
  }
}

source.addEventListener('change', () => { clear(); connect(); });
pauseBtn.addEventListener('click', () => setPaused(!paused));
$('#log-clear').addEventListener('click', clear);
follow.addEventListener('change', () => { if (follow.checked) view.scrollTop = view.scrollHeight; });
view.addEventListener('scroll', () => {
  // scrolling up stops following; scrolling back to the end resumes it
  follow.checked = view.scrollHeight - view.scrollTop - view.clientHeight < 40;
});
filter.addEventListener('input', () => {
  needle = filter.value.trim().toLowerCase();
  for (const el of view.children) el.hidden = !!needle && !el.textContent.toLowerCase().includes(needle);
  if (follow.checked) view.scrollTop = view.scrollHeight;
});

// keep the source list in step with the configured models
events.on('models', (list) => {
  const local = list.filter((m) => !m.alias_of && !m.id.includes(':') && (!m.owned_by || m.owned_by === 'llamaswap'));
  fill(source, local.map((m) => m.id), 'all', ['all', 'proxy', 'upstream']);
});

export function show() {
  if (!ctl) connect();
  if (follow.checked) requestAnimationFrame(() => { view.scrollTop = view.scrollHeight; });
}
export function hide() {}
