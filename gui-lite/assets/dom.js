// Building DOM nodes without HTML strings: every piece of text goes in as a text node, so
// nothing the node's API returns can become markup.

export const byId = (id) => document.getElementById(id);

// el('p', { class: 'notice' }, 'text', otherNode) -> <p class="notice">text…</p>
// Attributes whose value is false, null or undefined are left out; true gives a bare attribute.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    node.setAttribute(name, value === true ? '' : String(value));
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined).map((c) => (c instanceof Node ? c : String(c))));
  return node;
}

// Replaces an element's text only when it changes, so that live regions are not re-announced
// on every refresh.
export function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

// One cell's text for any JSON value.
export function cellText(value) {
  if (value === null || value === undefined) return '';
  if (typeof value === 'object') return JSON.stringify(value);
  return String(value);
}

// A table that scrolls sideways on its own, so a wide table never makes the page scroll.
// columns: [{ label, cell: (row) => text or Node, numeric? }]
export function table(rows, columns, caption, attrs = {}) {
  const head = el('tr', {}, ...columns.map((c) => el('th', { scope: 'col', class: c.numeric ? 'num' : null }, c.label)));
  const body = rows.map((row) =>
    el('tr', {}, ...columns.map((c) => el('td', { class: c.numeric ? 'num' : null }, c.cell(row) ?? ''))),
  );
  const t = el('table', attrs, el('caption', {}, caption), el('thead', {}, head), el('tbody', {}, ...body));
  return el('div', { class: 'table-wrap', role: 'region', 'aria-label': caption, tabindex: 0 }, t);
}

// A table for a JSON array: objects give one column per key (in first-seen order), anything
// else gives a single "Value" column.
export function jsonTable(rows, caption) {
  const objects = rows.every((row) => row !== null && typeof row === 'object' && !Array.isArray(row));
  const keys = objects ? [...new Set(rows.flatMap((row) => Object.keys(row)))] : [null];
  const columns = keys.map((key) => ({ label: key ?? 'Value', cell: (row) => cellText(key === null ? row : row[key]) }));
  return table(rows, columns, caption);
}

// <code title="full id">short…</code>: a long id that still reads whole on hover; without
// `short` the whole id, broken anywhere to fit.
export function idCode(id, short) {
  return short === undefined ? el('code', { class: 'id long' }, id) : el('code', { class: 'id', title: id }, short);
}

// A paragraph that says there is nothing to show.
export function notice(text) {
  return el('p', { class: 'notice' }, text);
}

// An error box that screen readers announce.
export function alertBox(text) {
  return el('div', { class: 'alert', role: 'alert' }, text);
}

// A checkbox with its label (controls built in scripts are always labelled).
export function checkbox(id, label, attrs = {}) {
  const input = el('input', { type: 'checkbox', id, ...attrs });
  return { input, row: el('span', { class: 'check' }, input, el('label', { for: id }, label)) };
}

// <dl> rows from [term, value] pairs; values may be text or nodes; null values are left out.
export function facts(pairs) {
  return pairs.filter(([, v]) => v !== null && v !== undefined).flatMap(([term, value]) => [el('dt', {}, term), el('dd', {}, value)]);
}
