// The dashboard end to end in headless Chromium (Debian's package), against a live
// `cohort demo --quick` whose demo.json is COHORT_DEMO_JSON: open the address the demo printed,
// create a job on the Train page with non-default values (after an invalid one is refused inline),
// (an earlier datanet version among them) watch its loss chart fill, chat with the base and the job's adapter side by side, create a
// datanet and import a file by upload, read the credits and verify the ledger, switch
// volunteering on the Network page, and look at a phone-width page. A screenshot of each page
// goes to COHORT_ARTIFACTS. Exits non-zero with the reason on the first failure.
//
// Run by tests/tests/browser.rs (cargo test -p cohort-tests --test browser).

import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const info = JSON.parse(readFileSync(process.env.COHORT_DEMO_JSON, 'utf8'));
const artifacts = process.env.COHORT_ARTIFACTS;
const api = info.api;
const model = info.model; // the tiny model's file name in the demo's model cache
const base = model.replace(/\.gguf$/, '');

const problems = [];
const step = (what) => console.log(`- ${what}`);
function check(condition, what) {
  if (!condition) throw new Error(`check failed: ${what}`);
}

async function apiGet(path) {
  const response = await fetch(`${api}${path}`);
  check(response.ok, `GET ${path}: HTTP ${response.status}`);
  return response.json();
}

const browser = await chromium.launch({
  executablePath: process.env.COHORT_CHROMIUM ?? '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.setDefaultTimeout(30_000);
  // Script errors and console errors (CSP violations land there) fail the run, except the
  // HTTP errors this script provokes on purpose.
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error' && !/status of 4\d\d/.test(m.text())) problems.push(`console: ${m.text()}`);
  });
  page.on('requestfailed', (r) => {
    if (!r.url().startsWith(api)) problems.push(`request to another origin: ${r.url()}`);
  });
  const shot = (name) => page.screenshot({ path: join(artifacts, `${name}.png`), fullPage: true });

  // The address the demo printed: the token goes into the page's storage, the Train page opens.
  step('open the dashboard with its token');
  await page.goto(info.dashboard);
  await page.waitForFunction(() => window.location.hash === '#/train');
  check((await page.evaluate(() => localStorage.getItem('cohort.token'))) === info.token, 'the token was stored');

  // Train: a bad value is refused inline before anything starts.
  step('Train: an invalid rank is refused inline');
  await page.waitForSelector(`#train-model option[value="${model}"]`, { state: 'attached' });
  await page.selectOption('#train-model', model);
  await page.waitForSelector('#train-datanet-list input[name="datanets"]');
  const boxes = page.locator('#train-datanet-list input[name="datanets"]');
  check((await boxes.count()) >= 2, 'both datanets are offered');
  for (let i = 0; i < (await boxes.count()); i++) await boxes.nth(i).check();
  const jobsBefore = (await apiGet('/api/jobs')).jobs.length;
  await page.fill('#train-rank', '0');
  await page.click('#train-start');
  await page.waitForFunction(() => document.getElementById('train-rank-error').textContent.trim() !== '');
  check((await apiGet('/api/jobs')).jobs.length === jobsBefore, 'no job was created from an invalid form');

  step('Train: start a job with non-default values');
  await page.fill('#train-name', 'browser-job');
  await page.fill('#train-rank', '4');
  await page.fill('#train-alpha', '8');
  await page.uncheck('#target-down_proj');
  await page.fill('#train-lr', '0.02');
  await page.fill('#train-epochs', '1');
  await page.fill('#train-batch', '4');
  await page.fill('#train-seq-len', '256');
  await page.fill('#train-rounds', '2');
  await page.fill('#train-min-updates', '2');
  await page.fill('#train-max-workers', '2');
  await page.click('summary:has-text("Phase lengths")');
  await page.fill('#train-enroll-secs', '2');
  await page.fill('#train-train-secs', '120');
  await page.fill('#train-validate-secs', '120');
  // velmora-atlas at its first version, before the contribution was approved.
  const atlasBox = page.locator('#train-datanet-list .datanet-pick', { hasText: 'velmora-atlas' }).locator('select');
  await atlasBox.selectOption('1');
  await page.click('#train-start');
  await page.waitForFunction(() => /^[0-9a-f]{8,}/.test(document.getElementById('job-id').textContent.trim()));
  const jobs = (await apiGet('/api/jobs')).jobs;
  const job = jobs.find((j) => j.name === 'browser-job');
  check(job, 'the job is listed by the node');
  const created = await apiGet(`/api/jobs/${job.job}`);
  check(created.spec.rank === 4 && Math.abs(created.spec.learning_rate - 0.02) < 1e-6, 'the job has the values typed');
  check(!created.spec.targets.includes('down_proj'), 'the unticked target module is left out');
  const versions = created.spec.datanets.map((d) => d.version).sort();
  check(JSON.stringify(versions) === '[1,1]', `velmora-atlas v1 and velmora-archive v1 (${JSON.stringify(created.spec.datanets)})`);

  // The chart fills as the rounds close: a validation point per round, training losses.
  step('Train: watch the loss chart fill until the job finishes');
  await page.waitForFunction(
    () => document.getElementById('job-phase').textContent.toLowerCase().includes('finished'),
    null,
    { timeout: 240_000 },
  );
  const finished = await apiGet(`/api/jobs/${job.job}`);
  check(finished.finished === true, 'the node says the job finished');
  const merged = finished.closed_rounds.filter((r) => r.outcome === 'Merged' || r.outcome === 'Stopped');
  check(merged.length >= 1, `a round merged (outcomes ${finished.closed_rounds.map((r) => r.outcome)})`);
  const dots = await page.locator('#job-chart circle').count();
  check(dots >= merged.length, `the chart shows the validation losses (${dots} points)`);
  const paths = await page.locator('#job-chart path, #job-chart polyline').count();
  check(paths >= 1, 'the chart draws loss curves');
  await shot('train');

  // Chat: the base and the job's latest adapter side by side, streamed.
  step('Chat: the base and the adapter answer side by side');
  await page.goto(`${api}/#/chat`);
  const adapterId = `${finished.base_model}:${job.job}`;
  await page.waitForSelector('#chat-model-1');
  await page.waitForSelector('#chat-model-2');
  const options = await page.locator('#chat-model-1 option').evaluateAll((os) => os.map((o) => o.value));
  check(options.includes(base), `the base model is offered (${options.join(', ')})`);
  await page.selectOption('#chat-model-1', base);
  const adapterOptions = await page.locator('#chat-model-2 option').evaluateAll((os) => os.map((o) => o.value));
  check(adapterOptions.includes(adapterId), `the job's adapter is offered (${adapterOptions.join(', ')})`);
  await page.selectOption('#chat-model-2', adapterId);
  await page.click('summary:has-text("Generation settings")');
  await page.fill('#chat-max-tokens', '12');
  await page.fill('#chat-prompt', 'What is the capital of Velmora?');
  await page.click('#chat-send');
  // Both answers stream in and end with their token counts.
  await page.waitForFunction(
    () => {
      const panes = [...document.querySelectorAll('.chat-pane')].slice(0, 2);
      return panes.length === 2 && panes.every((p) => /\d+ tokens? in/.test(p.textContent));
    },
    null,
    { timeout: 60_000 },
  );
  await shot('chat');

  // Datanets: the demo's two, a new one created here, and a file imported by upload.
  step('Datanets: browse, create, import by upload, publish');
  await page.goto(`${api}/#/datanets`);
  await page.waitForFunction(() => {
    const text = document.getElementById('datanets-list').textContent;
    return text.includes('velmora-atlas') && text.includes('velmora-archive');
  });
  // The private one: who it is granted to (the job owner and both volunteers).
  await page.click('#datanets-list button:has-text("velmora-archive")');
  await page.waitForFunction(() => document.getElementById('datanet-detail').textContent.includes('Granted to'));
  const grantees = await page.locator('#datanet-facts dd ul li').count();
  check(grantees === 3, `velmora-archive is granted to 3 peers (${grantees} listed)`);
  await page.fill('#create-name', 'browser-notes');
  await page.click('#create-submit');
  await page.waitForSelector('#datanet-detail:not([hidden])');
  await page.waitForFunction(() => document.getElementById('datanet-detail').textContent.includes('browser-notes'));
  const record = (q, a) => JSON.stringify({ messages: [{ role: 'user', content: q }, { role: 'assistant', content: a }] });
  const upload = [record('What colour is the sea at Tarsk?', 'Grey-green, most of the year.'), record('Who keeps the lighthouse?', 'The harbour guild.')].join('\n') + '\n';
  await page.setInputFiles('#datanet-files', { name: 'notes.jsonl', mimeType: 'application/jsonl', buffer: Buffer.from(upload) });
  await page.click('#datanet-import');
  await page.waitForFunction(() => /record|shard/i.test(document.getElementById('datanet-result').textContent));
  await page.click('#datanet-publish');
  await page.waitForFunction(async () => {
    const r = await fetch('/api/datanets/browser-notes');
    return r.ok && (await r.json()).version >= 1;
  });
  const notes = await apiGet('/api/datanets/browser-notes');
  check(notes.records === 2 || notes.version >= 1, 'the uploaded records were published');
  await shot('datanets');

  // Credits: the demo's job in the ledger, a chart, and every chain verified.
  step('Credits: the ledger as people read it');
  await page.goto(`${api}/#/credits`);
  await page.waitForSelector('#credits-table tbody tr');
  check((await page.locator('#credits-table tbody tr').count()) > 0, 'credit rows');
  await page.waitForFunction(() => document.querySelectorAll('#credits-chart rect, #credits-chart .chart-bar-row').length > 0);
  await page.click('#credits-verify');
  await page.waitForSelector('#credits-verify-result .ok, #credits-verify-result .alert', { timeout: 120_000 });
  const verdict = await page.textContent('#credits-verify-result');
  check(/Every chain verified/.test(verdict), `the ledger verifies: ${verdict}`);
  await shot('credits');

  // Network: peers, jobs, the volunteer switch.
  step('Network: peers, jobs and the volunteer switch');
  await page.goto(`${api}/#/network`);
  await page.waitForFunction(() => document.getElementById('network-peers').textContent.trim() !== '');
  const was = (await apiGet('/api/volunteer')).enabled;
  await page.click('#network-volunteer');
  await page.waitForFunction(async (before) => {
    const r = await fetch('/api/volunteer');
    return r.ok && (await r.json()).enabled !== before;
  }, was);
  await shot('network');

  // A phone's width: nothing scrolls sideways.
  step('a 360 px wide page does not scroll sideways');
  await page.setViewportSize({ width: 360, height: 800 });
  await page.goto(`${api}/#/train`);
  await page.waitForSelector('#train-form');
  const wide = await page.evaluate(() => document.scrollingElement.scrollWidth);
  check(wide <= 361, `the page is ${wide} px wide at 360`);
  await shot('train-phone');

  check(problems.length === 0, `no script, console or cross-origin errors:\n${problems.join('\n')}`);
  console.log('dashboard: every step passed');
} catch (e) {
  console.error(e.message);
  if (problems.length > 0) console.error(problems.join('\n'));
  process.exitCode = 1;
} finally {
  await browser.close();
}
