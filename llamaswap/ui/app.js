// Entry point: hash routing, connection status, who is logged in.
import { $, events, json } from './lib.js';
import * as models from './models.js';
import * as logs from './logs.js';
import * as activity from './activity.js';
import * as chat from './chat.js';

const views = { models, logs, activity, chat };
let current = null;

function route() {
  const name = location.hash.slice(1);
  const next = name in views ? name : 'models';
  if (next === current) return;
  for (const key of Object.keys(views)) {
    $(`#view-${key}`).hidden = key !== next;
    const tab = $(`[data-testid="tab-${key}"]`);
    if (key === next) tab.setAttribute('aria-current', 'page');
    else tab.removeAttribute('aria-current');
  }
  if (current) views[current].hide();
  current = next;
  document.title = `llamaswap · ${next}`;
  views[next].show();
}

const LABELS = {
  connecting: 'connecting…',
  live: 'live',
  polling: 'polling (no event stream)',
  offline: 'event stream down, retrying',
};
function status(state) {
  const el = $('#conn');
  el.dataset.state = state;
  el.title = LABELS[state] || state;
  $('#conn-text').textContent = LABELS[state] || state;
}

events.on('status', status);
status(events.state);
$('#logout').addEventListener('click', async () => {
  await fetch('/api/logout', { method: 'POST', credentials: 'same-origin' });
  location.assign('/ui/login.html');
});

/** Who this page talks as: the key's name, and what its role leaves out of the UI. */
json('/api/session').then((who) => {
  if (!who.keys) return;
  $('#who').textContent = who.name;
  $('#who').title = `role ${who.role}; models ${who.models.join(', ')}`;
  $('#logout').hidden = false;
  if (who.role !== 'admin') document.body.classList.add('inference-only');
}, () => {});

window.addEventListener('hashchange', route);
route();
if (current !== 'models') models.refresh(); // the model list feeds every tab
events.start();
json('/api/version').then((v) => { $('#version').textContent = v.version ? 'v' + v.version : ''; }, () => {});
