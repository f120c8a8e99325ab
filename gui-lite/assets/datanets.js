// The Datanets page: the datanets this node knows (GET /api/datanets), one opened in detail
// (GET /api/datanets/{id}: its version, shards, contributors, pending shards; GET .../records),
// creating one, importing files into it by drag and drop or file picker (POST .../add for the
// owner, POST .../contribute for others; the files are read here with File.text()), publishing,
// fetching, granting and revoking access, and reviewing submissions (GET /api/submissions,
// POST /api/submissions/{id}/approve|reject).

import { failureText, getJson, postJson } from './api.js';
import { byId, el, facts, idCode, notice, setText, table } from './dom.js';
import { formatBytes, formatCount, formatTime, shortId } from './format.js';
import { peerIdError, showError, text } from './validate.js';

const RECORDS_SHOWN = 20;
const MAX_UPLOAD_BYTES = 60 * 1024 * 1024; // the node takes request bodies of up to 64 MiB

let me = null; // this node's peer id
let known = []; // datanet summaries from the last list
let openId = null; // the opened datanet's id
let open = null; // its JSON, once loaded
let files = []; // File objects waiting to be imported

const path = (id, action = '') => `/api/datanets/${encodeURIComponent(id)}${action ? `/${action}` : ''}`;
const ownerText = (peer) => (peer === me ? 'this node' : shortId(peer));

async function loadMe() {
  if (me) return;
  const status = await getJson('/api/status');
  if (status.kind === 'ok' && typeof status.data?.peer_id === 'string') me = status.data.peer_id;
}

// ----- The list. -----

async function loadList() {
  const out = byId('datanets-list');
  out.setAttribute('aria-busy', 'true');
  const result = await getJson('/api/datanets');
  out.setAttribute('aria-busy', 'false');
  setText(byId('datanets-error'), result.kind === 'ok' ? '' : failureText('GET', '/api/datanets', result));
  if (result.kind !== 'ok' || !Array.isArray(result.data?.datanets)) return;
  known = result.data.datanets;
  if (known.length === 0) {
    out.replaceChildren(notice('No datanet is known here yet. Create one below, or wait for peers to announce theirs.'));
    return;
  }
  out.replaceChildren(
    table(
      known,
      [
        {
          label: 'Name',
          cell: (d) => {
            const button = el('button', { type: 'button', class: 'link' }, d.name);
            button.addEventListener('click', () => openDatanet(d.id, { focus: true }));
            return button;
          },
        },
        { label: 'Owner', cell: (d) => (d.mine ? 'this node' : idCode(d.owner, shortId(d.owner))) },
        { label: 'Version', cell: (d) => (d.version > 0 ? String(d.version) : 'not published'), numeric: true },
        { label: 'Schema', cell: (d) => d.schema },
        { label: 'Access', cell: (d) => d.access },
        { label: 'Description', cell: (d) => d.description || '—' },
      ],
      `${known.length} datanet${known.length === 1 ? '' : 's'}`,
    ),
  );
}

// ----- One datanet. -----

function contributors(shards) {
  const by = new Map();
  for (const s of shards) {
    const key = s.contributor ?? 'unknown';
    const row = by.get(key) ?? { peer: key, shards: 0, records: 0, tokens: 0 };
    row.shards += 1;
    row.records += s.records ?? 0;
    row.tokens += s.tokens ?? 0;
    by.set(key, row);
  }
  return [...by.values()].sort((a, b) => b.tokens - a.tokens);
}

function shardTable(shards, caption) {
  return table(
    shards,
    [
      { label: 'Shard', cell: (s) => idCode(s.hash, shortId(s.hash)) },
      { label: 'Records', cell: (s) => formatCount(s.records), numeric: true },
      { label: 'Tokens', cell: (s) => formatCount(s.tokens), numeric: true },
      { label: 'Size', cell: (s) => formatBytes(s.bytes), numeric: true },
      { label: 'Contributor', cell: (s) => (s.contributor ? idCode(s.contributor, ownerText(s.contributor)) : '—') },
      { label: 'Held here', cell: (s) => (s.local ? 'yes' : 'no') },
    ],
    caption,
  );
}

export async function openDatanet(id, { focus = false } = {}) {
  const detail = byId('datanet-detail');
  detail.hidden = false;
  if (openId !== id) {
    openId = id;
    open = null;
    setText(byId('datanet-result'), '');
    byId('datanet-records').replaceChildren();
  }
  setText(byId('datanet-error'), '');
  if (focus) byId('h-datanet').focus();
  const result = await getJson(path(id));
  if (openId !== id) return; // another datanet was opened meanwhile
  if (result.kind !== 'ok') {
    setText(byId('datanet-error'), failureText('GET', path(id), result));
    return;
  }
  const d = result.data;
  open = d;
  const mine = d.mine === true;
  setText(byId('h-datanet'), `Datanet “${d.name}”`);
  byId('datanet-facts').replaceChildren(
    ...facts([
      ['Id', idCode(d.id)],
      ['Owner', mine ? 'this node' : idCode(d.owner)],
      ['Description', d.description || '—'],
      ['Licence', d.license || '—'],
      ['Schema', d.schema],
      ['Access', d.access === 'allowlist' ? 'allowlist: encrypted, for granted peers only' : 'public'],
      ['Granted to', Array.isArray(d.grantees) ? (d.grantees.length > 0 ? el('ul', { class: 'plain' }, ...d.grantees.map((g) => el('li', {}, idCode(g)))) : 'nobody yet') : null],
      ['Key generation', Number.isInteger(d.key_epoch) ? String(d.key_epoch) : null],
      ['Versions held', Array.isArray(d.versions) && d.versions.length > 1 ? d.versions.map((v) => `v${v.version} (${formatCount(v.records)} records)`).join(', ') : null],
      ['Version', d.version > 0 ? `${d.version}${d.published_at_ms ? `, published ${formatTime(d.published_at_ms)}` : ''}` : 'not published yet'],
      ['Manifest', d.manifest ? idCode(d.manifest) : null],
      ['Previous version', d.previous ? idCode(d.previous) : null],
      ['Size', d.records !== undefined ? `${formatCount(d.records)} records, ${formatCount(d.tokens)} tokens` : null],
    ]),
  );

  const shards = Array.isArray(d.shards) ? d.shards : [];
  const pending = Array.isArray(d.pending) ? d.pending : [];
  byId('datanet-shards').replaceChildren(shards.length > 0 ? shardTable(shards, `Version ${d.version}: ${shards.length} shard${shards.length === 1 ? '' : 's'}`) : notice('No published shard yet.'));
  const people = contributors(shards);
  byId('datanet-contributors').replaceChildren(
    people.length > 0
      ? table(
          people,
          [
            { label: 'Contributor', cell: (c) => (c.peer === 'unknown' ? c.peer : idCode(c.peer, ownerText(c.peer))) },
            { label: 'Shards', cell: (c) => String(c.shards), numeric: true },
            { label: 'Records', cell: (c) => formatCount(c.records), numeric: true },
            { label: 'Tokens', cell: (c) => formatCount(c.tokens), numeric: true },
          ],
          'Who contributed the latest version',
        )
      : notice('Nobody yet.'),
  );
  byId('datanet-pending').replaceChildren(
    pending.length > 0 ? shardTable(pending, `${pending.length} shard${pending.length === 1 ? '' : 's'} for the next version`) : notice('Nothing is waiting.'),
  );

  const publish = byId('datanet-publish');
  publish.hidden = !mine;
  setText(publish, pending.length > 0 ? `Publish version ${d.version + 1} (${pending.length} new shard${pending.length === 1 ? '' : 's'})` : `Publish version ${d.version + 1}`);
  byId('datanet-fetch').hidden = mine || !(d.version > 0);
  setText(byId('h-datanet-import'), mine ? 'Add files' : 'Contribute files (the owner reviews them)');
  byId('datanet-note-field').hidden = mine;
  setText(byId('datanet-import'), mine ? 'Add to the next version' : 'Send to the owner');
  byId('datanet-access-form').hidden = !mine;
}

function closeDatanet() {
  openId = null;
  open = null;
  byId('datanet-detail').hidden = true;
  byId('h-datanet-list').focus();
}

function report(message) {
  setText(byId('datanet-error'), '');
  setText(byId('datanet-result'), message);
}

function fail(method, url, result) {
  setText(byId('datanet-result'), '');
  setText(byId('datanet-error'), failureText(method, url, result));
}

// ----- Records. -----

function recordView(record) {
  if (Array.isArray(record?.messages)) {
    return el('ol', { class: 'record chat' }, ...record.messages.map((m) => el('li', {}, el('span', { class: 'who' }, String(m?.role ?? '?')), ' ', String(m?.content ?? ''))));
  }
  if (record && typeof record === 'object' && 'instruction' in record) {
    return el('dl', { class: 'record' }, ...facts(['instruction', 'input', 'output'].filter((k) => record[k]).map((k) => [k, String(record[k])])));
  }
  return el('pre', { class: 'record' }, JSON.stringify(record, null, 2));
}

async function loadRecords() {
  if (!openId) return;
  const url = `${path(openId, 'records')}?limit=${RECORDS_SHOWN}`;
  const out = byId('datanet-records');
  out.setAttribute('aria-busy', 'true');
  const result = await getJson(url);
  out.setAttribute('aria-busy', 'false');
  if (result.kind !== 'ok') {
    out.replaceChildren(el('div', { class: 'alert', role: 'alert' }, failureText('GET', url, result)));
    return;
  }
  const records = Array.isArray(result.data?.records) ? result.data.records : [];
  out.replaceChildren(
    el('p', { class: 'hint' }, `${records.length} of ${formatCount(result.data?.total)} records of version ${result.data?.version}.`),
    el('ol', { class: 'records' }, ...records.map((r) => el('li', {}, recordView(r)))),
  );
}

// ----- Importing files. -----

function showFiles() {
  const total = files.reduce((n, f) => n + f.size, 0);
  byId('datanet-file-list').replaceChildren(
    ...files.map((file, i) => {
      const remove = el('button', { type: 'button', 'aria-label': `Remove ${file.name} from the list` }, 'Remove');
      remove.addEventListener('click', () => {
        files.splice(i, 1);
        showFiles();
        byId('datanet-files').focus();
      });
      return el('li', {}, el('span', {}, `${file.name} (${formatBytes(file.size)})`), remove);
    }),
    ...(files.length > 1 ? [el('li', { class: 'muted' }, `${files.length} files, ${formatBytes(total)} in all`)] : []),
  );
}

function addFiles(list) {
  for (const file of list) {
    if (!files.some((f) => f.name === file.name && f.size === file.size && f.lastModified === file.lastModified)) files.push(file);
  }
  showFiles();
}

async function importFiles(event) {
  event.preventDefault();
  if (!open) {
    setText(byId('datanet-error'), 'The datanet is still loading; try again in a moment.');
    return;
  }
  const { id } = open;
  const mine = open.mine === true;
  const input = byId('datanet-files');
  if (files.length === 0) {
    setText(byId('datanet-result'), '');
    setText(byId('datanet-error'), 'Choose or drop at least one file first.');
    input.focus();
    return;
  }
  const total = files.reduce((n, f) => n + f.size, 0);
  if (total > MAX_UPLOAD_BYTES) {
    setText(byId('datanet-error'), `These files are ${formatBytes(total)}; the dashboard sends at most ${formatBytes(MAX_UPLOAD_BYTES)} at once. Send fewer at a time, or use \`cohort datanet add\`.`);
    return;
  }
  const button = byId('datanet-import');
  button.disabled = true;
  report(`Reading ${files.length} file${files.length === 1 ? '' : 's'}…`);
  let uploads;
  try {
    uploads = await Promise.all(files.map(async (f) => ({ name: f.name, content: await f.text() })));
  } catch (error) {
    button.disabled = false;
    setText(byId('datanet-error'), `This browser could not read the files: ${error?.message ?? error}`);
    return;
  }
  const url = path(id, mine ? 'add' : 'contribute');
  const body = { uploads };
  if (!mine) body.note = byId('datanet-note').value.trim();
  report('Sending to the node, which checks every record…');
  const result = await postJson(url, body);
  button.disabled = false;
  if (result.kind !== 'ok') {
    fail('POST', url, result);
    return;
  }
  const r = result.data ?? {};
  const read = `${formatCount(r.records_read)} records read, ${formatCount(r.duplicates)} duplicates skipped`;
  files = [];
  showFiles();
  byId('datanet-note').value = '';
  await openDatanet(id);
  report(
    mine
      ? `Added ${(r.shards ?? []).length} shard${(r.shards ?? []).length === 1 ? '' : 's'} (${read}). Publish to make them a version.`
      : `Sent ${(r.submissions ?? []).length} submission${(r.submissions ?? []).length === 1 ? '' : 's'} to the owner (${read}).`,
  );
  loadSubmissions();
}

// ----- Publishing, fetching, access. -----

async function publish() {
  if (!openId) return;
  const url = path(openId, 'publish');
  const result = await postJson(url);
  if (result.kind !== 'ok') return fail('POST', url, result);
  const r = result.data;
  await Promise.all([openDatanet(openId), loadList()]);
  report(`Published version ${r.version}: ${r.shards} shard${r.shards === 1 ? '' : 's'}, ${formatCount(r.records)} records, ${formatCount(r.tokens)} tokens.${r.announced ? '' : ' The announcement to peers failed; they find it at the next sync.'}`);
}

async function fetchShards() {
  if (!openId) return;
  const url = path(openId, 'fetch');
  report('Fetching the shards from their providers…');
  const result = await postJson(url);
  if (result.kind !== 'ok') return fail('POST', url, result);
  const r = result.data?.report ?? {};
  await openDatanet(openId);
  const bad = Array.isArray(r.bad_providers) && r.bad_providers.length > 0 ? ` Providers that sent bad data: ${r.bad_providers.map((p) => shortId(p)).join(', ')}.` : '';
  byId('datanet-records').replaceChildren();
  report(`Version ${result.data?.version}: ${formatCount(r.fetched)} shard${r.fetched === 1 ? '' : 's'} fetched (${formatBytes(r.bytes)}), ${formatCount(r.already_held)} already here.${bad}`);
}

async function access(action) {
  if (!openId) return;
  const input = byId('datanet-peer');
  const error = peerIdError(input.value);
  showError(input, error);
  if (error) {
    input.focus();
    return;
  }
  const peer = input.value.trim().toLowerCase();
  if (action === 'revoke' && !window.confirm(`Revoke ${shortId(peer)}'s access to “${open?.name ?? 'this datanet'}”? The next version is encrypted under a new key.`)) return;
  const url = path(openId, action);
  const result = await postJson(url, { peer });
  if (result.kind !== 'ok') return fail('POST', url, result);
  const r = result.data ?? {};
  input.value = '';
  report(
    action === 'grant'
      ? `Granted ${shortId(peer)}${r.note ? `: ${r.note}` : '.'}`
      : `Revoked ${shortId(peer)}: versions from ${r.from_version} on use key epoch ${r.new_key_epoch}.`,
  );
}

// ----- Creating. -----

async function create(event) {
  event.preventDefault();
  const input = byId('create-name');
  const name = text(64)(input.value);
  showError(input, name.error ?? null);
  if (name.error) {
    input.focus();
    return;
  }
  const body = {
    name: name.value,
    description: byId('create-description').value.trim(),
    license: byId('create-license').value.trim(),
    schema: byId('create-schema').value,
    access: byId('create-access').value,
  };
  const result = await postJson('/api/datanets', body);
  if (result.kind !== 'ok') {
    setText(byId('create-error'), result.kind === 'http' && result.message ? `The node refused: ${result.message}` : failureText('POST', '/api/datanets', result));
    return;
  }
  setText(byId('create-error'), '');
  byId('datanet-create-form').reset();
  await loadList();
  await openDatanet(result.data.id, { focus: true });
  report(`Created “${result.data.name}”. Add files, then publish its first version.`);
}

// ----- Submissions. -----

function decisionCell(s, index) {
  const datanet = known.find((d) => d.id === s.datanet);
  if (s.status?.state !== 'pending' || !datanet?.mine) return '';
  const approve = el('button', { type: 'button', 'aria-label': `Approve the submission from ${shortId(s.contributor)}` }, 'Approve');
  const reason = el('input', { type: 'text', id: `reject-reason-${index}`, 'aria-label': `Reason to reject the submission from ${shortId(s.contributor)}`, placeholder: 'Reason to reject' });
  const reject = el('button', { type: 'button', class: 'danger', 'aria-label': `Reject the submission from ${shortId(s.contributor)}` }, 'Reject');
  approve.addEventListener('click', () => decide(s, 'approve'));
  reject.addEventListener('click', () => {
    if (!reason.value.trim()) {
      setText(byId('submissions-error'), 'Say why you reject it: the contributor is told.');
      reason.focus();
      return;
    }
    decide(s, 'reject', reason.value.trim());
  });
  return el('span', { class: 'cell-row' }, approve, reason, reject);
}

async function decide(s, action, reason) {
  const url = `/api/submissions/${encodeURIComponent(s.id)}/${action}`;
  const result = await postJson(url, action === 'reject' ? { reason } : undefined);
  if (result.kind !== 'ok') {
    setText(byId('submissions-error'), failureText('POST', url, result));
    return;
  }
  setText(byId('submissions-error'), '');
  const told = result.data?.contributor_notified ? 'The contributor was told.' : 'The contributor could not be told now; the decision stands.';
  setText(byId('submissions-result'), action === 'approve' ? `Approved: the shard enters the next published version. ${told}` : `Rejected. ${told}`);
  await loadSubmissions();
  if (openId === s.datanet) openDatanet(openId);
}

function statusText(status) {
  if (!status) return '—';
  return status.state === 'rejected' ? `rejected: ${status.reason}` : status.state;
}

async function loadSubmissions() {
  const result = await getJson('/api/submissions');
  const out = byId('submissions-list');
  setText(byId('submissions-error'), result.kind === 'ok' ? '' : failureText('GET', '/api/submissions', result));
  if (result.kind !== 'ok' || !Array.isArray(result.data?.submissions)) return;
  const list = result.data.submissions;
  if (list.length === 0) {
    out.replaceChildren(notice('No submission yet.'));
    return;
  }
  const nameOf = (id) => known.find((d) => d.id === id)?.name ?? shortId(id);
  out.replaceChildren(
    table(
      list,
      [
        { label: 'Datanet', cell: (s) => nameOf(s.datanet) },
        { label: 'From', cell: (s) => idCode(s.contributor, ownerText(s.contributor)) },
        { label: 'Records', cell: (s) => formatCount(s.shard?.records), numeric: true },
        { label: 'Tokens', cell: (s) => formatCount(s.shard?.tokens), numeric: true },
        { label: 'Note', cell: (s) => s.note || '—' },
        { label: 'Status', cell: (s) => statusText(s.status) },
        { label: 'Decision', cell: (s) => decisionCell(s, list.indexOf(s)) },
      ],
      `${list.length} submission${list.length === 1 ? '' : 's'}`,
    ),
  );
}

// ----- Wiring. -----

// A file dropped next to the drop zone would make the browser leave the page to show it.
for (const type of ['dragover', 'drop']) {
  window.addEventListener(type, (event) => {
    if (event.dataTransfer?.types?.includes('Files')) event.preventDefault();
  });
}

const drop = byId('datanet-drop');
drop.addEventListener('dragover', (event) => {
  event.preventDefault();
  event.dataTransfer.dropEffect = 'copy';
  drop.classList.add('dragging');
});
drop.addEventListener('dragleave', () => drop.classList.remove('dragging'));
drop.addEventListener('drop', (event) => {
  event.preventDefault();
  drop.classList.remove('dragging');
  addFiles(event.dataTransfer.files);
});
byId('datanet-files').addEventListener('change', (event) => {
  addFiles(event.target.files);
  event.target.value = '';
});
byId('datanet-files-clear').addEventListener('click', () => {
  files = [];
  showFiles();
});
byId('datanet-import-form').addEventListener('submit', importFiles);
byId('datanet-records-load').addEventListener('click', loadRecords);
byId('datanet-publish').addEventListener('click', publish);
byId('datanet-fetch').addEventListener('click', fetchShards);
byId('datanet-grant').addEventListener('click', () => access('grant'));
byId('datanet-revoke').addEventListener('click', () => access('revoke'));
byId('datanet-close').addEventListener('click', closeDatanet);
byId('datanet-create-form').addEventListener('submit', create);
byId('datanets-refresh').addEventListener('click', async () => {
  await loadList();
  if (openId) openDatanet(openId);
});
byId('submissions-refresh').addEventListener('click', loadSubmissions);

export async function enter() {
  await loadMe();
  await loadList();
  loadSubmissions();
  if (openId) openDatanet(openId);
}

export function leave() {}
