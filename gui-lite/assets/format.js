// Turning API values into short text for people: durations, byte counts, peer ids, losses and
// credits. Pure functions, no DOM.

// 93784 -> "1 d 2 h 3 min 4 s"; leading zero units are left out.
export function formatUptime(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return 'unknown';
  let rest = Math.floor(seconds);
  const parts = [];
  for (const [unit, size] of [['d', 86400], ['h', 3600], ['min', 60]]) {
    const count = Math.floor(rest / size);
    rest -= count * size;
    if (count > 0 || parts.length > 0) parts.push(`${count} ${unit}`);
  }
  parts.push(`${rest} s`);
  return parts.join(' ');
}

// A rough duration for estimates: "45 s", "3 min", "1 h 20 min".
export function formatDuration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return 'unknown';
  const s = Math.round(seconds);
  if (s < 90) return `${s} s`;
  const minutes = Math.round(s / 60);
  if (minutes < 90) return `${minutes} min`;
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

// 1536 -> "1.5 KiB".
export function formatBytes(bytes) {
  if (!Number.isFinite(bytes) || bytes < 0) return 'unknown';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

// 1234567 -> "1,234,567" in the reader's locale.
export function formatCount(n) {
  return Number.isFinite(n) ? n.toLocaleString() : 'unknown';
}

// The first characters of a peer id, job id or hash, enough to tell them apart on a page.
export function shortId(id, length = 10) {
  if (typeof id !== 'string' || id === '') return 'unknown';
  return id.length > length + 1 ? `${id.slice(0, length)}…` : id;
}

// A loss to four significant digits, or an em dash when there is none.
export function formatLoss(x) {
  return typeof x === 'number' && Number.isFinite(x) ? x.toPrecision(4) : '—';
}

// A unix time in ms as local date and time.
export function formatTime(ms) {
  return Number.isFinite(ms) && ms > 0 ? new Date(ms).toLocaleString() : 'unknown';
}

// Credits travel as decimal strings with nine decimals ("-1.250000000"); sums are kept exact
// in BigInt units of 1e-9.
const UNITS = 1_000_000_000n;

export function parseCredit(text) {
  const match = /^(-?)(\d+)(?:\.(\d{1,9}))?$/.exec(String(text ?? '').trim());
  if (!match) return null;
  const units = BigInt(match[2]) * UNITS + BigInt((match[3] ?? '').padEnd(9, '0'));
  return match[1] === '-' ? -units : units;
}

export function formatCredit(units) {
  const sign = units < 0n ? '-' : '';
  const abs = units < 0n ? -units : units;
  const fraction = (abs % UNITS).toString().padStart(9, '0').replace(/0+$/, '');
  return `${sign}${abs / UNITS}${fraction ? `.${fraction}` : ''}`;
}

export function creditNumber(units) {
  return Number(units) / Number(UNITS);
}
