// The dashboard shell: hash routing (#/train, #/chat, ...) between the <section data-page>
// elements of index.html, aria-current on the active nav link, focus on the page's heading,
// and each page module's enter() and leave(). An address with #token=TOKEN (as the node prints
// it) stores the token and opens the Train page.

import { takeTokenFromHash } from './api.js';
import * as chat from './chat.js';
import * as credits from './credits.js';
import * as datanets from './datanets.js';
import * as network from './network.js';
import './token.js';
import * as train from './train.js';

const DEFAULT_PAGE = 'network';
const PAGES = { train, chat, datanets, credits, network };

const sections = new Map([...document.querySelectorAll('main section[data-page]')].map((s) => [s.dataset.page, s]));
const links = [...document.querySelectorAll('nav a[href^="#/"]')];

let current = null;

function show(name, { focus }) {
  if (current !== null && current !== name) PAGES[current].leave();
  current = name;
  for (const [page, section] of sections) section.hidden = page !== name;
  for (const link of links) {
    if (link.getAttribute('href') === `#/${name}`) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  const heading = sections.get(name).querySelector('h1');
  document.title = `${heading.textContent} · Cohort`;
  if (focus) heading.focus();
  PAGES[name].enter();
}

function route({ focus }) {
  if (takeTokenFromHash()) focus = false;
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

window.addEventListener('hashchange', () => route({ focus: true }));
route({ focus: false });
