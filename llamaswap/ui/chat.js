// Chat playground: streamed /v1/chat/completions, the conversation kept in the page.
import { $, h, api, readSSE, body, fill, events, num } from './lib.js';
import { stateOf } from './models.js';

const LAST = 'llamaswap.chatModel';
const pick = $('#chat-model');
const log = $('#chat-log');
const input = $('#chat-input');
const send = $('#chat-send');
const history = []; // {role, content}
let ctl = null;

const scroll = () => { log.scrollTop = log.scrollHeight; };

function bubble(role, text) {
  const el = h('div', { class: 'msg ' + role }, h('div', { class: 'who', text: role === 'user' ? 'You' : pick.value }));
  const content = h('div', { class: 'content', text });
  el.append(content);
  log.append(el);
  $('#chat-empty').hidden = true;
  scroll();
  return { el, content };
}

function assistant() {
  log.querySelector('[data-testid="chat-answer"]')?.removeAttribute('data-testid');
  const m = bubble('assistant', '');
  m.content.dataset.testid = 'chat-answer';
  m.content.classList.add('pending');
  m.think = h('pre');
  m.details = h('details', { class: 'reasoning', open: true, hidden: true }, h('summary', { text: 'Reasoning / loading' }), m.think);
  m.info = h('div', { class: 'small muted' });
  m.content.before(m.details);
  m.el.append(m.info);
  return m;
}

function busy(on) {
  send.textContent = on ? 'Stop' : 'Send';
  send.classList.toggle('danger', on);
  send.classList.toggle('primary', !on);
}

async function ask(text) {
  const model = pick.value;
  if (!model) return;
  localStorage.setItem(LAST, model);
  history.push({ role: 'user', content: text });
  bubble('user', text);
  const m = assistant();
  const c = (ctl = new AbortController());
  busy(true);
  let answer = '';
  let reasoning = '';
  const started = performance.now();
  let first = 0;
  try {
    const res = await api('/v1/chat/completions', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream' },
      body: JSON.stringify({ model, messages: history, stream: true }),
      signal: c.signal,
    });
    if (!res.ok) await body(res); // throws the server's message
    let usage = null;
    let timings = null;
    await readSSE(res, (_type, data) => {
      if (data === '[DONE]') return;
      let doc;
      try { doc = JSON.parse(data); } catch { return; }
      if (doc.error) throw new Error(doc.error.message || JSON.stringify(doc.error));
      const delta = doc.choices?.[0]?.delta || {};
      if (delta.reasoning_content) {
        reasoning += delta.reasoning_content;
        m.think.textContent = reasoning;
        m.details.hidden = false;
      }
      if (delta.content) {
        if (!first) first = performance.now();
        answer += delta.content;
        m.content.textContent = answer;
      }
      usage = doc.usage || usage;
      timings = doc.timings || timings;
      scroll();
    });
    const secs = ((performance.now() - started) / 1000).toFixed(1);
    const parts = [`${secs} s`];
    if (first) parts.push(`first token after ${((first - started) / 1000).toFixed(1)} s`);
    if (usage) parts.push(`${usage.prompt_tokens} → ${usage.completion_tokens} tokens`);
    if (timings?.predicted_per_second) parts.push(`${num(timings.predicted_per_second, 1)} tok/s`);
    m.info.textContent = parts.join(' · ');
    history.push({ role: 'assistant', content: answer });
  } catch (e) {
    if (c.signal.aborted) {
      m.info.textContent = 'stopped';
      if (answer) history.push({ role: 'assistant', content: answer });
      else history.pop();
    } else {
      m.el.append(h('div', { class: 'err', text: e.message }));
      history.pop(); // leave the question out, so it can be sent again
      if (!input.value) input.value = text;
    }
  } finally {
    m.content.classList.remove('pending');
    if (!answer) m.content.hidden = !!m.el.querySelector('.err') || !!m.info.textContent;
    if (ctl === c) ctl = null;
    busy(false);
    scroll();
  }
}

$('#chat-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  if (ctl) return ctl.abort();
  const text = input.value.trim();
  if (!text) return;
  input.value = '';
  ask(text);
});
input.addEventListener('keydown', (ev) => {
  if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    $('#chat-form').requestSubmit();
  }
});
$('#chat-new').addEventListener('click', () => {
  ctl?.abort();
  history.length = 0;
  log.querySelectorAll('.msg').forEach((el) => el.remove());
  $('#chat-empty').hidden = false;
  input.focus();
});

events.on('models', (list) => {
  const ids = list.filter((m) => !m.alias_of).map((m) => m.id);
  fill(pick, ids, localStorage.getItem(LAST) || ids.find((id) => stateOf(id) === 'ready'));
});

export function show() { input.focus(); }
export function hide() {}
