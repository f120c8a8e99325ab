// Reading the node's JSON API.
//
// `getJson` never throws: it resolves to one of
//   { kind: 'ok', status, data }          HTTP 2xx with a JSON body
//   { kind: 'unreachable', status: 0 }    no HTTP answer at all (node down, network error)
//   { kind: 'http', status, statusText }  an HTTP answer that is not 2xx
//   { kind: 'not-json', status, type }    HTTP 2xx whose body is not JSON
// so that every page handles every outcome explicitly.

export async function getJson(path) {
  let response;
  try {
    response = await fetch(path, { headers: { Accept: 'application/json' }, cache: 'no-store' });
  } catch {
    return { kind: 'unreachable', status: 0 };
  }
  if (!response.ok) {
    return { kind: 'http', status: response.status, statusText: response.statusText };
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

// A short human description of a failed result, e.g. "HTTP 503 Service Unavailable".
export function describeFailure(result) {
  switch (result.kind) {
    case 'unreachable':
      return 'no answer, network error';
    case 'http':
      return `HTTP ${result.status}${result.statusText ? ` ${result.statusText}` : ''}`;
    case 'not-json':
      return `HTTP ${result.status}, but ${result.type || 'no content type'} instead of JSON`;
    default:
      return `HTTP ${result.status}`;
  }
}
