// Login page: trade an API key for a session cookie (HttpOnly: no script reads it).
const form = document.getElementById('login-form');
const error = document.getElementById('login-error');

/** Where to go afterwards: a view of the UI (only a '#hash', never another URL). */
function next() {
  const hash = new URLSearchParams(location.search).get('next') || '';
  return '/ui/' + (/^#[a-z]+$/.test(hash) ? hash : '');
}

form.addEventListener('submit', async (ev) => {
  ev.preventDefault();
  error.hidden = true;
  const key = document.getElementById('login-key').value.trim();
  let message = null;
  try {
    const res = await fetch('/api/login', {
      method: 'POST',
      credentials: 'same-origin',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ key }),
    });
    if (res.ok) return location.assign(next());
    const doc = await res.json().catch(() => null);
    message = (doc && doc.error && doc.error.message) || `${res.status} ${res.statusText}`;
  } catch (e) {
    message = `Cannot reach llamaswap: ${e.message}`;
  }
  error.textContent = message;
  error.hidden = false;
});
