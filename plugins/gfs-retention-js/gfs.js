// gfs-retention in JavaScript: the twin of plugins/gfs-retention (Rust), answering exactly as
// it does (the host's tests compare the two over the same views). Built into a component with
// componentize-js (plugins/build-py-js.sh); the host calls the three exported functions.
//
// The interface's u64s (snapshot ids, times) arrive as BigInts: times are divided as BigInts,
// so periods are exact, then handled as Numbers.
import { get } from 'holdfast:policy/config@0.2.0';

const HOUR = 3_600_000n;
const DAY = 24n * HOUR;
// As in the Rust SDK (holdfast_policy::config::count).
const MAX_COUNT = 1_000_000_000;

// (year, month) of a day count since 1970-01-01 (Howard Hinnant's civil_from_days).
function yearMonth(days) {
  const z = days + 719_468;
  const era = Math.floor(z / 146_097);
  const doe = z - era * 146_097;
  const yoe = Math.floor((doe - Math.floor(doe / 1460) + Math.floor(doe / 36_524) - Math.floor(doe / 146_096)) / 365);
  const doy = doe - (365 * yoe + Math.floor(yoe / 4) - Math.floor(yoe / 100));
  const mp = Math.floor((5 * doy + 2) / 153);
  const m = mp < 10 ? mp + 3 : mp - 9;
  return [yoe + era * 400 + (m <= 2 ? 1 : 0), m];
}

// The period a snapshot taken at `ms` falls into, for each rule (UTC; ISO weeks).
function period(rule, ms) {
  const days = Number(ms / DAY);
  switch (rule) {
    case 'hourly': return Number(ms / HOUR);
    case 'daily': return days;
    case 'weekly': return Math.floor((days + 3) / 7);
    case 'monthly': { const [y, m] = yearMonth(days); return y * 12 + m; }
    default: return yearMonth(days)[0];
  }
}

function count(key) {
  const v = get(key);
  if (v === undefined) return 0;
  if (!/^[0-9]+$/.test(v)) throw `config ${key}="${v}" is not a count`;
  const n = Number(v);
  if (n > MAX_COUNT) throw `config ${key}="${v}" is too large (at most ${MAX_COUNT})`;
  return n;
}

// A string thrown from an export whose result is `result<_, string>` becomes its error.
export function describe() {
  return { name: 'gfs-retention-js', version: '0.2.0', phases: ['retention'] };
}

export function decideLocks(view) {
  return [];
}

export function planRetention(view) {
  const keepLast = count('keep-last');
  const rules = ['hourly', 'daily', 'weekly', 'monthly', 'yearly'].map((r) => [r, count(r)]);
  if (keepLast === 0 && rules.every(([, n]) => n === 0)) {
    throw 'no retention configured: set keep-last, hourly, daily, weekly, monthly or yearly';
  }
  const snaps = view.localSnapshots();
  const cmp = (a, b) => (a < b ? -1 : a > b ? 1 : 0);
  snaps.sort((a, b) => cmp(b.createdUnixMs, a.createdUnixMs) || cmp(b.id[0], a.id[0]) || cmp(b.id[1], a.id[1]));
  const keep = snaps.map((_, i) => (i < keepLast ? 'keep-last' : null));
  for (const [rule, n] of rules) {
    if (n === 0) continue;
    const covered = new Set();
    let kept = 0;
    snaps.forEach((s, i) => {
      const p = period(rule, s.createdUnixMs);
      if (keep[i] !== null) { covered.add(p); return; }
      if (kept < n && !covered.has(p)) { covered.add(p); keep[i] = rule; kept += 1; }
    });
  }
  const reason = `not kept by keep-last=${keepLast}` + rules.filter(([, n]) => n > 0).map(([r, n]) => `, ${r}=${n}`).join('');
  return snaps.filter((_, i) => keep[i] === null).map((s) => ({ snapshot: s.id, reason }));
}
