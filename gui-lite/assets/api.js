// Talking to the node's JSON API.
//
// `getJson` and `postJson` never throw: they resolve to one of
//   { kind: 'ok', status, data }                   HTTP 2xx with a JSON body
//   { kind: 'unreachable', status: 0 }             no HTTP answer at all (node down, network error)
//   { kind: 'http', status, statusText, message }  an HTTP answer that is not 2xx; `message` is
//                                                  the server's own words ({"error": ...}) or ''
//   { kind: 'not-json', status, type }             HTTP 2xx whose body is not JSON
//   { kind: 'no-token', status: 0 }                a change was not sent: no API token is stored
// so that every page handles every outcome explicitly.
//
// Changes (POST) carry `Authorization: Bearer TOKEN`. The node prints the dashboard's address
// with #token=TOKEN after it; `takeTokenFromHash` keeps that token in localStorage. When
// a change needs a token that is missing or refused, a `cohort:token-needed` event asks the page
// to show the token form (token.js).

const TOKEN_KEY = 'cohort.token';
let memoryToken = ''; // where the token lives when localStorage is unavailable

export function getToken() {
  try {
    return window.localStorage.getItem(TOKEN_KEY) ?? '';
  } catch {
    return memoryToken;
  }
}

export function setToken(token) {
  memoryToken = token;
  try {
    if (token) window.localStorage.setItem(TOKEN_KEY, token);
    else window.localStorage.removeItem(TOKEN_KEY);
  } catch {
    // Storage is off (private mode, a policy): the token lasts until the page is closed.
  }
}

// On #token=TOKEN: keep the token and show the Train page instead, without a history entry.
// Returns whether the address carried a token.
export function takeTokenFromHash() {
  const hash = window.location.hash;
  if (!hash.startsWith('#token=')) return false;
  let token = hash.slice('#token='.length);
  try {
    token = decodeURIComponent(token);
  } catch {
    // Not percent-encoded: use it as written.
  }
  if (token) setToken(token.trim());
  window.history.replaceState(null, '', '#/train');
  return true;
}

// Authorization for /v1/* as well: harmless when the node asks for no key there.
export function authHeaders() {
  const token = getToken();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function askForToken(message) {
  window.dispatchEvent(new CustomEvent('cohort:token-needed', { detail: { message } }));
}

// The server's own error text: {"error": "..."} (the node), {"error": {"message": ...}}
// (the OpenAI routes), or a short plain-text body (axum's rejections).
export async function serverMessage(response) {
  let text = '';
  try {
    text = await response.text();
  } catch {
    return '';
  }
  try {
    const body = JSON.parse(text);
    if (typeof body?.error === 'string') return body.error;
    if (typeof body?.error?.message === 'string') return body.error.message;
  } catch {
    // Not JSON: the text itself, below.
  }
  text = text.trim();
  return text.length > 500 ? `${text.slice(0, 500)}…` : text;
}

async function answer(response) {
  if (!response.ok) {
    return { kind: 'http', status: response.status, statusText: response.statusText, message: await serverMessage(response) };
  }
  const type = response.headers.get('Content-Type') ?? '';
  if (!/^application\/([\w.+-]+\+)?json\b/i.test(type)) {
    return { kind: 'not-json', status: response.status, type };
  }
  try {
    return { kind: 'ok', status: response.status, data: await response.json() };
  } catch {
    return { kind: 'not-json', status: response.status, type };
  }
}

// `auth` sends the stored token as well (for /v1/*, where a node may require an API key).
export async function getJson(path, { auth = false } = {}) {
  let response;
  try {
    const headers = { Accept: 'application/json', ...(auth ? authHeaders() : {}) };
    response = await fetch(path, { headers, cache: 'no-store' });
  } catch {
    return { kind: 'unreachable', status: 0 };
  }
  return answer(response);
}

// POSTs `body` as JSON (or nothing when it is undefined) with the stored token.
export async function postJson(path, body) {
  const token = getToken();
  if (!token) {
    askForToken(`POST ${path} changes the node, so it needs the node's API token.`);
    return { kind: 'no-token', status: 0 };
  }
  const headers = { Accept: 'application/json', Authorization: `Bearer ${token}` };
  const init = { method: 'POST', headers, cache: 'no-store' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    return { kind: 'unreachable', status: 0 };
  }
  const result = await answer(response);
  if (result.kind === 'http' && result.status === 401) {
    askForToken(`The node refused the stored token (POST ${path}): ${result.message || 'HTTP 401'}`);
  }
  return result;
}

// A short human description of a failed result, e.g. "HTTP 409 Conflict: no published version".
export function describeFailure(result) {
  switch (result.kind) {
    case 'unreachable':
      return 'no answer, network error';
    case 'no-token':
      return 'not sent: no API token is stored';
    case 'http': {
      const head = `HTTP ${result.status}${result.statusText ? ` ${result.statusText}` : ''}`;
      return result.message ? `${head}: ${result.message}` : head;
    }
    case 'not-json':
      return `HTTP ${result.status}, but ${result.type || 'no content type'} instead of JSON`;
    default:
      return `HTTP ${result.status}`;
  }
}

// "GET /api/x failed: HTTP 404 Not Found: no job `abc` here", or "" for a success.
export function failureText(method, path, result) {
  if (result.kind === 'ok') return '';
  if (result.kind === 'unreachable') return `The node's API is unreachable (${method} ${path}: no answer).`;
  return `${method} ${path} failed: ${describeFailure(result)}.`;
}
