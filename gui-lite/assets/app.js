// The dashboard shell: hash routing (#/network, #/train, ...) between the <section data-page>
// elements of index.html, aria-current on the active nav link, and the Network page's controls.

import { copyPeerId, loadFeature, loadStatus } from './pages.js';

const DEFAULT_PAGE = 'network';
const REFRESH_MS = 5000;

const sections = new Map([...document.querySelectorAll('main section[data-page]')].map((s) => [s.dataset.page, s]));
const links = [...document.querySelectorAll('nav a[href^="#/"]')];
const autoRefresh = document.getElementById('status-auto');

let current = null;
let timer = null;

// Polls /api/status only while the Network page is shown, the box is ticked and the tab is visible.
function updateTimer() {
  const wanted = current === 'network' && autoRefresh.checked && !document.hidden;
  if (wanted && timer === null) {
    timer = setInterval(loadStatus, REFRESH_MS);
  } else if (!wanted && timer !== null) {
    clearInterval(timer);
    timer = null;
  }
}

function show(name, { focus }) {
  current = name;
  for (const [page, section] of sections) section.hidden = page !== name;
  for (const link of links) {
    if (link.getAttribute('href') === `#/${name}`) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  const section = sections.get(name);
  const heading = section.querySelector('h1');
  document.title = `${heading.textContent} · Cohort`;
  if (focus) heading.focus();
  if (name === 'network') loadStatus();
  else loadFeature(section);
  updateTimer();
}

function route({ focus }) {
  const hash = window.location.hash;
  const match = /^#\/([a-z]+)$/.exec(hash);
  if (match && sections.has(match[1])) {
    show(match[1], { focus });
  } else if (hash === '' || hash.startsWith('#/')) {
    // No page or an unknown one: show the default and say so in the address bar.
    window.history.replaceState(null, '', `#/${DEFAULT_PAGE}`);
    show(DEFAULT_PAGE, { focus });
  } else if (current === null) {
    // Another fragment (the skip link's #main) on first load: in-page, keep the default page.
    show(DEFAULT_PAGE, { focus: false });
  }
}

document.getElementById('status-refresh').addEventListener('click', () => loadStatus());
document.getElementById('copy-peer-id').addEventListener('click', () => copyPeerId());
autoRefresh.addEventListener('change', updateTimer);
document.addEventListener('visibilitychange', updateTimer);
window.addEventListener('hashchange', () => route({ focus: true }));
route({ focus: false });
