// The Chat page: panes side by side, each with its own model and conversation, all answering
// the one prompt. Answers stream from POST /v1/chat/completions ("stream": true) as server-sent
// events (`data: {chunk}` ... `data: [DONE]`), read with fetch and a ReadableStream; Stop aborts
// them all. The model pickers offer what GET /v1/models lists, and each job's adapters:
// BASE:JOB (its latest merged adapter) and BASE:ADAPTER_HASH (each closed round's).

import { authHeaders, failureText, getJson, serverMessage } from './api.js';
import { byId, el, setText } from './dom.js';
import { shortId } from './format.js';
import { readEvents } from './sse.js';
import { integer, decimal, showError } from './validate.js';

const MAX_PANES = 4;
const MAX_JOBS = 20; // jobs whose rounds are listed (one GET each)

// [{ n, section, select, output, status, remove, history: [{ role, content }] }]
const panes = [];
let paneCount = 0;
// Picker entries: [{ group, value, label }], and the ones to pick first.
let choices = [];
let defaults = [];
// A model chosen elsewhere (the Train page's "Chat" buttons), picked in the second pane.
let pending = null;
let controller = null;
let loaded = false;

export function preselectModel(value, label) {
  pending = { value, label };
}

// ----- Model choices. -----

async function loadChoices() {
  const [models, jobs, bases] = await Promise.all([getJson('/v1/models', { auth: true }), getJson('/api/jobs'), getJson('/api/models')]);
  const problems = [];
  const list = [];
  if (models.kind === 'ok' && Array.isArray(models.data?.data)) {
    for (const m of models.data.data) {
      if (typeof m?.id !== 'string') continue;
      const adapter = m.id.includes(':');
      list.push({ group: adapter ? 'Adapters loaded on this node' : 'Base models', value: m.id, label: m.id });
    }
  } else {
    problems.push(failureText('GET', '/v1/models', models));
  }
  // Base model names by hash, for labels.
  const baseName = new Map();
  if (bases.kind === 'ok' && Array.isArray(bases.data?.models)) {
    for (const b of bases.data.models) if (b.hash) baseName.set(b.hash, b.name);
  }
  let newest = null; // { value, at }
  if (jobs.kind === 'ok' && Array.isArray(jobs.data?.jobs)) {
    const withBase = jobs.data.jobs.filter((j) => typeof j.base_model === 'string' && typeof j.job === 'string').slice(0, MAX_JOBS);
    const details = await Promise.all(withBase.map((j) => getJson(`/api/jobs/${encodeURIComponent(j.job)}`)));
    withBase.forEach((job, i) => {
      const name = job.name ?? shortId(job.job);
      const base = baseName.get(job.base_model) ?? shortId(job.base_model);
      const group = `Job “${name}” (on ${base})`;
      const closed = details[i].kind === 'ok' && Array.isArray(details[i].data?.closed_rounds) ? details[i].data.closed_rounds : [];
      const merged = closed.filter((c) => typeof c.merged_adapter === 'string').sort((a, b) => a.round - b.round);
      if (merged.length === 0) return;
      list.push({ group, value: `${job.base_model}:${job.job}`, label: `${name}: latest adapter` });
      for (const c of merged) {
        const value = `${job.base_model}:${c.merged_adapter}`;
        list.push({ group, value, label: `${name}: round ${c.round} (${shortId(c.merged_adapter, 8)})` });
        const at = Number.isFinite(c.closed_at_ms) ? c.closed_at_ms : 0;
        if (!newest || at >= newest.at) newest = { value, at };
      }
    });
  } else {
    problems.push(failureText('GET', '/api/jobs', jobs));
  }
  choices = list;
  const firstBase = list.find((c) => c.group === 'Base models')?.value ?? '';
  defaults = [firstBase, newest?.value ?? firstBase];
  setText(byId('chat-models-error'), problems.join(' '));
  for (const pane of panes) fill(pane);
  if (pending) {
    const target = panes[1] ?? panes[0];
    if (!choices.some((c) => c.value === pending.value)) choices.push({ group: 'Chosen on the Train page', ...pending });
    fill(target, pending.value);
    pending = null;
  }
}

// Fills a pane's picker, keeping its choice when it is still offered.
function fill(pane, want) {
  const keep = want ?? (pane.select.value || defaults[pane.n - 1] || defaults[0] || '');
  const groups = new Map();
  for (const c of choices) {
    if (!groups.has(c.group)) groups.set(c.group, el('optgroup', { label: c.group }));
    groups.get(c.group).append(el('option', { value: c.value }, c.label));
  }
  pane.select.replaceChildren(el('option', { value: '' }, '(none: this pane sits out)'), ...groups.values());
  pane.select.value = choices.some((c) => c.value === keep) ? keep : '';
}

// ----- Panes. -----

function addPane() {
  if (panes.length >= MAX_PANES) return null;
  const n = ++paneCount;
  const title = `chat-pane-${n}-title`;
  const select = el('select', { id: `chat-model-${n}`, class: 'chat-model' });
  const output = el('div', { id: `chat-output-${n}`, class: 'chat-output', role: 'log', 'aria-live': 'polite', 'aria-labelledby': title, tabindex: 0 });
  const status = el('p', { class: 'chat-pane-status', role: 'status' });
  const remove = el('button', { type: 'button', 'aria-label': `Remove pane ${n}` }, 'Remove');
  const section = el(
    'section',
    { class: 'chat-pane', 'aria-labelledby': title },
    el('div', { class: 'chat-pane-head' }, el('h2', { id: title }, `Pane ${n}`), remove),
    el('div', { class: 'field' }, el('label', { for: select.id }, 'Model'), select),
    output,
    status,
  );
  const pane = { n, section, select, output, status, remove, history: [] };
  remove.addEventListener('click', () => removePane(pane));
  select.addEventListener('change', () => setText(status, pane.history.length > 0 ? 'Model changed: the next answer uses it, with this pane\'s conversation so far.' : ''));
  panes.push(pane);
  byId('chat-panes').append(section);
  fill(pane);
  updateButtons();
  return pane;
}

function removePane(pane) {
  const at = panes.indexOf(pane);
  if (at < 0 || panes.length <= 1) return;
  panes.splice(at, 1);
  pane.section.remove();
  updateButtons();
  (panes[at] ?? panes[at - 1]).select.focus();
}

function updateButtons() {
  const busy = controller !== null;
  byId('chat-add-pane').disabled = busy || panes.length >= MAX_PANES;
  for (const pane of panes) pane.remove.disabled = busy || panes.length <= 1;
  byId('chat-send').disabled = busy;
  byId('chat-stop').disabled = !busy;
  byId('chat-reset').disabled = busy;
}

function message(role, text) {
  const body = document.createTextNode(text);
  const node = el('div', { class: `msg ${role}` }, el('span', { class: 'who' }, role === 'user' ? 'You' : 'Model'), el('span', { class: 'text' }, body));
  return { node, body };
}

// Keeps the newest text in view unless the reader scrolled up.
function follow(output, atBottom) {
  if (atBottom) output.scrollTop = output.scrollHeight;
}

// ----- Asking. -----

async function ask(pane, settings, signal) {
  const model = pane.select.value;
  const messages = [...(settings.system ? [{ role: 'system', content: settings.system }] : []), ...pane.history];
  const reply = message('assistant', '');
  pane.output.append(reply.node);
  pane.output.setAttribute('aria-busy', 'true');
  setText(pane.status, `Waiting for ${model} (a model or adapter loads on first use, which can take a while)…`);
  const started = performance.now();
  let first = null;
  let pieces = 0;
  let text = '';
  let finish = null;
  let problem = null;
  let stopped = false;
  try {
    const response = await fetch('/v1/chat/completions', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream', ...authHeaders() },
      body: JSON.stringify({ model, messages, stream: true, max_tokens: settings.maxTokens, temperature: settings.temperature }),
      signal,
      cache: 'no-store',
    });
    if (!response.ok) {
      problem = `HTTP ${response.status}: ${(await serverMessage(response)) || response.statusText}`;
    } else {
      await readEvents(response, ({ data }) => {
        if (data === '[DONE]') return false;
        let chunk;
        try {
          chunk = JSON.parse(data);
        } catch {
          return true;
        }
        if (chunk?.error) {
          problem = chunk.error.message ?? JSON.stringify(chunk.error);
          return true;
        }
        const choice = chunk?.choices?.[0];
        const piece = choice?.delta?.content;
        if (typeof piece === 'string' && piece !== '') {
          const atBottom = pane.output.scrollHeight - pane.output.scrollTop - pane.output.clientHeight < 40;
          first ??= performance.now();
          pieces += 1;
          text += piece;
          reply.body.appendData(piece);
          follow(pane.output, atBottom);
          if (pieces === 1) setText(pane.status, 'Answering…');
        }
        if (choice?.finish_reason) finish = choice.finish_reason;
        return true;
      });
    }
  } catch (error) {
    if (error?.name === 'AbortError') stopped = true;
    else problem = text ? `The stream broke off: ${error?.message ?? error}` : 'No answer: the node is unreachable (network error).';
  }
  pane.output.setAttribute('aria-busy', 'false');
  const seconds = ((performance.now() - started) / 1000).toFixed(1);
  if (text) pane.history.push({ role: 'assistant', content: text });
  else {
    reply.node.remove();
    // Without an answer the question leaves the conversation, so that the next turn alternates.
    pane.history.pop();
  }
  if (problem) {
    pane.status.classList.add('error');
    setText(pane.status, `Error: ${problem}`);
  } else {
    pane.status.classList.remove('error');
    const timing = `${pieces} token${pieces === 1 ? '' : 's'} in ${seconds} s${first ? `, first after ${((first - started) / 1000).toFixed(1)} s` : ''}`;
    const why = stopped ? 'stopped' : finish === 'length' ? 'cut at the token limit' : finish ? `finished (${finish})` : 'ended';
    setText(pane.status, `${timing}; ${why}.`);
  }
}

function readSettings() {
  const checks = [
    [byId('chat-max-tokens'), integer(1, 1 << 20)],
    [byId('chat-temperature'), decimal({ above: -1e-9, max: 2 })],
  ];
  const values = [];
  let bad = null;
  for (const [input, parse] of checks) {
    const result = parse(input.value, input);
    showError(input, result.error ?? null);
    if (result.error) bad ??= input;
    values.push(result.value);
  }
  if (bad) {
    bad.closest('details').open = true;
    bad.focus();
    return null;
  }
  return { maxTokens: values[0], temperature: values[1], system: byId('chat-system').value.trim() };
}

async function send(event) {
  event.preventDefault();
  if (controller) return;
  const prompt = byId('chat-prompt');
  const text = prompt.value.trim();
  showError(prompt, text ? null : 'Write something to ask first.');
  if (!text) {
    prompt.focus();
    return;
  }
  const settings = readSettings();
  if (!settings) return;
  const active = panes.filter((p) => p.select.value);
  if (active.length === 0) {
    showError(prompt, 'Pick a model in at least one pane.');
    panes[0].select.focus();
    return;
  }
  controller = new AbortController();
  updateButtons();
  setText(byId('chat-status'), `Asking ${active.length} model${active.length === 1 ? '' : 's'}…`);
  for (const pane of active) {
    pane.history.push({ role: 'user', content: text });
    pane.output.append(message('user', text).node);
    pane.output.scrollTop = pane.output.scrollHeight;
  }
  prompt.value = '';
  await Promise.all(active.map((pane) => ask(pane, settings, controller.signal)));
  const wasStopped = controller.signal.aborted;
  controller = null;
  updateButtons();
  setText(byId('chat-status'), wasStopped ? 'Stopped.' : 'Done.');
  prompt.focus();
}

function reset() {
  for (const pane of panes) {
    pane.history = [];
    pane.output.replaceChildren();
    setText(pane.status, '');
  }
  setText(byId('chat-status'), 'New conversation: every pane starts afresh.');
  byId('chat-prompt').focus();
}

byId('chat-form').addEventListener('submit', send);
byId('chat-prompt').addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    byId('chat-form').requestSubmit();
  }
});
byId('chat-stop').addEventListener('click', () => controller?.abort());
byId('chat-add-pane').addEventListener('click', () => addPane()?.select.focus());
byId('chat-reset').addEventListener('click', reset);
byId('chat-models-refresh').addEventListener('click', () => loadChoices());

export function enter() {
  if (!loaded) {
    loaded = true;
    addPane();
    addPane();
  }
  loadChoices();
}

export function leave() {}
