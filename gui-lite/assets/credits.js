// The Credits page: the signed contribution ledger (GET /api/ledger) as people read it: totals
// per contributor (with a bar chart) and per volunteer, then per job and round the credit of
// each shard, each contributor and each volunteer; and POST /api/ledger/verify's verdict.
// Credits are decimal strings; sums are exact (BigInt, see format.js).

import { failureText, getJson, postJson } from './api.js';
import { barChart } from './chart.js';
import { byId, el, idCode, notice, setText, table } from './dom.js';
import { creditNumber, formatCount, formatCredit, formatLoss, parseCredit, shortId } from './format.js';

let names = { jobs: new Map(), datanets: new Map() };

async function loadNames() {
  const [jobs, datanets] = await Promise.all([getJson('/api/jobs'), getJson('/api/datanets')]);
  names = {
    jobs: new Map((jobs.kind === 'ok' && Array.isArray(jobs.data?.jobs) ? jobs.data.jobs : []).map((j) => [j.job, j.name])),
    datanets: new Map((datanets.kind === 'ok' && Array.isArray(datanets.data?.datanets) ? datanets.data.datanets : []).map((d) => [d.id, d.name])),
  };
}

const creditOf = (text) => parseCredit(text) ?? 0n;

// The ledger's flag (Rust Debug text: Normal, Harmful, Duplicate { group: ... }) in words.
function flagText(flag) {
  const f = String(flag ?? '');
  if (f === '' || f === 'Normal') return '';
  if (f === 'Harmful') return 'harmful: it made the model worse and earns nothing';
  if (f.startsWith('Duplicate')) return 'near-duplicate: its group shares one value';
  return f;
}
const peerCell = (peer) => idCode(peer, shortId(peer));

function drawTotals(totals) {
  const contributors = Object.entries(totals?.contributors ?? {})
    .map(([peer, credit]) => ({ peer, units: creditOf(credit) }))
    .sort((a, b) => (b.units > a.units ? 1 : b.units < a.units ? -1 : 0));
  const sum = contributors.reduce((s, c) => s + c.units, 0n);
  barChart(
    byId('credits-chart'),
    contributors.map((c) => ({ label: shortId(c.peer, 8), value: creditNumber(c.units), text: formatCredit(c.units), title: `${c.peer}: ${formatCredit(c.units)}` })),
    { empty: 'No data credit yet: it is earned when a round closes.' },
  );
  byId('credits-contributors').replaceChildren(
    contributors.length > 0
      ? table(
          contributors,
          [
            { label: 'Contributor', cell: (c) => peerCell(c.peer) },
            { label: 'Data credit', cell: (c) => formatCredit(c.units), numeric: true },
            { label: 'Share', cell: (c) => (sum > 0n ? `${((creditNumber(c.units) / creditNumber(sum)) * 100).toFixed(1)} %` : '—'), numeric: true },
          ],
          `Data credit per contributor (total ${formatCredit(sum)})`,
        )
      : notice('No contributor has earned data credit yet.'),
  );

  const tokens = totals?.volunteer_tokens ?? {};
  const failed = totals?.volunteer_failed_updates ?? {};
  const volunteers = [...new Set([...Object.keys(tokens), ...Object.keys(failed)])].sort((a, b) => (tokens[b] ?? 0) - (tokens[a] ?? 0));
  byId('credits-volunteers').replaceChildren(
    volunteers.length > 0
      ? table(
          volunteers,
          [
            { label: 'Volunteer', cell: peerCell },
            { label: 'Verified tokens', cell: (p) => formatCount(tokens[p] ?? 0), numeric: true },
            { label: 'Failed updates', cell: (p) => formatCount(failed[p] ?? 0), numeric: true },
          ],
          'Compute per volunteer',
        )
      : notice('No volunteer has done verified work yet.'),
  );
}

// One table, one row group per ledger entry (a job's round): its shards, the contributors'
// subtotals where one gave several shards, and the volunteers' verified tokens.
function drawRounds(chains) {
  const entries = chains.flatMap((c) => (c.entries ?? []).map((e) => ({ ...e, coordinator: c.coordinator })));
  entries.sort((a, b) => (a.job === b.job ? a.round - b.round : String(a.job).localeCompare(String(b.job))));
  if (entries.length === 0) {
    byId('credits-rounds').replaceChildren(notice('The ledger is empty: entries appear as rounds close.'));
    return;
  }
  const head = el('thead', {}, el('tr', {}, ...['Kind', 'Who', 'Shard', 'Credit or tokens', 'Note'].map((h, i) => el('th', { scope: 'col', class: i === 3 ? 'num' : null }, h))));
  const groups = entries.map((e) => {
    const job = names.jobs.get(e.job) ?? null;
    const title = `${job ? `Job “${job}”` : `Job ${shortId(e.job)}`}, round ${e.round}: validation loss ${formatLoss(e.validation_loss_before)} → ${formatLoss(e.validation_loss_after)}`;
    const rows = [el('tr', { class: 'group' }, el('th', { scope: 'rowgroup', colspan: 5 }, title, el('span', { class: 'muted' }, ` (entry ${e.seq} of coordinator ${shortId(e.coordinator)})`)))];
    const data = Array.isArray(e.data) ? e.data : [];
    const byContributor = new Map();
    for (const d of data) {
      const units = creditOf(d.credit);
      byContributor.set(d.contributor, [...(byContributor.get(d.contributor) ?? []), units]);
      rows.push(
        el(
          'tr',
          {},
          el('td', {}, 'Data'),
          el('td', {}, peerCell(d.contributor)),
          el('td', {}, idCode(d.shard, shortId(d.shard, 8)), ` in ${names.datanets.get(d.datanet) ?? shortId(d.datanet, 8)}`),
          el('td', { class: 'num' }, formatCredit(units)),
          el('td', { class: 'note' }, flagText(d.flag)),
        ),
      );
    }
    for (const [peer, credits] of byContributor) {
      if (credits.length < 2) continue;
      rows.push(
        el(
          'tr',
          { class: 'subtotal' },
          el('td', {}, 'Data, total'),
          el('td', {}, peerCell(peer)),
          el('td', {}, `${credits.length} shards`),
          el('td', { class: 'num' }, formatCredit(credits.reduce((s, u) => s + u, 0n))),
          el('td', {}, ''),
        ),
      );
    }
    if (data.length === 0) rows.push(el('tr', {}, el('td', { colspan: 5, class: 'muted' }, 'No data credit in this round (it merged nothing or gained nothing).')));
    for (const c of Array.isArray(e.compute) ? e.compute : []) {
      rows.push(
        el(
          'tr',
          {},
          el('td', {}, 'Compute'),
          el('td', {}, peerCell(c.peer)),
          el('td', {}, '—'),
          el('td', { class: 'num' }, `${formatCount(c.tokens)} tokens`),
          el('td', {}, c.verified ? 'verified' : 'not verified'),
        ),
      );
    }
    return el('tbody', {}, ...rows);
  });
  const caption = `${entries.length} ledger entr${entries.length === 1 ? 'y' : 'ies'}, one per closed round`;
  const t = el('table', { id: 'credits-table' }, el('caption', {}, caption), head, ...groups);
  byId('credits-rounds').replaceChildren(el('div', { class: 'table-wrap', role: 'region', 'aria-label': caption, tabindex: 0 }, t));
}

let request = 0;

async function load() {
  const mine = ++request;
  const out = byId('credits-rounds');
  out.setAttribute('aria-busy', 'true');
  const [ledger] = await Promise.all([getJson('/api/ledger'), loadNames()]);
  if (mine !== request) return;
  out.setAttribute('aria-busy', 'false');
  setText(byId('credits-error'), ledger.kind === 'ok' ? '' : failureText('GET', '/api/ledger', ledger));
  if (ledger.kind !== 'ok') return;
  drawTotals(ledger.data?.totals);
  drawRounds(Array.isArray(ledger.data?.chains) ? ledger.data.chains : []);
}

async function verify() {
  const button = byId('credits-verify');
  const out = byId('credits-verify-result');
  button.disabled = true;
  out.replaceChildren(el('p', { class: 'muted' }, 'Verifying: pulling every known chain, then recomputing each round from its published blobs…'));
  const result = await postJson('/api/ledger/verify');
  button.disabled = false;
  if (result.kind !== 'ok') {
    out.replaceChildren(el('div', { class: 'alert' }, failureText('POST', '/api/ledger/verify', result)));
    return;
  }
  const chains = Array.isArray(result.data?.chains) ? result.data.chains : [];
  const verdict = result.data?.ok
    ? el('p', { class: 'ok' }, chains.length > 0 ? `Every chain verified (${chains.length}).` : 'There is no chain to verify yet.')
    : el('p', { class: 'alert' }, 'Verification found problems: see below.');
  const items = chains.map((c) => {
    const lines = [`${c.entries} entr${c.entries === 1 ? 'y' : 'ies'}, ${c.recomputed} recomputed and matched`];
    if (c.equivocations > 0) lines.push(`${c.equivocations} equivocation proof${c.equivocations === 1 ? '' : 's'} held against it`);
    return el(
      'li',
      {},
      el('span', {}, 'Coordinator ', peerCell(c.coordinator), `: ${lines.join('; ')}.`),
      (c.problems ?? []).length > 0 ? el('ul', { class: 'problems' }, ...c.problems.map((p) => el('li', {}, `Problem: ${p}`))) : '',
      (c.unchecked ?? []).length > 0 ? el('ul', { class: 'muted' }, ...c.unchecked.map((u) => el('li', {}, `Not recomputed here: ${u}`))) : '',
    );
  });
  out.replaceChildren(verdict, ...(items.length > 0 ? [el('ul', { class: 'plain' }, ...items)] : []));
}

byId('credits-refresh').addEventListener('click', load);
byId('credits-verify').addEventListener('click', verify);

export function enter() {
  load();
}

export function leave() {}
