// The job being watched on the Train page. Its JSON (GET /api/jobs/{job}) streams from
// GET /api/jobs/{job}/events on every change; this module draws it: phase, round, progress and
// estimated time left, a loss chart (training loss per volunteer and step, validation loss per
// round), who works on what, the closed rounds, and the Cancel button.

import { failureText, getJson, postJson } from './api.js';
import { lineChart, PALETTE_SIZE } from './chart.js';
import { preselectModel } from './chat.js';
import { byId, el, facts, idCode, notice, setText, table } from './dom.js';
import { formatCount, formatDuration, formatLoss, formatTime, shortId } from './format.js';
import { watch } from './sse.js';

const STORE_KEY = 'cohort.watching';

// { job, stop, data, phaseEndsAt, ticker, drawn: { part: key } } while a job is watched.
let current = null;
// The job to watch again when the page is shown again.
let pausedJob = null;

function remember(job) {
  try {
    if (job) window.sessionStorage.setItem(STORE_KEY, job);
    else window.sessionStorage.removeItem(STORE_KEY);
  } catch {
    // No session storage: the job is forgotten on reload.
  }
}

function remembered() {
  try {
    return window.sessionStorage.getItem(STORE_KEY);
  } catch {
    return null;
  }
}

const jobPath = (job) => `/api/jobs/${encodeURIComponent(job)}`;
const changed = () => window.dispatchEvent(new CustomEvent('cohort:job-changed'));

export function watchJob(job, { focus = false } = {}) {
  stopWatching({ keep: false });
  const watching = { job, stop: null, data: null, phaseEndsAt: null, ticker: null, drawn: {} };
  current = watching;
  remember(job);
  byId('job-watch').hidden = false;
  setText(byId('h-job'), `Job ${shortId(job)}`);
  setText(byId('job-id'), job);
  for (const id of ['job-error', 'job-last-error', 'job-phase', 'job-phase-ends', 'job-round', 'job-eta', 'job-adapter', 'job-progress-text']) setText(byId(id), '');
  setText(byId('job-connection'), 'Connecting…');

  const poll = async () => {
    const result = await getJson(jobPath(job));
    if (current !== watching) return;
    if (result.kind === 'ok') {
      setText(byId('job-error'), '');
      render(result.data);
      if (isFinished(result.data)) finish();
    } else {
      setText(byId('job-error'), failureText('GET', jobPath(job), result));
      if (result.status === 404) watching.stop?.();
    }
  };
  watching.stop = watch(`${jobPath(job)}/events`, {
    names: ['job', 'end'],
    onEvent: (name, data) => {
      if (current !== watching) return;
      if (name === 'job') render(data);
      else finish();
    },
    onState: (text) => {
      if (current === watching) setText(byId('job-connection'), text);
    },
    poll,
  });
  watching.ticker = setInterval(tick, 1000);
  if (focus) byId('h-job').focus();
}

// Stops the stream; `keep` remembers the job so that resumeWatching() picks it up again.
export function stopWatching({ keep }) {
  if (current) {
    current.stop?.();
    clearInterval(current.ticker);
    pausedJob = keep ? current.job : null;
    current = null;
  }
  if (!keep) {
    pausedJob = null;
    remember(null);
    byId('job-watch').hidden = true;
  }
}

export function resumeWatching() {
  const job = pausedJob ?? remembered();
  if (job && current === null) watchJob(job);
}

function finish() {
  if (!current) return;
  current.stop?.();
  current.stop = null;
  current.phaseEndsAt = null;
  setText(byId('job-connection'), 'The job has finished; nothing more will change.');
  tick();
  changed();
}

const isFinished = (data) => data?.finished === true || data?.status?.finished === true;
const closedRounds = (data) => (Array.isArray(data?.closed_rounds) ? [...data.closed_rounds].sort((a, b) => a.round - b.round) : []);

// Redraws one part only when its data changed, so that events that only move the countdown
// leave tables (and the focus in them) alone.
function part(name, key, draw) {
  const text = JSON.stringify(key);
  if (current.drawn[name] === text) return;
  current.drawn[name] = text;
  draw();
}

function render(data) {
  if (!current || data === null || typeof data !== 'object') return;
  current.data = data;
  const status = data.status ?? null;
  const finished = isFinished(data);
  const name = data.name ?? shortId(data.job ?? current.job);
  setText(byId('h-job'), `Job “${name}”`);
  setText(byId('job-phase'), finished ? 'finished' : (status?.phase ?? 'not running on this node'));
  current.phaseEndsAt = !finished && Number.isFinite(status?.phase_ends_in_s) ? Date.now() + status.phase_ends_in_s * 1000 : null;

  const closed = closedRounds(data);
  const rounds = Number.isFinite(data.rounds) ? data.rounds : null;
  setText(byId('job-round'), status && rounds !== null ? `${status.round} (rounds are numbered 0 to ${rounds - 1})` : '—');
  const progress = byId('job-progress');
  progress.max = rounds ?? 1;
  progress.value = Math.min(closed.length, rounds ?? closed.length);
  setText(byId('job-progress-text'), rounds !== null ? `${closed.length} of ${rounds}` : `${closed.length}`);

  const adapter = status?.adapter ?? closed.filter((c) => c.merged_adapter).at(-1)?.merged_adapter ?? null;
  setText(byId('job-adapter'), adapter ?? 'none yet');
  const chat = byId('job-chat');
  chat.hidden = !(adapter && data.base_model);
  chat.dataset.model = adapter && data.base_model ? `${data.base_model}:${adapter}` : '';
  chat.dataset.label = `${name}: latest adapter`;

  byId('job-cancel').hidden = !(data.role === 'owner' && !finished);
  setText(byId('job-last-error'), status?.last_error ? `The job's driver reported: ${status.last_error}` : '');

  part('chart', [status?.worker_losses, status?.losses, status?.validation, closed.map((c) => [c.round, c.validation_loss_before, c.validation_loss_after])], () => drawLosses(data, closed));
  part('workers', [status?.round, status?.assigned, status?.workers, status?.worker_losses?.[String(status?.round)], status?.losses], () => drawWorkers(data));
  part('rounds', [closed, data.base_model], () => drawRounds(data, closed));
  part('spec', [data.spec, data.owner, data.base_model], () => drawSpec(data));
  tick();
}

// ----- Time. -----

function eta(data, phaseLeft) {
  if (isFinished(data)) return 'none: the job has finished';
  const closes = closedRounds(data).map((c) => c.closed_at_ms).filter(Number.isFinite);
  const rounds = data.rounds;
  const created = data.created_at_ms;
  const atLeast = phaseLeft !== null ? `at least ${formatDuration(phaseLeft)} (the current phase's deadline)` : 'unknown';
  if (!Number.isFinite(rounds) || !Number.isFinite(created) || closes.length === 0) {
    return closes.length === 0 ? `${atLeast}; an estimate appears once the first round closes` : atLeast;
  }
  const last = Math.max(...closes);
  const perRound = (last - created) / closes.length;
  const left = Math.max(0, rounds - closes.length);
  const remaining = Math.max(perRound * left - (Date.now() - last), (phaseLeft ?? 0) * 1000) / 1000;
  return `about ${formatDuration(remaining)}: ${left} round${left === 1 ? '' : 's'} left at about ${formatDuration(perRound / 1000)} each (early stopping may end it sooner)`;
}

function tick() {
  if (!current?.data) return;
  const phaseLeft = current.phaseEndsAt !== null ? Math.max(0, (current.phaseEndsAt - Date.now()) / 1000) : null;
  setText(byId('job-phase-ends'), phaseLeft !== null ? `(deadline in ${formatDuration(phaseLeft)})` : '');
  setText(byId('job-eta'), eta(current.data, phaseLeft));
}

// ----- The loss chart. -----

// A round's training losses spread over [round, round + 1] on the chart's x axis.
const stepPoints = (round, losses) => losses.map((loss, i) => [round + (losses.length === 1 ? 0.5 : i / (losses.length - 1)), loss]);

function drawLosses(data, closed) {
  const status = data.status ?? {};
  const colours = new Map();
  const colourOf = (peer) => {
    if (!colours.has(peer)) colours.set(peer, colours.size % PALETTE_SIZE);
    return colours.get(peer);
  };
  // One line per worker and round (a worker may skip rounds), one colour per worker.
  const training = [];
  const byRound = status.worker_losses && typeof status.worker_losses === 'object' ? status.worker_losses : {};
  for (const [round, workers] of Object.entries(byRound).sort((a, b) => Number(a[0]) - Number(b[0]))) {
    for (const [peer, losses] of Object.entries(workers ?? {})) {
      if (Array.isArray(losses) && losses.length > 0) training.push({ peer, round: Number(round), losses });
    }
  }
  // A volunteer knows only its own losses.
  if (training.length === 0 && status.losses && typeof status.losses === 'object') {
    for (const [round, losses] of Object.entries(status.losses)) {
      if (Array.isArray(losses) && losses.length > 0) training.push({ peer: 'this node', round: Number(round), losses });
    }
  }
  // Validation loss: before the first round, then after each.
  let validation = closed.map((c) => [c.round, c.validation_loss_before, c.validation_loss_after]);
  if (validation.length === 0 && Array.isArray(status.validation)) validation = status.validation;
  const valPoints = [];
  for (const [round, before, after] of validation) {
    if (valPoints.length === 0 && Number.isFinite(before)) valPoints.push([round, before]);
    if (Number.isFinite(after)) valPoints.push([round + 1, after]);
  }

  const series = training.map((t) => ({ label: t.peer === 'this node' ? t.peer : shortId(t.peer), colour: colourOf(t.peer), points: stepPoints(t.round, t.losses) }));
  series.push({ label: 'Validation loss', colour: 'strong', points: valPoints, markers: true });
  lineChart(byId('job-chart'), series, {
    xLabel: 'Round',
    yLabel: 'Loss',
    xIntegers: true,
    empty: 'No loss yet: it appears when the first update is committed.',
  });

  const legend = [...colours.keys()].map((peer) =>
    el('li', {}, el('span', { class: `swatch series-${colours.get(peer)}`, 'aria-hidden': 'true' }), peer === 'this node' ? 'Training loss of this node' : el('span', {}, 'Training loss of ', idCode(peer, shortId(peer)))),
  );
  if (valPoints.length > 0) legend.push(el('li', {}, el('span', { class: 'swatch series-strong', 'aria-hidden': 'true' }), 'Validation loss after each round'));
  byId('job-legend').replaceChildren(...legend);

  const parts = [];
  if (valPoints.length > 1) parts.push(`Validation loss went from ${formatLoss(valPoints[0][1])} to ${formatLoss(valPoints.at(-1)[1])} over ${valPoints.length - 1} round${valPoints.length === 2 ? '' : 's'}.`);
  else if (valPoints.length === 1) parts.push(`Validation loss before training: ${formatLoss(valPoints[0][1])}.`);
  if (colours.size > 0) parts.push(`Training loss of ${colours.size} worker${colours.size === 1 ? '' : 's'} over ${training.reduce((n, t) => n + t.losses.length, 0)} steps.`);
  setText(byId('job-chart-summary'), parts.join(' ') || 'No loss has been reported yet.');

  const tables = [];
  if (validation.length > 0) {
    tables.push(
      table(
        validation,
        [
          { label: 'Round', cell: (v) => String(v[0]), numeric: true },
          { label: 'Before', cell: (v) => formatLoss(v[1]), numeric: true },
          { label: 'After', cell: (v) => formatLoss(v[2]), numeric: true },
          { label: 'Change', cell: (v) => (Number.isFinite(v[1]) && Number.isFinite(v[2]) ? formatLoss(v[2] - v[1]) : '—'), numeric: true },
        ],
        'Validation loss per round',
      ),
    );
  }
  if (training.length > 0) {
    tables.push(
      table(
        training,
        [
          { label: 'Round', cell: (t) => String(t.round), numeric: true },
          { label: 'Worker', cell: (t) => (t.peer === 'this node' ? t.peer : idCode(t.peer, shortId(t.peer))) },
          { label: 'Steps', cell: (t) => String(t.losses.length), numeric: true },
          { label: 'First loss', cell: (t) => formatLoss(t.losses[0]), numeric: true },
          { label: 'Last loss', cell: (t) => formatLoss(t.losses.at(-1)), numeric: true },
        ],
        'Training loss per worker and round',
      ),
    );
  }
  byId('job-loss-table').replaceChildren(...(tables.length > 0 ? tables : [notice('No loss has been reported yet.')]));
}

// ----- Who works on what. -----

function drawWorkers(data) {
  const out = byId('job-workers');
  const status = data.status;
  if (!status) {
    out.replaceChildren(notice('This node is not running the job, so it does not know who works on it.'));
    return;
  }
  const assigned = status.assigned && typeof status.assigned === 'object' ? status.assigned : {};
  const peers = [...new Set([...Object.keys(assigned), ...(Array.isArray(status.workers) ? status.workers : [])])];
  const losses = status.worker_losses?.[String(status.round)] ?? {};
  if (peers.length === 0) {
    out.replaceChildren(notice(`No worker is enrolled in round ${status.round} yet.`));
    return;
  }
  out.replaceChildren(
    table(
      peers,
      [
        { label: 'Worker', cell: (p) => idCode(p, shortId(p)) },
        { label: 'Shards', cell: (p) => (assigned[p] ? formatCount(assigned[p].shards) : 'not assigned yet'), numeric: true },
        { label: 'Tokens', cell: (p) => (assigned[p] ? formatCount(assigned[p].tokens) : '—'), numeric: true },
        { label: 'Steps committed', cell: (p) => (Array.isArray(losses[p]) ? String(losses[p].length) : '—'), numeric: true },
        { label: 'Last loss', cell: (p) => (Array.isArray(losses[p]) ? formatLoss(losses[p].at(-1)) : '—'), numeric: true },
      ],
      `Round ${status.round}: ${peers.length} worker${peers.length === 1 ? '' : 's'}`,
    ),
  );
}

// ----- Closed rounds. -----

function chatButton(model, label) {
  const button = el('button', { type: 'button', 'aria-label': `Chat with ${label}` }, 'Chat');
  button.addEventListener('click', () => {
    preselectModel(model, label);
    window.location.hash = '#/chat';
  });
  return button;
}

function drawRounds(data, closed) {
  const out = byId('job-rounds');
  if (closed.length === 0) {
    out.replaceChildren(notice('No round has closed yet.'));
    return;
  }
  const name = data.name ?? shortId(data.job);
  out.replaceChildren(
    table(
      closed,
      [
        { label: 'Round', cell: (c) => String(c.round), numeric: true },
        { label: 'Outcome', cell: (c) => c.outcome ?? '—' },
        { label: 'Validation loss', cell: (c) => `${formatLoss(c.validation_loss_before)} → ${formatLoss(c.validation_loss_after)}` },
        {
          label: 'Updates',
          cell: (c) => {
            const verdicts = Array.isArray(c.verdicts) ? c.verdicts : [];
            const refused = verdicts.filter((v) => v.rejected).length;
            return `${verdicts.length - refused} accepted${refused ? `, ${refused} refused` : ''}`;
          },
        },
        {
          label: 'Merged adapter',
          cell: (c) =>
            c.merged_adapter
              ? el('span', { class: 'cell-row' }, idCode(c.merged_adapter, shortId(c.merged_adapter)), data.base_model ? chatButton(`${data.base_model}:${c.merged_adapter}`, `${name}, round ${c.round}`) : '')
              : 'none',
        },
        { label: 'Closed', cell: (c) => formatTime(c.closed_at_ms) },
      ],
      `${closed.length} closed round${closed.length === 1 ? '' : 's'}`,
    ),
  );
}

// ----- The job's settings. -----

function drawSpec(data) {
  const spec = data.spec;
  const rows = [
    ['Owner', data.owner ? idCode(data.owner) : null],
    ['Base model', data.base_model ? idCode(data.base_model) : null],
    ['Created', Number.isFinite(data.created_at_ms) ? formatTime(data.created_at_ms) : null],
  ];
  if (spec) {
    rows.push(
      ['Adapter', `${spec.qlora ? 'QLoRA' : 'LoRA'}, rank ${spec.rank}, alpha ${spec.alpha}`],
      ['Target modules', (spec.targets ?? []).join(', ')],
      ['Learning rate', String(spec.learning_rate)],
      ['Epochs, batch, sequence', `${spec.epochs} epochs, batches of ${spec.batch_size}, ${spec.seq_len} tokens`],
      ['Quorum', `${spec.min_updates} to ${spec.max_workers} workers per round`],
      ['Datanets', el('ul', { class: 'plain' }, ...(spec.datanets ?? []).map((d) => el('li', {}, idCode(d.datanet, shortId(d.datanet, 16)), ` version ${d.version}`)))],
      ['Validation set', spec.validation_set ? idCode(spec.validation_set) : null],
    );
  }
  byId('job-spec').replaceChildren(...facts(rows));
}

// ----- Buttons. -----

byId('job-close').addEventListener('click', () => {
  stopWatching({ keep: false });
  byId('h-jobs').focus();
});

byId('job-chat').addEventListener('click', (event) => {
  const { model, label } = event.currentTarget.dataset;
  if (!model) return;
  preselectModel(model, label);
  window.location.hash = '#/chat';
});

byId('job-cancel').addEventListener('click', async (event) => {
  if (!current) return;
  const { job } = current;
  const name = current.data?.name ?? shortId(job);
  if (!window.confirm(`Cancel job “${name}”? No more rounds start; closed rounds and their credits stay.`)) return;
  const button = event.currentTarget;
  button.disabled = true;
  const path = `${jobPath(job)}/cancel`;
  const result = await postJson(path);
  button.disabled = false;
  if (result.kind === 'ok') {
    setText(byId('job-error'), '');
    setText(byId('job-connection'), `Job “${name}” cancelled.`);
    changed();
  } else {
    setText(byId('job-error'), failureText('POST', path, result));
  }
});
