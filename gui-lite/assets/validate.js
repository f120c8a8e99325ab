// Inline form validation: each rule reads one control, and a bad value says why in the
// field's error paragraph (its id is the control's id + "-error") and sets aria-invalid, so
// screen readers hear the reason with the field.

import { byId, setText } from './dom.js';

// Parsers: (text, input) -> { value } or { error }.
export function integer(min, max) {
  return (text, input) => {
    if (input?.validity?.badInput) return { error: 'Not a number.' };
    if (text.trim() === '') return { error: 'Required.' };
    const n = Number(text);
    if (!Number.isInteger(n)) return { error: `A whole number is needed, not ${text}.` };
    if (n < min || n > max) return { error: max >= 2 ** 31 ? `Must be at least ${min}.` : `Must be from ${min} to ${max}; ${n} is outside.` };
    return { value: n };
  };
}

// A finite number; `above` is exclusive, `max` inclusive.
export function decimal({ above = -Infinity, max = Infinity }) {
  return (text, input) => {
    if (input?.validity?.badInput) return { error: 'Not a number.' };
    if (text.trim() === '') return { error: 'Required.' };
    const n = Number(text);
    if (!Number.isFinite(n)) return { error: `${text} is not a number.` };
    if (n <= above) return { error: `Must be above ${above}.` };
    if (n > max) return { error: `Must be at most ${max}.` };
    return { value: n };
  };
}

// Empty is allowed and gives null; otherwise as integer(min, max).
export function optionalInteger(min, max) {
  const inner = integer(min, max);
  return (text, input) => (text.trim() === '' && !input?.validity?.badInput ? { value: null } : inner(text, input));
}

// Non-empty text of at most `maxBytes` UTF-8 bytes.
export function text(maxBytes) {
  return (value) => {
    const trimmed = value.trim();
    if (trimmed === '') return { error: 'Required.' };
    const bytes = new TextEncoder().encode(trimmed).length;
    if (bytes > maxBytes) return { error: `At most ${maxBytes} bytes; this is ${bytes}.` };
    return { value: trimmed };
  };
}

// Shows or clears a control's error. `control` is an input, select, textarea or fieldset.
export function showError(control, message) {
  const out = byId(`${control.id}-error`);
  if (out) setText(out, message ?? '');
  if (message) control.setAttribute('aria-invalid', 'true');
  else control.removeAttribute('aria-invalid');
}

// Checks every rule ({ id, key, parse, check?(value, values) -> error or null }) and returns
// { values, invalid: [control, ...] }. Rules are checked in order, so `check` sees the values
// of the rules before it.
export function checkAll(rules) {
  const values = {};
  const invalid = [];
  for (const rule of rules) {
    const input = byId(rule.id);
    const result = rule.parse(input.value, input);
    let error = result.error ?? null;
    if (!error && rule.check) error = rule.check(result.value, values);
    showError(input, error);
    if (error) invalid.push(input);
    else values[rule.key] = result.value;
  }
  return { values, invalid };
}

// Re-checks the fields as they are typed in (after a short pause) and when they change, so a
// bad value says why before anyone reaches for the button. `recheck` runs every rule, to catch
// fields that depend on each other. On a change the check waits a moment too: a change fires
// when the field loses focus, often on the press of the Start button itself, and a message
// appearing then would move the button from under the pointer before the press ends.
export function liveCheck(rules, recheck, pauseMs = 400, changeMs = 250) {
  let timer = null;
  const later = (ms) => {
    clearTimeout(timer);
    timer = setTimeout(recheck, ms);
  };
  for (const rule of rules) {
    const input = byId(rule.id);
    input.addEventListener('input', () => later(pauseMs));
    input.addEventListener('change', () => later(changeMs));
  }
}

// The names of the invalid controls, for an error summary: "Rank, Learning rate".
export function labelsOf(controls) {
  return controls
    .map((c) => (c.tagName === 'FIELDSET' ? c.querySelector('legend') : document.querySelector(`label[for="${c.id}"]`))?.textContent.trim() ?? c.id)
    .join(', ');
}

// A peer id: 64 hexadecimal digits (an ed25519 public key).
export function peerIdError(text) {
  const t = text.trim();
  if (t === '') return 'Required.';
  if (!/^[0-9a-fA-F]{64}$/.test(t)) return `A peer id is 64 hexadecimal digits; this is ${t.length} characters${/[^0-9a-fA-F]/.test(t) ? ' with others than 0-9 and a-f' : ''}.`;
  return null;
}
