// The Network page: this node (GET /api/status: identity, uptime, traffic, peers, rejected
// messages), the jobs it knows of (GET /api/jobs), and volunteering (GET/POST /api/volunteer:
// the on/off switch and the policy of which jobs to take). Refreshes every 5 s when asked, only
// while the page is shown and the tab visible.

import { describeFailure, failureText, getJson, postJson } from './api.js';
import { byId, el, idCode, notice, setText, table } from './dom.js';
import { formatBytes, formatCount, formatUptime, shortId } from './format.js';
import { showTokenForm } from './token.js';
import { optionalInteger, peerIdError, showError } from './validate.js';

const REFRESH_MS = 5000;
let shown = false;
let timer = null;
let statusRequest = 0;
let lastTraffic = null; // { at, sent, received } for rates
let policyExtras = {}; // policy fields the form does not show, sent back unchanged

// ----- Status. -----

function trafficText(traffic) {
  if (!traffic || !Number.isFinite(traffic.sent_bytes)) return 'unknown';
  const now = Date.now();
  let rate = '';
  if (lastTraffic && now > lastTraffic.at) {
    const seconds = (now - lastTraffic.at) / 1000;
    const up = Math.max(0, traffic.sent_bytes - lastTraffic.sent) / seconds;
    const down = Math.max(0, traffic.received_bytes - lastTraffic.received) / seconds;
    rate = ` (now ${formatBytes(up)}/s up, ${formatBytes(down)}/s down)`;
  }
  lastTraffic = { at: now, sent: traffic.sent_bytes, received: traffic.received_bytes };
  return `${formatBytes(traffic.sent_bytes)} sent, ${formatBytes(traffic.received_bytes)} received since start${rate}`;
}

function drawPeers(status) {
  const neighbours = new Set(Array.isArray(status.neighbours) ? status.neighbours : []);
  const peers = [...new Set([...neighbours, ...(Array.isArray(status.known_peers) ? status.known_peers : [])])];
  const rejected = status.rejected ?? {};
  const refusedFrom = (p) => Object.values(rejected[p] ?? {}).reduce((n, c) => n + (Number(c) || 0), 0);
  byId('network-peers').replaceChildren(
    peers.length > 0
      ? table(
          peers,
          [
            { label: 'Peer', cell: (p) => idCode(p, shortId(p, 16)) },
            { label: 'Connected', cell: (p) => (neighbours.has(p) ? 'yes, a gossip neighbour' : 'known') },
            { label: 'Rejected messages', cell: (p) => formatCount(refusedFrom(p)), numeric: true },
          ],
          `${neighbours.size} connected, ${peers.length} known`,
        )
      : notice('No peer is known yet: start another node, or give this one a bootstrap peer.'),
  );

  const rows = Object.entries(rejected).flatMap(([peer, reasons]) => Object.entries(reasons ?? {}).map(([reason, count]) => ({ peer, reason, count })));
  rows.sort((a, b) => b.count - a.count);
  byId('network-rejected').replaceChildren(
    rows.length > 0
      ? table(
          rows,
          [
            { label: 'Peer', cell: (r) => idCode(r.peer, shortId(r.peer, 16)) },
            { label: 'Reason', cell: (r) => r.reason.replaceAll('_', ' ') },
            { label: 'Count', cell: (r) => formatCount(r.count), numeric: true },
          ],
          `${formatCount(status.rejected_total ?? rows.reduce((n, r) => n + r.count, 0))} rejected in all`,
        )
      : notice('None: every message from peers was accepted.'),
  );
}

export async function loadStatus() {
  const request = ++statusRequest;
  const facts = byId('status');
  facts.setAttribute('aria-busy', 'true');
  const result = await getJson('/api/status');
  if (request !== statusRequest) return; // a newer request is on its way
  facts.setAttribute('aria-busy', 'false');

  const status = result.kind === 'ok' && result.data !== null && typeof result.data === 'object' ? result.data : null;
  const text = (value) => (typeof value === 'string' && value !== '' ? value : 'unknown');
  if (status) {
    setText(byId('status-error'), '');
  } else {
    const failure = result.kind === 'ok' ? 'HTTP 200, but the JSON is not an object' : describeFailure(result);
    setText(byId('status-error'), `The node's API is unreachable (GET /api/status: ${failure}).`);
  }
  setText(byId('status-peer-id'), text(status?.peer_id));
  setText(byId('status-version'), text(status?.version));
  setText(byId('status-data-dir'), text(status?.data_dir));
  setText(byId('status-uptime'), status ? formatUptime(status.uptime_s) : 'unknown');
  setText(byId('status-traffic'), status ? trafficText(status.traffic) : 'unknown');
  setText(byId('status-store'), status ? `${formatCount(status.datanets)} datanets, ${formatCount(status.indexed_hashes)} blob hashes indexed` : 'unknown');
  const dht = status?.dht;
  setText(
    byId('status-dht'),
    dht && typeof dht.error === 'string' ? `unavailable: ${dht.error}` : dht ? `${dht.mode ?? '?'} mode, ${formatCount(dht.routing_peers)} peers in the routing table, ${formatCount(dht.provided)} hashes provided` : 'unknown',
  );
  byId('copy-peer-id').disabled = typeof status?.peer_id !== 'string';
  if (status) drawPeers(status);
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

// ----- Jobs. -----

async function loadJobs() {
  const result = await getJson('/api/jobs');
  setText(byId('network-jobs-error'), result.kind === 'ok' ? '' : failureText('GET', '/api/jobs', result));
  if (result.kind !== 'ok' || !Array.isArray(result.data?.jobs)) return;
  const jobs = result.data.jobs;
  byId('network-jobs').replaceChildren(
    jobs.length > 0
      ? table(
          jobs,
          [
            { label: 'Name', cell: (j) => j.name ?? '(unknown)' },
            { label: 'Owner', cell: (j) => (j.role === 'owner' ? 'this node' : idCode(j.owner, shortId(j.owner))) },
            { label: 'This node', cell: (j) => j.role ?? '—' },
            { label: 'Rounds', cell: (j) => String(j.rounds ?? '—'), numeric: true },
            { label: 'State', cell: (j) => (j.finished || j.status?.finished ? 'finished' : (j.status?.phase ?? 'not running here')) },
          ],
          `${jobs.length} job${jobs.length === 1 ? '' : 's'} this node takes part in`,
        )
      : notice('No job yet. Jobs other peers announce are taken up here when volunteering is on and the policy allows them.'),
  );
}

// ----- Volunteering. -----

const lines = (text) =>
  text
    .split(/[\s,]+/)
    .map((s) => s.trim())
    .filter(Boolean);

function fillPolicy(policy) {
  const p = policy ?? {};
  const { owners, datanets, max_rank: rank, max_rounds: rounds, max_seq_len: seq, ...extras } = p;
  policyExtras = extras;
  byId('volunteer-owners').value = (owners ?? []).join('\n');
  byId('volunteer-datanets').value = (datanets ?? []).join('\n');
  byId('volunteer-max-rank').value = rank ?? '';
  byId('volunteer-max-rounds').value = rounds ?? '';
  byId('volunteer-max-seq-len').value = seq ?? '';
}

// The policy in the form, or null (with the reasons shown by the fields) when it is invalid.
function readPolicy() {
  let ok = true;
  const owners = lines(byId('volunteer-owners').value);
  const badOwner = owners.map((o) => [o, peerIdError(o)]).find(([, e]) => e);
  showError(byId('volunteer-owners'), badOwner ? `${shortId(badOwner[0])}: ${badOwner[1]}` : null);
  if (badOwner) ok = false;
  const numbers = {};
  for (const [id, key] of [
    ['volunteer-max-rank', 'max_rank'],
    ['volunteer-max-rounds', 'max_rounds'],
    ['volunteer-max-seq-len', 'max_seq_len'],
  ]) {
    const input = byId(id);
    const result = optionalInteger(1, 4294967295)(input.value, input);
    showError(input, result.error ?? null);
    if (result.error) ok = false;
    else numbers[key] = result.value;
  }
  if (!ok) return null;
  return { ...policyExtras, owners, datanets: lines(byId('volunteer-datanets').value), ...numbers };
}

function showVolunteer(data) {
  const enabled = data?.enabled === true;
  byId('network-volunteer').checked = enabled;
  setText(byId('volunteer-state'), enabled ? 'On: this node takes jobs its policy allows.' : 'Off: this node trains for nobody.');
  if (enabled) fillPolicy(data.policy);
}

async function loadVolunteer() {
  const result = await getJson('/api/volunteer');
  setText(byId('volunteer-error'), result.kind === 'ok' ? '' : failureText('GET', '/api/volunteer', result));
  byId('network-volunteer').disabled = result.kind !== 'ok';
  if (result.kind === 'ok') showVolunteer(result.data);
}

async function setVolunteer(enabled) {
  const toggle = byId('network-volunteer');
  const policy = readPolicy();
  if (policy === null) {
    toggle.checked = !enabled;
    setText(byId('volunteer-error'), 'Fix the policy below first.');
    return;
  }
  toggle.disabled = true;
  const result = await postJson('/api/volunteer', { enabled, policy });
  toggle.disabled = false;
  if (result.kind !== 'ok') {
    toggle.checked = !enabled;
    setText(byId('volunteer-error'), failureText('POST', '/api/volunteer', result));
    return;
  }
  setText(byId('volunteer-error'), '');
  showVolunteer(result.data);
}

byId('network-volunteer').addEventListener('change', (event) => setVolunteer(event.target.checked));
byId('volunteer-form').addEventListener('submit', (event) => {
  event.preventDefault();
  if (!byId('network-volunteer').checked) {
    if (readPolicy() !== null) setText(byId('volunteer-state'), 'Off: the policy is sent when volunteering is turned on.');
    return;
  }
  setVolunteer(true);
});

// ----- Refreshing. -----

function refresh() {
  loadStatus();
  loadJobs();
}

// Polls only while the page is shown, the box is ticked and the tab is visible.
function updateTimer() {
  const wanted = shown && byId('status-auto').checked && !document.hidden;
  if (wanted && timer === null) {
    timer = setInterval(refresh, REFRESH_MS);
  } else if (!wanted && timer !== null) {
    clearInterval(timer);
    timer = null;
  }
}

byId('status-refresh').addEventListener('click', () => {
  refresh();
  loadVolunteer();
});
byId('copy-peer-id').addEventListener('click', () => copyPeerId());
byId('token-change').addEventListener('click', () => showTokenForm('Paste the node\'s API token; changes (starting jobs, publishing, volunteering) send it.'));
byId('status-auto').addEventListener('change', updateTimer);
document.addEventListener('visibilitychange', updateTimer);

export function enter() {
  shown = true;
  refresh();
  loadVolunteer();
  updateTimer();
}

export function leave() {
  shown = false;
  updateTimer();
}
