// The API token form: shown when a change needs the token (api.js raises `cohort:token-needed`)
// or when someone asks to change it; keeps what is pasted and gives focus back afterwards.

import { getToken, setToken } from './api.js';
import { byId, setText } from './dom.js';

const form = byId('token-form');
const input = byId('token-input');
const why = byId('token-why');
const status = byId('token-status');
let returnFocus = null;
let savedTimer;

export function showTokenForm(message) {
  setText(why, message);
  setText(status, '');
  if (form.hidden) returnFocus = document.activeElement;
  form.hidden = false;
  input.value = '';
  input.focus();
}

function hide() {
  form.hidden = true;
  if (returnFocus instanceof HTMLElement && document.contains(returnFocus)) returnFocus.focus();
  returnFocus = null;
}

form.addEventListener('submit', (event) => {
  event.preventDefault();
  const token = input.value.trim();
  if (!token) {
    setText(status, 'Paste the token first: the node keeps it in its data directory as api.token.');
    input.focus();
    return;
  }
  setToken(token);
  hide();
  // Announced from outside the (now hidden) form, for a while.
  setText(byId('token-saved'), 'Token saved. Try the change again.');
  clearTimeout(savedTimer);
  savedTimer = setTimeout(() => setText(byId('token-saved'), ''), 8000);
});

byId('token-cancel').addEventListener('click', hide);
form.addEventListener('keydown', (event) => {
  if (event.key === 'Escape') hide();
});

window.addEventListener('cohort:token-needed', (event) => showTokenForm(event.detail?.message ?? ''));

export function hasToken() {
  return getToken() !== '';
}
