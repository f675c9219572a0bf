// holdfast's web page: plain DOM and SVG, drawn from /api/v1/. Every value from the API is
// written as text (text nodes, textContent, attribute values), never parsed as HTML, so a
// label or lock value holding markup shows as the characters it is.
"use strict";

const REFRESH_MS = 5000;
const SVG = "http://www.w3.org/2000/svg";
const state = { route: null, pages: {}, timer: null, loading: false };

// ---- building the page ---------------------------------------------------------------

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  setAttrs(e, attrs);
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function svg(tag, attrs, ...children) {
  const e = document.createElementNS(SVG, tag);
  setAttrs(e, attrs);
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function setAttrs(e, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "onclick") e.addEventListener("click", v);
    else e.setAttribute(k, String(v));
  }
}

function ago(ms) {
  if (ms === null || ms === undefined) return "never";
  const s = Math.round(ms / 1000);
  if (s < 60) return s + "s";
  const m = Math.floor(s / 60);
  if (m < 60) return m + "m " + (s % 60) + "s";
  const h = Math.floor(m / 60);
  if (h < 48) return h + "h " + (m % 60) + "m";
  return Math.floor(h / 24) + "d " + (h % 24) + "h";
}

function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i === 0 ? v : v.toFixed(1)) + " " + units[i];
}

function plural(n, word) {
  return n + " " + word + (n === 1 ? "" : "s");
}

function when(unixMs, now) {
  if (!unixMs) return "never";
  const d = new Date(unixMs);
  return d.toISOString().replace("T", " ").slice(0, 19) + " UTC (" + ago(now - unixMs) + " ago)";
}

function table(headers, rows, attrs) {
  return el("table", attrs,
    el("thead", {}, el("tr", {}, headers.map(h => el("th", {}, h)))),
    el("tbody", {}, rows.length ? rows : [el("tr", {}, el("td", { colspan: headers.length, class: "muted" }, "none"))]));
}

// Prev/next buttons for a paginated answer; `key` names the list in state.pages.
function pager(key, answer) {
  const offset = answer.offset, limit = answer.limit, total = answer.total;
  const go = o => () => { state.pages[key] = o; refresh(); };
  return el("div", { class: "pager", "data-list": key },
    el("button", { type: "button", disabled: offset === 0 ? "" : null, onclick: go(Math.max(0, offset - limit)) }, "‹ newer"),
    " ", total === 0 ? "0" : (offset + 1) + "–" + Math.min(total, offset + limit), " of " + total + " ",
    el("button", { type: "button", disabled: offset + limit >= total ? "" : null, onclick: go(offset + limit) }, "older ›"));
}

async function api(path) {
  const r = await fetch("/api/v1/" + path, { credentials: "same-origin", headers: { "Accept": "application/json" } });
  if (r.status === 401) { window.location.reload(); throw new Error("logged out"); }
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || body.message || ("HTTP " + r.status));
  return body;
}

const enc = encodeURIComponent;

// ---- the cascade map -------------------------------------------------------------------

function edgeLabel(e) {
  const lag = e["lag-ms"] === null || e["lag-ms"] === undefined ? "no snapshot yet" : ago(e["lag-ms"]) + " behind";
  return e.volume + " · " + lag + " · " + e.state;
}

async function mapPage() {
  const m = await api("cascade");
  const cols = new Map();
  for (const n of m.nodes) {
    if (!cols.has(n.depth)) cols.set(n.depth, []);
    cols.get(n.depth).push(n);
  }
  const colW = 380, rowH = 110, nodeW = 140, nodeH = 44, pad = 30;
  const depths = [...cols.keys()].sort((a, b) => a - b);
  const pos = new Map();
  let maxRows = 1;
  depths.forEach((d, ci) => {
    const list = cols.get(d);
    maxRows = Math.max(maxRows, list.length);
    list.forEach((n, ri) => pos.set(n.name, { x: pad + ci * colW, y: pad + ri * rowH }));
  });
  const width = pad * 2 + Math.max(1, depths.length - 1) * colW + nodeW;
  const height = pad * 2 + (maxRows - 1) * rowH + nodeH + 30;
  const g = svg("svg", { id: "map", width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "cascade map" });
  g.append(svg("defs", {}, svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 8, markerHeight: 8, orient: "auto-start-reverse" },
    svg("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrowhead" }))));
  // Edges between the same two nodes (several volumes) are spread apart.
  const pairs = new Map();
  for (const e of m.edges) {
    const a = pos.get(e.upstream), b = pos.get(e.downstream);
    if (!a || !b) continue;
    const key = e.upstream + "\u0000" + e.downstream;
    const k = pairs.get(key) || 0;
    pairs.set(key, k + 1);
    const x1 = a.x + nodeW, y1 = a.y + nodeH / 2 + k * 14, x2 = b.x, y2 = b.y + nodeH / 2 + k * 14;
    const bad = e.state === "failing" || e.state === "stale";
    const title = edgeLabel(e) + (e["last-transfer-unix-ms"] ? "\nlast transfer " + when(e["last-transfer-unix-ms"], Date.now()) : "") +
      (e.error ? "\n" + e.error : "") + "\nreported by " + e["reported-by"];
    g.append(svg("g", { class: "edge " + e.state + (bad ? " bad" : ""), "data-upstream": e.upstream, "data-downstream": e.downstream, "data-volume": e.volume, "data-lag-ms": e["lag-ms"] },
      svg("title", {}, title),
      svg("path", { d: `M ${x1} ${y1} C ${x1 + 60} ${y1}, ${x2 - 60} ${y2}, ${x2} ${y2}`, "marker-end": "url(#arrow)" }),
      svg("text", { x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 6, "text-anchor": "middle" }, edgeLabel(e))));
  }
  for (const n of m.nodes) {
    const p = pos.get(n.name);
    g.append(svg("g", { class: "node" + (n.this ? " this" : ""), "data-name": n.name, transform: `translate(${p.x},${p.y})` },
      svg("rect", { width: nodeW, height: nodeH, rx: 6 }),
      svg("text", { x: nodeW / 2, y: nodeH / 2 + 5, "text-anchor": "middle" }, n.name)));
  }
  const now = Date.now();
  const rows = m.edges.map(e => el("tr", { class: e.state === "failing" || e.state === "stale" ? "bad" : null },
    el("td", {}, el("a", { href: "#/volume/" + enc(e.volume) }, e.volume)),
    el("td", {}, e.upstream + " → " + e.downstream),
    el("td", {}, e["lag-ms"] === null ? "no snapshot yet" : ago(e["lag-ms"])),
    el("td", {}, e["last-transfer-unix-ms"] ? when(e["last-transfer-unix-ms"], now) : "not known here"),
    el("td", { class: "state " + e.state }, e.state),
    el("td", {}, e.error || ""),
    el("td", {}, e["reported-by"])));
  const unreachable = m.unreachable.map(u => el("li", { class: "error" }, u.node + " (asked by " + u["asked-by"] + "): " + u.error));
  return [
    el("h1", {}, "Cascade around ", m.node),
    el("p", { class: "muted" }, "Each arrow is a mirror relation: the volume, how old the downstream's newest snapshot is, and how its transfers go. Edges into this node come from its own jobs; edges below it from its downstreams' locks; edges above it from its upstreams."),
    el("div", { class: "mapbox" }, g),
    unreachable.length ? el("ul", { class: "unreachable" }, unreachable) : null,
    el("h2", {}, "Relations"),
    table(["Volume", "Relation", "Behind by", "Last transfer", "State", "Error", "Reported by"], rows, { id: "edges" }),
  ];
}

// ---- volumes -----------------------------------------------------------------------------

async function volumesPage() {
  const off = state.pages.volumes || 0;
  const v = await api(`volumes?offset=${off}&limit=100`);
  const rows = v.items.map(x => el("tr", {},
    el("td", {}, el("a", { href: "#/volume/" + enc(x.name) }, x.name)),
    el("td", {}, x.kind === "replica" ? x.origin : (x.source || "")),
    el("td", {}, x.snapshots),
    el("td", {}, x["newest-age-ms"] === null ? "none yet" : ago(x["newest-age-ms"]) + " ago"),
    el("td", {}, bytes(x.size)),
    el("td", {}, x.locks + " by " + x.holders + (x["stale-holders"] ? " (" + x["stale-holders"] + " stale)" : ""))));
  return [el("h1", {}, "Volumes"), pager("volumes", v),
    table(["Volume", "Source", "Snapshots", "Newest", "Size", "Locks"], rows, { id: "volumes" })];
}

function timelineSvg(t) {
  const W = 1000, H = 70;
  const all = t.snapshots.map(s => s[0]).concat(t.pruned.map(p => p[0]));
  const g = svg("svg", { id: "timeline", viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img", "aria-label": "snapshots over time" });
  if (!all.length) return g;
  // A loop, not Math.min(...all): spreading a hundred thousand values overflows the stack.
  let lo = Infinity, hi = -Infinity;
  for (const t of all) { if (t < lo) lo = t; if (t > hi) hi = t; }
  if (hi === lo) { lo -= 60000; hi += 60000; }
  const x = ms => 5 + (W - 10) * (ms - lo) / (hi - lo);
  // One path per kind: thousands of snapshots stay one element each kind.
  const marks = { kept: [], locked: [], pruned: [] };
  for (const s of t.snapshots) marks[s[1] ? "locked" : "kept"].push(`M${x(s[0]).toFixed(1)} 8v30`);
  for (const p of t.pruned) marks.pruned.push(`M${x(p[0]).toFixed(1)} 44v18`);
  for (const [k, d] of Object.entries(marks)) if (d.length) g.append(svg("path", { class: "mark " + k, d: d.join("") }));
  return g;
}

function lockLine(l, now) {
  const lease = l["lease-ms"] ? (l.stale ? "lease ran out" : "lease " + ago(l["lease-ms"]) + ", expires in " + ago(l["expires-unix-ms"] - now)) : "no lease";
  return el("li", { class: l.stale ? "stale" : null },
    el("span", { class: "holder" }, l.holder), " ", el("span", { class: "type" }, l.type), " ",
    el("span", { class: "value" }, l.value), " · set " + ago(now - l["set-unix-ms"]) + " ago · " + lease,
    l["path-text"] ? el("span", { class: "path" }, " · via " + l["path-text"]) : null);
}

async function volumePage(name) {
  const snapOff = state.pages["snapshots:" + name] || 0;
  const lockOff = state.pages["locks:" + name] || 0;
  const [v, t, h, s, l] = await Promise.all([
    api("volumes/" + enc(name)),
    api("volumes/" + enc(name) + "/timeline"),
    api("volumes/" + enc(name) + "/holders"),
    api("volumes/" + enc(name) + `/snapshots?offset=${snapOff}&limit=50`),
    api(`locks?volume=${enc(name)}&offset=${lockOff}&limit=50`),
  ]);
  const now = v["now-unix-ms"];
  const holders = h.holders.map(x => el("tr", { class: x.stale ? "bad" : null, "data-holder": x.holder },
    el("td", {}, x.holder), el("td", {}, x.kind), el("td", {}, x.locks + " on " + x.snapshots),
    el("td", {}, x.paths.join(", ") || "set here"),
    el("td", {}, ago(now - x["refreshed-unix-ms"]) + " ago" + (x.stale ? " (stale)" : "")),
    el("td", {}, x["lease-ms"] ? ago(x["lease-ms"]) : "none"),
    el("td", {}, plural(x["pinned-snapshots"], "snapshot") + ", " + bytes(x["pinned-bytes"]) +
      (x["pinned-counted"] < x["pinned-snapshots"] ? " (" + x["pinned-counted"] + " counted so far)" : ""))));
  const snaps = s.items.map(x => el("tr", { class: x.state, "data-snapshot": x.name },
    el("td", {}, x.name), el("td", {}, when(x["created-unix-ms"], now)), el("td", {}, bytes(x.size)),
    el("td", {}, bytes(x["new-stored-bytes"])),
    el("td", {}, Object.entries(x.labels || {}).map(([k, val]) => el("span", { class: "label" }, k + "=" + val))),
    el("td", {}, x.locks.length ? el("ul", { class: "locks" }, x.locks.map(lk => lockLine(lk, now)),
      x["locks-total"] > x.locks.length ? el("li", { class: "muted" }, "and " + (x["locks-total"] - x.locks.length) + " more (Locks below)") : null) : "kept, no lock")));
  const locks = l.items.map(x => el("tr", { class: x.stale ? "bad" : null },
    el("td", {}, x.holder), el("td", {}, x.type), el("td", {}, x.value),
    el("td", {}, x["snapshot-name"] || x.snapshot), el("td", {}, ago(now - x["set-unix-ms"])),
    el("td", {}, x["lease-ms"] ? (x.stale ? "ran out" : "expires in " + ago(x["expires-unix-ms"] - now)) : "none"),
    el("td", { class: "path" }, x["path-text"] || "set here")));
  return [
    el("h1", {}, "Volume ", v.name),
    el("p", {}, v.kind === "replica" ? "Replica, " + v.origin : "Local volume from " + v.source, " · ",
      plural(v.snapshots, "snapshot") + " · " + plural(v.locks, "lock") + " by " + plural(v.holders, "holder") + " · " + plural(v.pruned, "deletion") + " remembered"),
    el("h2", {}, "Timeline"),
    el("div", { class: "legend" }, el("span", { class: "kept" }, "kept"), el("span", { class: "locked" }, "locked"), el("span", { class: "pruned" }, "pruned")),
    timelineSvg(t),
    el("h2", {}, "Holders and what they pin"),
    el("p", { class: "muted" }, "Pins: the snapshots only this holder locks, and for each the bytes `holdfast lock explain` gives (what deleting that one alone would free at most), summed."),
    table(["Holder", "Kind", "Locks", "Came through", "Refreshed", "Lease", "Pins"], holders, { id: "holders" }),
    el("h2", {}, "Snapshots"), pager("snapshots:" + name, s),
    table(["Snapshot", "Taken", "Size", "Added", "Labels", "Locks"], snaps, { id: "snapshots" }),
    el("h2", {}, "Locks"), pager("locks:" + name, l),
    table(["Holder", "Type", "Value", "Snapshot", "Age", "Lease", "Path"], locks, { id: "locks" }),
  ];
}

// ---- jobs ---------------------------------------------------------------------------------

async function jobsPage() {
  const j = await api("jobs");
  const now = j["now-unix-ms"];
  const rows = (j.jobs || []).map(x => el("tr", { class: x["consecutive-failures"] > 0 ? "bad" : null },
    el("td", {}, x.kind), el("td", {}, el("a", { href: "#/volume/" + enc(x.volume) }, x.volume)),
    el("td", {}, x.upstream || x.target || ""), el("td", {}, x.schedule),
    el("td", {}, x.running ? "running" : when(x["last-finished-unix-ms"], now)),
    el("td", {}, x["last-ok"] === null || x["last-ok"] === undefined ? "" : (x["last-ok"] ? "ok" : "failed")),
    el("td", {}, x["next-run-unix-ms"] ? "in " + ago(x["next-run-unix-ms"] - now) : ""),
    el("td", {}, x.runs + " runs, " + x.failures + " failed" + (x["consecutive-failures"] ? " (" + x["consecutive-failures"] + " in a row)" : "")),
    el("td", { class: "message" }, x["last-error"] || x["last-summary"] || "")));
  const pf = Object.entries(j["policy-failures"] || {}).map(([k, v]) => el("tr", { class: "bad" },
    el("td", {}, k), el("td", {}, v.count), el("td", {}, when(v["last-unix-ms"], now)), el("td", { class: "message" }, v["last-error"])));
  const gc = j.gc || {};
  const last = gc.last;
  const gcRows = [
    ["Runs", gc.enabled ? "every " + gc.every + " when at least " + gc["min-dead"] + " is dead, or after " + gc["max-wait"] : "off"],
    ["Deleted snapshots since the last gc", gc["deleted-snapshots"]],
    ["Dead bytes (estimate)", bytes(gc["dead-bytes-estimate"])],
    ["Last gc", last ? when(last["finished-unix-ms"], now) + ": freed " + bytes(last["bytes-freed"]) + ", " + last["packs-deleted"] + " packs deleted, " + last["packs-repacked"] + " repacked, " + bytes(last["dead-bytes-kept"]) + " dead kept" : "none yet"],
    ["Last attempt", gc["last-attempt"] || "none yet"],
  ].map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v)));
  return [
    el("h1", {}, "Jobs"),
    table(["Kind", "Volume", "Upstream or target", "Schedule", "Last run", "Result", "Next run", "Runs", "Message"], rows, { id: "jobs" }),
    el("h2", {}, "Policy failures"), table(["Policy", "Failures", "Last", "Last error"], pf, { id: "policy-failures" }),
    el("h2", {}, "Garbage collection"), el("table", { id: "gc" }, el("tbody", {}, gcRows)),
  ];
}

// ---- routing and refresh ------------------------------------------------------------------

async function refresh() {
  if (state.loading) return;
  state.loading = true;
  const hash = window.location.hash || "#/map";
  const t0 = performance.now();
  try {
    let content;
    if (hash.startsWith("#/volume/")) content = await volumePage(decodeURIComponent(hash.slice(9)));
    else if (hash === "#/volumes") content = await volumesPage();
    else if (hash === "#/jobs") content = await jobsPage();
    else content = await mapPage();
    const main = document.getElementById("main");
    main.replaceChildren(...content.filter(c => c !== null && c !== undefined));
    main.setAttribute("data-route", hash);
    const ms = Math.round(performance.now() - t0);
    main.setAttribute("data-render-ms", ms);
    // Since the page began to load: what a user waits for the first time.
    main.setAttribute("data-drawn-at-ms", Math.round(performance.now()));
    document.getElementById("updated").textContent = "Updated " + new Date().toLocaleTimeString() + " (" + ms + " ms)";
    document.getElementById("problem").textContent = "";
    for (const a of document.querySelectorAll("nav a")) a.classList.toggle("current", hash.startsWith(a.getAttribute("href").replace(/s$/, "")));
  } catch (e) {
    document.getElementById("problem").textContent = "Could not update: " + e.message;
  } finally {
    state.loading = false;
  }
}

async function start() {
  try {
    const n = await api("node");
    document.getElementById("node").textContent = "node " + n.node + " · " + n.version;
  } catch (e) { /* shown by refresh */ }
  window.addEventListener("hashchange", () => { refresh(); });
  await refresh();
  // Live: the page asks again every few seconds while it is shown.
  state.timer = setInterval(() => { if (!document.hidden) refresh(); }, REFRESH_MS);
}

start();
