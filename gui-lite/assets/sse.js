// Server-sent events, two ways:
// - `readEvents` parses a fetch() response body as it arrives (the chat's POST streams, which
//   EventSource cannot send);
// - `watch` follows a GET stream with EventSource, which reconnects by itself, and falls back to
//   polling when the node does not offer the stream.

import { getJson, describeFailure } from './api.js';

// Calls onEvent({ event, data }) for each event of the body; stops early when onEvent returns
// false. Rejects with the AbortError when the fetch's signal aborts.
export async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let event = '';
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf('\n')) >= 0) {
        const line = buffer.slice(0, end).replace(/\r$/, '');
        buffer = buffer.slice(end + 1);
        if (line === '') {
          // A blank line ends an event.
          if (data.length > 0 && onEvent({ event: event || 'message', data: data.join('\n') }) === false) return;
          event = '';
          data = [];
        } else if (!line.startsWith(':')) {
          const colon = line.indexOf(':');
          const field = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
          if (field === 'data') data.push(text);
          else if (field === 'event') event = text;
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// Follows `url` (GET, server-sent events) and calls
//   onEvent(name, data)   for every named event in `names`,
//   onState(text, kind)   with 'live', 'reconnecting', 'polling' or 'problem' and a sentence,
//   poll()                every `pollMs` when the stream is unavailable (then its result
//                         stands in for the events).
// Returns stop().
export function watch(url, { names, onEvent, onState, poll, pollMs = 3000 }) {
  let source = null;
  let timer = null;
  let stopped = false;

  const startPolling = async () => {
    // Why the stream failed: EventSource does not say, a plain GET does.
    const probe = await getJson(url);
    if (stopped) return;
    const why = probe.kind === 'not-json' ? 'the stream closed' : describeFailure(probe);
    onState(`Live updates are unavailable (GET ${url}: ${why}); checking every ${pollMs / 1000} s instead.`, 'polling');
    poll();
    timer = setInterval(poll, pollMs);
  };

  source = new EventSource(url);
  source.addEventListener('open', () => onState('Live: updates arrive as they happen.', 'live'));
  for (const name of names) {
    source.addEventListener(name, (event) => {
      let data = null;
      try {
        data = JSON.parse(event.data);
      } catch {
        onState(`The node sent an event that is not JSON (${name}).`, 'problem');
        return;
      }
      onEvent(name, data);
    });
  }
  // The node's own `failed` event says why it stopped the stream.
  source.addEventListener('failed', (event) => {
    if (stopped) return;
    let message = event.data;
    try {
      message = JSON.parse(event.data).error ?? message;
    } catch {
      // Plain text: shown as it is.
    }
    onState(`The node reported: ${message}`, 'problem');
  });
  source.addEventListener('error', () => {
    if (stopped) return;
    if (source.readyState === EventSource.CLOSED) {
      source.close();
      source = null;
      startPolling();
    } else {
      onState('Connection lost; reconnecting…', 'reconnecting');
    }
  });

  return function stop() {
    stopped = true;
    if (source) source.close();
    if (timer !== null) clearInterval(timer);
  };
}
