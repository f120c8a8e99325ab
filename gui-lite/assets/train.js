// The Train page: the list of jobs (GET /api/jobs), the new-job form (GET /api/models and
// GET /api/datanets fill its pickers; POST /api/jobs starts it) and, through job.js, the job
// being watched.

import { failureText, getJson, postJson } from './api.js';
import { byId, checkbox, el, idCode, notice, setText, table } from './dom.js';
import { formatBytes, shortId } from './format.js';
import { resumeWatching, stopWatching, watchJob } from './job.js';
import { checkAll, decimal, integer, labelsOf, liveCheck, showError, text } from './validate.js';

const form = byId('train-form');
const U32 = 4294967295;

// The form's fields and the rules the node applies to them (CreateJob and JobSpec::validate).
const RULES = [
  { id: 'train-name', key: 'name', parse: text(128) },
  { id: 'train-rank', key: 'rank', parse: integer(1, 1024) },
  { id: 'train-alpha', key: 'alpha', parse: decimal({ above: 0 }) },
  { id: 'train-lr', key: 'learning_rate', parse: decimal({ above: 0, max: 1 }) },
  { id: 'train-epochs', key: 'epochs', parse: integer(1, 1000) },
  { id: 'train-batch', key: 'batch_size', parse: integer(1, 4096) },
  { id: 'train-seq-len', key: 'seq_len', parse: integer(8, 1 << 20) },
  { id: 'train-rounds', key: 'rounds', parse: integer(1, 100000) },
  { id: 'train-max-workers', key: 'max_workers', parse: integer(1, U32) },
  {
    id: 'train-min-updates',
    key: 'min_updates',
    parse: integer(1, U32),
    check: (v, values) =>
      values.max_workers !== undefined && v > values.max_workers
        ? `At most the most workers per round (${values.max_workers}): a round could never gather ${v} updates.`
        : null,
  },
  {
    id: 'train-byzantine',
    key: 'byzantine',
    parse: integer(0, 1000),
    check: (f, values) => {
      if (f === 0 || values.max_workers === undefined) return null;
      if (values.max_workers < 2 * f + 3) return `Multi-Krum needs at least 2f + 3 = ${2 * f + 3} workers per round (most workers is ${values.max_workers}).`;
      if (values.min_updates !== undefined && values.max_workers < values.min_updates + f)
        return `The quorum must survive the filter: most workers (${values.max_workers}) must be at least fewest updates + ${f}.`;
      return null;
    },
  },
  { id: 'train-enroll-secs', key: 'enroll_secs', parse: decimal({ above: 0, max: 1e8 }) },
  { id: 'train-train-secs', key: 'train_secs', parse: decimal({ above: 0, max: 1e8 }) },
  { id: 'train-validate-secs', key: 'validate_secs', parse: decimal({ above: 0, max: 1e8 }) },
];

// The checkbox groups, checked like the fields.
function checkGroups() {
  const invalid = [];
  // A datanet at its latest version is sent as its id; an earlier one as `ID@VERSION`.
  const datanets = [...form.querySelectorAll('input[name="datanets"]:checked')].map((i) => {
    const version = byId(`${i.id}-version`);
    return version && version.value !== version.dataset.latest ? `${i.value}@${version.value}` : i.value;
  });
  const datanetBox = byId('train-datanets');
  const available = form.querySelectorAll('input[name="datanets"]:not(:disabled)').length;
  const datanetError =
    datanets.length > 0
      ? null
      : available > 0
        ? 'Tick at least one datanet.'
        : 'No published datanet is known here yet: create and publish one on the Datanets page.';
  showError(datanetBox, datanetError);
  if (datanetError) invalid.push(datanetBox);
  if (datanets.length > 64) {
    showError(datanetBox, `At most 64 datanets; ${datanets.length} are ticked.`);
    invalid.push(datanetBox);
  }

  const targets = [...form.querySelectorAll('input[name="targets"]:checked')].map((i) => i.value);
  const targetBox = byId('train-targets');
  showError(targetBox, targets.length > 0 ? null : 'Tick at least one module to adapt.');
  if (targets.length === 0) invalid.push(targetBox);
  return { datanets, targets, invalid };
}

function checkForm() {
  const { values, invalid } = checkAll(RULES);
  const groups = checkGroups();
  return { values, datanets: groups.datanets, targets: groups.targets, invalid: [...invalid, ...groups.invalid] };
}

// ----- Pickers filled from the API. -----

async function loadModels() {
  const select = byId('train-model');
  const result = await getJson('/api/models');
  const previous = select.value;
  if (result.kind !== 'ok' || !Array.isArray(result.data?.models)) {
    select.replaceChildren(el('option', { value: '', selected: true }, "The node's default model"));
    setText(byId('train-model-error'), `${failureText('GET', '/api/models', result)} The node picks its default model.`);
    return;
  }
  setText(byId('train-model-error'), '');
  const models = result.data.models;
  if (models.length === 0) {
    select.replaceChildren(el('option', { value: '', selected: true }, 'No model in the cache (the node will say which it needs)'));
    return;
  }
  // Why a model cannot be trained: `error` (the file does not read) or `runnable` (the reason
  // its architecture is not supported, null when it is).
  const problem = (m) => (typeof m.error === 'string' ? m.error : typeof m.runnable === 'string' ? m.runnable : m.runnable === false ? 'not runnable' : null);
  select.replaceChildren(
    ...models.map((m) =>
      el(
        'option',
        { value: m.name, selected: m.default === true, disabled: problem(m) !== null },
        `${m.name}${Number.isFinite(m.bytes) ? ` (${formatBytes(m.bytes)})` : ''}${m.default ? ', default' : ''}${problem(m) ? `: unusable, ${problem(m)}` : ''}`,
      ),
    ),
  );
  if (previous && models.some((m) => m.name === previous)) select.value = previous;
}

async function loadDatanets() {
  const list = byId('train-datanet-list');
  const checked = new Set([...form.querySelectorAll('input[name="datanets"]:checked')].map((i) => i.value));
  const result = await getJson('/api/datanets');
  if (result.kind !== 'ok' || !Array.isArray(result.data?.datanets)) {
    list.replaceChildren(el('p', { class: 'alert', role: 'alert' }, failureText('GET', '/api/datanets', result)));
    return;
  }
  const datanets = result.data.datanets;
  if (datanets.length === 0) {
    list.replaceChildren(notice('No datanet is known here yet: create one on the Datanets page, add files and publish it.'));
    return;
  }
  list.replaceChildren(
    ...datanets.map((d, i) => {
      const published = d.version > 0;
      const owner = d.mine ? 'yours' : `owner ${shortId(d.owner)}`;
      const label = published ? `${d.name} (${d.schema}, ${d.access}, ${owner})` : `${d.name} (not published yet, ${owner})`;
      const { input, row } = checkbox(`train-dn-${i}`, label, { name: 'datanets', value: d.id, disabled: !published });
      input.checked = published && checked.has(d.id);
      if (!published) return row;
      // The version to train on: the latest by default, or an earlier one this node holds.
      const versions = Array.from({ length: d.version }, (_, k) => d.version - k);
      const select = el(
        'select',
        { id: `train-dn-${i}-version`, class: 'version', 'data-latest': String(d.version) },
        ...versions.map((v) => el('option', { value: String(v) }, v === d.version ? `version ${v} (latest)` : `version ${v}`)),
      );
      return el('span', { class: 'datanet-pick' }, row, el('label', { for: select.id, class: 'visually-hidden' }, `Version of ${d.name}`), select);
    }),
  );
}

// ----- The job list. -----

function jobState(job) {
  if (job.finished || job.status?.finished) return 'finished';
  if (job.status?.phase) return job.status.phase;
  return 'not running on this node';
}

let jobsRequest = 0;

export async function loadJobs() {
  const request = ++jobsRequest;
  const out = byId('jobs-list');
  out.setAttribute('aria-busy', 'true');
  const result = await getJson('/api/jobs');
  if (request !== jobsRequest) return;
  out.setAttribute('aria-busy', 'false');
  setText(byId('jobs-error'), result.kind === 'ok' ? '' : failureText('GET', '/api/jobs', result));
  const jobs = result.kind === 'ok' && Array.isArray(result.data?.jobs) ? result.data.jobs : null;
  if (jobs === null) {
    out.replaceChildren();
    return;
  }
  if (jobs.length === 0) {
    out.replaceChildren(notice('No job yet. Start one with the form below; jobs other peers announce appear here once this node volunteers for them.'));
    return;
  }
  out.replaceChildren(
    table(
      jobs,
      [
        { label: 'Name', cell: (j) => j.name ?? '(unknown)' },
        { label: 'Job', cell: (j) => idCode(j.job, shortId(j.job)) },
        { label: 'Role here', cell: (j) => j.role ?? '—' },
        { label: 'Rounds', cell: (j) => (j.status ? `${j.status.round} of ${j.rounds}` : String(j.rounds ?? '—')), numeric: true },
        { label: 'State', cell: (j) => jobState(j) },
        {
          label: 'Watch',
          cell: (j) => {
            const button = el('button', { type: 'button', 'aria-label': `Watch job ${j.name ?? ''} (${shortId(j.job)})` }, 'Watch');
            button.addEventListener('click', () => watchJob(j.job, { focus: true }));
            return button;
          },
        },
      ],
      `${jobs.length} job${jobs.length === 1 ? '' : 's'} stored on this node`,
    ),
  );
}

// ----- Starting a job. -----

async function start(event) {
  event.preventDefault();
  setText(byId('train-error'), '');
  const { values, datanets, targets, invalid } = checkForm();
  if (invalid.length > 0) {
    setText(byId('train-error'), `Nothing was sent: fix ${labelsOf(invalid)}.`);
    const first = invalid[0];
    (first.tagName === 'FIELDSET' ? first.querySelector('input:not(:disabled)') ?? first : first).focus();
    return;
  }
  const body = {
    ...values,
    model: byId('train-model').value,
    datanets,
    targets,
    qlora: byId('train-kind-qlora').checked,
    merge: byId('train-merge').value,
  };
  const button = byId('train-start');
  button.disabled = true;
  setText(byId('train-status'), 'Starting: the node reads the datanets and holds out validation records…');
  const result = await postJson('/api/jobs', body);
  button.disabled = false;
  if (result.kind === 'ok' && typeof result.data?.job === 'string') {
    setText(byId('train-status'), `Started job ${shortId(result.data.job)}.`);
    loadJobs();
    watchJob(result.data.job, { focus: true });
    return;
  }
  setText(byId('train-status'), '');
  const refused = result.kind === 'http' && result.message ? `The node refused the job: ${result.message}` : failureText('POST', '/api/jobs', result);
  setText(byId('train-error'), refused);
}

function reset() {
  form.reset();
  for (const control of form.querySelectorAll('[aria-invalid]')) showError(control, null);
  setText(byId('train-error'), '');
  setText(byId('train-status'), '');
}

liveCheck(RULES, () => checkAll(RULES));
form.addEventListener('change', (event) => {
  if (event.target.name === 'datanets' || event.target.name === 'targets') checkGroups();
});
form.addEventListener('submit', start);
byId('train-reset').addEventListener('click', reset);
byId('jobs-refresh').addEventListener('click', () => loadJobs());
window.addEventListener('cohort:job-changed', () => loadJobs());

export function enter() {
  loadJobs();
  loadModels();
  loadDatanets();
  resumeWatching();
}

export function leave() {
  stopWatching({ keep: true });
}
