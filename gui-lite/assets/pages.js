// What each page shows. The Network page reads GET /api/status; every other page reads the
// endpoint named in its section's data-endpoint and shows a table when that answers with a JSON
// list, or says plainly that the node does not offer the feature yet.

import { describeFailure, getJson } from './api.js';
import { el, jsonTable } from './dom.js';

const byId = (id) => document.getElementById(id);

// 93784 -> "1 d 2 h 3 min 4 s"; leading zero units are left out.
export function formatUptime(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return 'unknown';
  let rest = Math.floor(seconds);
  const parts = [];
  for (const [unit, size] of [['d', 86400], ['h', 3600], ['min', 60]]) {
    const count = Math.floor(rest / size);
    rest -= count * size;
    if (count > 0 || parts.length > 0) parts.push(`${count} ${unit}`);
  }
  parts.push(`${rest} s`);
  return parts.join(' ');
}

// Replaces an element's content only when the text changes, so that live regions are not
// re-announced on every refresh.
function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

let statusRequest = 0;

export async function loadStatus() {
  const request = ++statusRequest;
  const facts = byId('status');
  facts.setAttribute('aria-busy', 'true');
  const result = await getJson('/api/status');
  if (request !== statusRequest) return; // a newer request is on its way
  facts.setAttribute('aria-busy', 'false');

  const status = result.kind === 'ok' && result.data !== null && typeof result.data === 'object' ? result.data : null;
  const alert = byId('status-error');
  const text = (value) => (typeof value === 'string' && value !== '' ? value : 'unknown');
  if (status) {
    setText(alert, '');
  } else {
    const failure = result.kind === 'ok' ? 'HTTP 200, but the JSON is not an object' : describeFailure(result);
    setText(alert, `The node's API is unreachable (GET /api/status: ${failure}).`);
  }
  setText(byId('status-peer-id'), text(status?.peer_id));
  setText(byId('status-version'), text(status?.version));
  setText(byId('status-data-dir'), text(status?.data_dir));
  setText(byId('status-uptime'), status ? formatUptime(status.uptime_s) : 'unknown');
  byId('copy-peer-id').disabled = typeof status?.peer_id !== 'string';
}

let copyTimer;

export async function copyPeerId() {
  const code = byId('status-peer-id');
  const result = byId('copy-result');
  try {
    await navigator.clipboard.writeText(code.textContent);
    result.textContent = 'Copied.';
  } catch {
    // The clipboard API is missing outside secure contexts (plain http on a LAN address):
    // select the text so the usual shortcut copies it.
    const range = document.createRange();
    range.selectNodeContents(code);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    result.textContent = 'Selected: press Ctrl+C (or ⌘C) to copy.';
  }
  clearTimeout(copyTimer);
  copyTimer = setTimeout(() => {
    result.textContent = '';
  }, 4000);
}

// The list inside a JSON answer: a bare array, or OpenAI's {"object": "list", "data": [...]}.
function listOf(data) {
  if (Array.isArray(data)) return data;
  if (data !== null && typeof data === 'object' && Array.isArray(data.data)) return data.data;
  return null;
}

const NOT_OFFERED = new Set([404, 405, 501]);

function featureResult(result, endpoint, feature, title) {
  if (result.kind === 'ok') {
    const rows = listOf(result.data);
    if (rows === null) {
      return el('p', { class: 'notice' }, `GET ${endpoint} answered JSON that is not a list; this page cannot show it yet.`);
    }
    if (rows.length === 0) {
      return el('p', { class: 'notice' }, `Nothing here yet: GET ${endpoint} answered an empty list.`);
    }
    return jsonTable(rows, `${title}: ${rows.length} from GET ${endpoint}`);
  }
  if (result.kind === 'unreachable') {
    return el('div', { class: 'alert', role: 'alert' }, `The node's API is unreachable (GET ${endpoint}: ${describeFailure(result)}).`);
  }
  if (result.kind === 'not-json' || NOT_OFFERED.has(result.status)) {
    return el(
      'p',
      { class: 'notice' },
      `This page arrives with ${feature}; the node's API does not offer it yet (GET ${endpoint}: ${describeFailure(result)}).`,
    );
  }
  return el('div', { class: 'alert', role: 'alert' }, `The node's API failed (GET ${endpoint}: ${describeFailure(result)}).`);
}

const featureRequests = new WeakMap();

export async function loadFeature(section) {
  const request = (featureRequests.get(section) ?? 0) + 1;
  featureRequests.set(section, request);
  const { endpoint, feature } = section.dataset;
  const out = section.querySelector('.api-result');
  out.setAttribute('aria-busy', 'true');
  const result = await getJson(endpoint);
  if (featureRequests.get(section) !== request) return;
  out.setAttribute('aria-busy', 'false');
  const title = section.querySelector('h1').textContent;
  out.replaceChildren(featureResult(result, endpoint, feature, title));
}
