// Building DOM nodes without HTML strings: every piece of text goes in as a text node, so
// nothing the node's API returns can become markup.

// el('p', { class: 'notice' }, 'text', otherNode) -> <p class="notice">text…</p>
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    node.setAttribute(name, String(value));
  }
  node.append(...children.map((child) => (child instanceof Node ? child : String(child))));
  return node;
}

// One cell's text for any JSON value.
export function cellText(value) {
  if (value === null || value === undefined) return '';
  if (typeof value === 'object') return JSON.stringify(value);
  return String(value);
}

// A table for a JSON array: objects give one column per key (in first-seen order), anything
// else gives a single "Value" column. The wrapper scrolls sideways on its own, so a wide table
// never makes the page scroll.
export function jsonTable(rows, caption) {
  const objects = rows.every((row) => row !== null && typeof row === 'object' && !Array.isArray(row));
  const columns = objects ? [...new Set(rows.flatMap((row) => Object.keys(row)))] : ['Value'];
  const head = el('tr', {}, ...columns.map((name) => el('th', { scope: 'col' }, name)));
  const body = rows.map((row) =>
    el('tr', {}, ...columns.map((name) => el('td', {}, cellText(objects ? row[name] : row)))),
  );
  const table = el('table', {}, el('caption', {}, caption), el('thead', {}, head), el('tbody', {}, ...body));
  return el('div', { class: 'table-wrap', role: 'region', 'aria-label': caption, tabindex: 0 }, table);
}
