// xpu-broker dashboard. Plain JS, no dependencies, no external fetches.
// All data is inserted with textContent / attributes, never innerHTML.
(function () {
"use strict";

const PAGE = 100;          // netdev page size
const BULK = 500;          // page size for tables loaded in full
const MAX_PAGES = 40;      // safety cap when following continue tokens
const MIN_REFRESH_MS = 500; // at most ~2 refreshes per second
const TICK_MS = 5000;      // SLI refresh / polling interval
const PHASES = ["Connected", "Pending", "Connecting", "Error", "Disconnected"];
const FABRIC_KINDS = ["LogicalBridge", "Vrf", "Svi", "XpuNetwork"];
const KNOWN_KINDS = ["Dpu", "Netdev", "FlowPolicy"].concat(FABRIC_KINDS);
const ALL = "all";

const $ = (id) => document.getElementById(id);
let redirecting = false;

// ---- helpers

function el(tag, props, children) {
  const n = document.createElement(tag);
  if (props) {
    for (const k of Object.keys(props)) {
      const v = props[k];
      if (v == null || v === false) continue;
      if (k === "class") n.className = v;
      else if (k === "text") n.textContent = String(v);
      else if (k === "data") for (const d of Object.keys(v)) { if (v[d] != null) n.dataset[d] = String(v[d]); }
      else if (k === "on") for (const e of Object.keys(v)) n.addEventListener(e, v[e]);
      else n.setAttribute(k, v === true ? "" : String(v));
    }
  }
  if (children != null) append(n, children);
  return n;
}
function append(n, c) {
  if (c == null || c === false) return;
  if (Array.isArray(c)) { for (const x of c) append(n, x); return; }
  n.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
}
const txt = (v) => (v == null || v === "" ? "\u2014" : String(v));

function fmtAge(sec) {
  if (sec == null || !isFinite(sec)) return "\u2014";
  const s = Math.max(0, Math.floor(sec));
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m";
  if (s < 86400) return Math.floor(s / 3600) + "h";
  return Math.floor(s / 86400) + "d";
}
function ageOf(ts) {
  if (!ts) return null;
  const t = Date.parse(ts);
  return isNaN(t) ? null : Math.max(0, (Date.now() - t) / 1000);
}
function absTime(ts) {
  if (!ts) return "";
  const d = new Date(ts);
  return isNaN(d.getTime()) ? String(ts) : d.toLocaleString();
}
function ageCell(ts) {
  return el("span", { class: "age", title: ts ? absTime(ts) + " (" + ts + ")" : null, text: ts ? fmtAge(ageOf(ts)) : "\u2014" });
}
function fmtNum(v, digits) {
  if (v == null || !isFinite(v)) return "\u2014";
  if (digits == null) return Number(v).toLocaleString();
  return Number(v).toFixed(digits);
}
function fmtBytes(b) {
  if (b == null || !isFinite(b)) return "\u2014";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0, v = b;
  while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
  return (i === 0 ? String(v) : v.toFixed(1)) + " " + u[i];
}
const cls = (s) => String(s || "unknown").toLowerCase().replace(/[^a-z0-9]+/g, "-");

function phaseBadge(phase) {
  const p = phase || "Unknown";
  const known = PHASES.indexOf(p) >= 0 || ["Programmed", "Ready", "Unknown"].indexOf(p) >= 0;
  return el("span", { class: "badge phase phase-" + (known ? cls(p) : "other"), text: p });
}
const staleBadge = () => el("span", { class: "badge stale-badge", title: "status not confirmed by a live agent", text: "stale" });
const isStaleDpu = (d) => d.lease_state === "Unknown" || d.stale === true;
const nsName = (o) => (o.namespace ? o.namespace + "/" : "") + o.name;

function debounce(fn, ms) {
  let t = null;
  return function () { clearTimeout(t); t = setTimeout(fn, ms); };
}

// ---- API

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

function redirectLogin() {
  if (redirecting) return;
  redirecting = true;
  if (es) es.close();
  window.location.assign("/login");
}

async function api(path) {
  if (redirecting) throw new ApiError(401, "unauthenticated", "redirecting to login");
  let res;
  try {
    res = await fetch(path, { credentials: "same-origin", cache: "no-store", headers: { Accept: "application/json" } });
  } catch (e) {
    throw new ApiError(0, "network", "broker unreachable");
  }
  if (res.status === 401) { redirectLogin(); throw new ApiError(401, "unauthenticated", "not logged in"); }
  let body = null;
  try { body = await res.json(); } catch (e) { body = null; }
  if (!res.ok) {
    const e = (body && body.error) || {};
    throw new ApiError(res.status, e.code || "http_" + res.status, e.message || res.statusText || "request failed");
  }
  return body;
}

function qs(params) {
  const p = new URLSearchParams();
  for (const k of Object.keys(params)) {
    const v = params[k];
    if (v != null && v !== "") p.set(k, String(v));
  }
  const s = p.toString();
  return s ? "?" + s : "";
}

// Follows continue tokens until `want` items are loaded (or the list ends).
async function fetchPages(path, params, want, pageSize) {
  let items = [], cont = null, revision = null, pages = 0;
  do {
    const body = await api(path + qs(Object.assign({}, params, { limit: pageSize, continue: cont })));
    items = items.concat((body && body.items) || []);
    cont = (body && body.continue) || null;
    if (body && body.revision != null) revision = body.revision;
    pages++;
  } while (cont && items.length < want && pages < MAX_PAGES);
  return { items, cont, revision };
}

// ---- errors banner

const errors = new Map();
function setError(source, err) {
  if (err && err.status === 401) return;
  if (err) errors.set(source, source + ": " + (err.message || String(err)) + (err.code ? " (" + err.code + ")" : ""));
  else errors.delete(source);
  const b = $("banner");
  if (errors.size) { b.textContent = Array.from(errors.values()).join(" \u00b7 "); b.hidden = false; }
  else { b.textContent = ""; b.hidden = true; }
}

// ---- sortable tables

function compare(a, b) {
  if (typeof a === "number" && typeof b === "number") return a - b;
  if (typeof a === "boolean" && typeof b === "boolean") return (a ? 1 : 0) - (b ? 1 : 0);
  const na = Number(a), nb = Number(b);
  if (a !== "" && b !== "" && !isNaN(na) && !isNaN(nb) && typeof a !== "boolean" && typeof b !== "boolean") return na - nb;
  return String(a).localeCompare(String(b), undefined, { numeric: true, sensitivity: "base" });
}
const isBlank = (v) => v == null || v === "" || (typeof v === "number" && isNaN(v));

// columns: [{key, label, value(row) -> sortable, cell(row) -> Node|string, cls}]
function makeTable(id, columns, opts) {
  const table = $(id);
  const tbody = table.tBodies[0];
  const wrap = table.parentElement;
  const state = { key: null, dir: 1, rows: [], loaded: false };
  const headRow = el("tr");
  const ths = {};
  for (const c of columns) {
    const th = el("th", { scope: "col", tabindex: "0", class: "sortable " + (c.cls || ""), data: { key: c.key }, title: "sort by " + c.label }, [c.label, el("span", { class: "sort-ind" })]);
    const toggle = () => {
      if (state.key === c.key) state.dir = -state.dir; else { state.key = c.key; state.dir = 1; }
      render();
    };
    th.addEventListener("click", toggle);
    th.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); toggle(); } });
    ths[c.key] = th;
    headRow.appendChild(th);
  }
  table.tHead.replaceChildren(headRow);

  function render() {
    const filter = opts.filter ? opts.filter() : null;
    let rows = filter ? state.rows.filter(filter) : state.rows.slice();
    if (state.key) {
      const col = columns.find((c) => c.key === state.key);
      const dir = state.dir;
      const keyed = rows.map((r, i) => ({ r, i, v: col.value(r) }));
      keyed.sort((x, y) => {
        const bx = isBlank(x.v), by = isBlank(y.v);
        if (bx || by) return bx && by ? x.i - y.i : bx ? 1 : -1; // blanks last in both directions
        return dir * compare(x.v, y.v) || x.i - y.i;
      });
      rows = keyed.map((k) => k.r);
    }
    for (const k of Object.keys(ths)) {
      const th = ths[k];
      const on = k === state.key;
      th.classList.toggle("sorted-asc", on && state.dir === 1);
      th.classList.toggle("sorted-desc", on && state.dir === -1);
      if (on) th.setAttribute("aria-sort", state.dir === 1 ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    }
    const selected = opts.selectedKey ? opts.selectedKey() : null;
    const act = document.activeElement;
    const focusKey = act && tbody.contains(act) && act.closest("tr") ? act.closest("tr")._key : undefined;
    let refocus = null;
    const frag = document.createDocumentFragment();
    for (const r of rows) {
      const tr = opts.row ? opts.row(r) : el("tr");
      for (const c of columns) {
        const td = el("td", { class: c.cls || null, data: { col: c.key } });
        append(td, c.cell ? c.cell(r) : txt(c.value(r)));
        tr.appendChild(td);
      }
      if (opts.rowKey) {
        tr._key = opts.rowKey(r);
        if (selected != null && tr._key === selected) tr.classList.add("selected");
        if (focusKey !== undefined && tr._key === focusKey) refocus = tr;
      }
      if (opts.onClick) {
        tr.classList.add("clickable");
        tr.tabIndex = 0;
        tr.addEventListener("click", (e) => { if (!e.target.closest("a,button,input")) opts.onClick(r); });
        tr.addEventListener("keydown", (e) => { if (e.key === "Enter") opts.onClick(r); });
      }
      frag.appendChild(tr);
    }
    // Keep the page and the table's own scroll position across re-renders.
    const sx = window.scrollX, sy = window.scrollY, wt = wrap.scrollTop, wl = wrap.scrollLeft;
    tbody.replaceChildren(frag);
    if (wrap.scrollTop !== wt) wrap.scrollTop = wt;
    if (wrap.scrollLeft !== wl) wrap.scrollLeft = wl;
    if (refocus) refocus.focus({ preventScroll: true });
    if (window.scrollX !== sx || window.scrollY !== sy) window.scrollTo(sx, sy);

    const empty = $(id + "-empty");
    if (empty) {
      empty.hidden = !state.loaded || rows.length > 0;
      empty.textContent = state.rows.length ? "No rows match the current search." : opts.emptyText;
    }
    const count = $(id + "-count");
    if (count && state.loaded) count.textContent = opts.countText ? opts.countText(rows.length, state.rows.length) :
      (rows.length === state.rows.length ? String(rows.length) : rows.length + " of " + state.rows.length);
  }

  return {
    set(rows) { state.rows = rows || []; state.loaded = true; render(); },
    render,
    rows: () => state.rows,
  };
}

function matchesSearch(query, fields) {
  const terms = query.toLowerCase().split(/\s+/).filter(Boolean);
  if (!terms.length) return true;
  const hay = fields.filter((f) => f != null).join(" ").toLowerCase();
  return terms.every((t) => hay.indexOf(t) >= 0);
}

// ---- header & summary

let headRevision = 0;
function setRevision(rev) {
  if (rev == null || !isFinite(rev)) return;
  if (rev > headRevision) headRevision = rev;
  $("revision").textContent = String(headRevision);
}

function setConn(stateName) {
  const c = $("conn");
  c.className = "conn conn-" + stateName;
  c.dataset.state = stateName;
  $("conn-text").textContent = stateName;
}

function setText(id, v) { const n = $(id); if (n) n.textContent = v; }

async function loadFleet() {
  const f = await api("/api/v1/fleet");
  setText("store-kind", f.store || "?");
  setRevision(f.revision);
  $("revision").title = "compacted revision " + (f.compacted_revision != null ? f.compacted_revision : "\u2014");
  const d = f.dpus || {}, n = f.netdevs || {}, byPhase = n.by_phase || {}, s = f.streams || {}, r = f.rates || {};
  setText("sum-dpus-ready", fmtNum(d.ready || 0));
  setText("sum-dpus-total", fmtNum(d.total || 0));
  setText("sum-dpus-unknown", fmtNum(d.unknown || 0));
  $("card-dpus-unknown").classList.toggle("alert-stale", (d.unknown || 0) > 0);
  setText("sum-netdevs-total", fmtNum(n.total || 0));
  for (const p of PHASES) {
    const v = byPhase[p] || 0;
    setText("sum-phase-" + p.toLowerCase(), fmtNum(v));
    const card = document.querySelector('.card-phase[data-phase="' + p + '"]');
    if (card) card.classList.toggle("zero", v === 0);
  }
  setText("sum-netdevs-stale", fmtNum(n.stale || 0));
  $("card-stale").classList.toggle("alert-stale", (n.stale || 0) > 0);
  setText("sum-streams", fmtNum(s.total || 0));
  const kinds = s.by_kind || {};
  setText("sum-streams-kinds", Object.keys(kinds).map((k) => k + " " + kinds[k]).join(" \u00b7 "));
  setText("sum-writes", fmtNum(r.writes_per_second, 1));
  setText("sum-statuses", fmtNum(r.statuses_per_second, 1));
  const objs = f.objects || {};
  setText("objects", Object.keys(objs).length ? "objects: " + Object.keys(objs).map((k) => k + " " + objs[k]).join(" \u00b7 ") : "");
}

// ---- DPUs

const dpuTable = makeTable("dpus", [
  { key: "serial", label: "Serial", value: (d) => d.serial, cell: (d) => [
    el("span", { class: "conn-dot " + (d.connected ? "on" : "off"), title: d.connected ? "agent connected" : "agent not connected" }),
    el("span", { class: "mono", text: d.serial })] },
  { key: "lease", label: "Lease", value: (d) => d.lease_state, cell: (d) => [phaseBadge(d.lease_state), isStaleDpu(d) ? staleBadge() : null] },
  { key: "lease_age", label: "Lease age", cls: "num", value: (d) => d.lease_age_seconds,
    cell: (d) => el("span", { title: d.last_heartbeat ? "last heartbeat " + absTime(d.last_heartbeat) + (d.lease_duration_seconds ? ", lease " + d.lease_duration_seconds + "s" : "") : "no heartbeat", text: fmtAge(d.lease_age_seconds) }) },
  { key: "lag", label: "Rev lag", cls: "num", value: (d) => d.revision_lag,
    cell: (d) => el("span", { class: d.revision_lag > 0 ? "warn" : null, title: "applied revision " + txt(d.applied_revision), text: txt(d.revision_lag) }) },
  { key: "netdevs", label: "Netdevs", cls: "num", value: (d) => d.netdevs },
  { key: "pending", label: "Pending", cls: "num", value: (d) => d.pending, cell: (d) => el("span", { class: d.pending > 0 ? "warn" : null, text: txt(d.pending) }) },
  { key: "agent", label: "Agent", value: (d) => d.agent_version },
  { key: "dataplane", label: "Dataplane", value: (d) => d.dataplane },
  { key: "error", label: "Last error", cls: "msg", value: (d) => d.last_error, cell: (d) => d.last_error ? el("span", { class: "err", title: d.last_error, text: d.last_error }) : "\u2014" },
], {
  emptyText: "No DPUs registered.",
  filter: () => {
    const q = $("dpu-search").value.trim();
    if (!q) return null;
    return (d) => matchesSearch(q, [d.serial, d.product, d.infra_node, d.tenant_node, d.lease_state, isStaleDpu(d) ? "stale" : "",
      d.agent_version, d.dataplane, d.last_error].concat(Object.keys(d.labels || {}).map((k) => k + "=" + d.labels[k])));
  },
  row: (d) => el("tr", { class: isStaleDpu(d) ? "stale" : null, data: { serial: d.serial, leaseState: d.lease_state } }),
  rowKey: (d) => d.serial,
  selectedKey: () => (detail.kind === "dpu" ? detail.id : null),
  onClick: (d) => openDetail("dpu", d.serial),
});

async function loadDpus() {
  const page = await fetchPages("/api/v1/dpus", {}, Infinity, BULK);
  setRevision(page.revision);
  dpuTable.set(page.items);
}

// ---- netdevs

const nd = { items: [], cont: null, gen: 0, busy: false, fkey: null };

function netdevFilters() {
  return { dpu: $("f-dpu").value.trim(), node: $("f-node").value.trim(), phase: $("f-phase").value, namespace: $("f-namespace").value.trim() };
}

const netdevTable = makeTable("netdevs", [
  { key: "id", label: "ID", value: (n) => n.id, cell: (n) => el("span", { class: "mono", text: n.id }) },
  { key: "pod", label: "Pod", value: (n) => n.pod },
  { key: "dpu", label: "DPU", value: (n) => n.dpu, cell: (n) => el("span", { class: "mono", text: txt(n.dpu) }) },
  { key: "node", label: "Node", value: (n) => n.node },
  { key: "network", label: "Network", value: (n) => n.network },
  { key: "interface", label: "If", value: (n) => n.interface },
  { key: "phase", label: "Phase", value: (n) => n.phase, cell: (n) => [phaseBadge(n.phase), n.stale ? staleBadge() : null] },
  { key: "ip", label: "IP", value: (n) => n.ip, cell: (n) => el("span", { class: "mono", text: txt(n.ip) }) },
  { key: "gen", label: "Gen", cls: "num", value: (n) => n.generation,
    cell: (n) => el("span", { class: n.observed_generation !== n.generation ? "warn" : null, title: "observed / desired generation", text: txt(n.observed_generation) + "/" + txt(n.generation) }) },
  { key: "updated", label: "Updated", cls: "num", value: (n) => ageOf(n.updated_at), cell: (n) => ageCell(n.updated_at) },
  { key: "message", label: "Message", cls: "msg", value: (n) => n.message, cell: (n) => n.message ? el("span", { class: n.phase === "Error" ? "err" : null, title: n.message, text: n.message }) : "\u2014" },
], {
  emptyText: "No netdevs.",
  filter: () => {
    const q = $("netdev-search").value.trim();
    if (!q) return null;
    return (n) => matchesSearch(q, [n.id, n.namespace, n.name, n.dpu, n.node, n.pod, n.interface, n.network, n.phase, n.stale ? "stale" : "", n.ip, n.mac, n.message]);
  },
  row: (n) => el("tr", { class: n.stale ? "stale" : null, data: { id: n.id, phase: n.phase } }),
  rowKey: (n) => n.id,
  selectedKey: () => (detail.kind === "netdev" ? detail.id : null),
  onClick: (n) => openDetail("netdev", n.id),
  countText: (shown, loaded) => (shown === loaded ? loaded + " loaded" : shown + " of " + loaded + " loaded") + (nd.cont ? " (more available)" : ""),
});

function updateMoreButton() {
  const b = $("netdev-more");
  b.hidden = !nd.cont;
  b.disabled = nd.busy;
}

// mode: "reset" (filters changed), "refresh" (keep as many rows as loaded), "more" (next page)
async function loadNetdevs(mode) {
  const filters = netdevFilters();
  if (mode === "more") {
    if (!nd.cont || nd.busy) return;
    const gen = nd.gen;
    nd.busy = true; updateMoreButton();
    try {
      const body = await api("/api/v1/netdevs" + qs(Object.assign({}, filters, { limit: PAGE, continue: nd.cont })));
      if (gen !== nd.gen || JSON.stringify(filters) !== nd.fkey) return;
      nd.items = nd.items.concat(body.items || []);
      nd.cont = body.continue || null;
      setRevision(body.revision);
      netdevTable.set(nd.items);
    } finally { nd.busy = false; updateMoreButton(); }
    return;
  }
  const gen = ++nd.gen;
  const fkey = JSON.stringify(filters);
  if (fkey !== nd.fkey) mode = "reset";
  const want = mode === "reset" ? PAGE : Math.max(PAGE, nd.items.length);
  const page = await fetchPages("/api/v1/netdevs", filters, want, mode === "reset" ? PAGE : Math.min(BULK, want));
  if (gen !== nd.gen) return;
  nd.items = page.items;
  nd.cont = page.cont;
  nd.fkey = fkey;
  setRevision(page.revision);
  netdevTable.set(nd.items);
  updateMoreButton();
}

function reloadNetdevs() {
  loadNetdevs("reset").then(() => setError("netdevs", null), (e) => setError("netdevs", e));
}

// ---- clusters

const clusterTable = makeTable("clusters", [
  { key: "identity", label: "Identity", value: (c) => c.identity, cell: (c) => el("span", { class: "mono", text: c.identity }) },
  { key: "cluster", label: "Cluster", value: (c) => c.cluster },
  { key: "side", label: "Side", value: (c) => c.side },
  { key: "since", label: "Connected", cls: "num", value: (c) => ageOf(c.connected_since), cell: (c) => ageCell(c.connected_since) },
  { key: "resumed", label: "Resumed from", cls: "num", value: (c) => c.resumed_from },
  { key: "delivered", label: "Delivered rev", cls: "num", value: (c) => c.delivered_revision },
  { key: "lag", label: "Lag", cls: "num", value: (c) => c.lag, cell: (c) => el("span", { class: c.lag > 0 ? "warn" : null, text: txt(c.lag) }) },
], {
  emptyText: "No cluster syncers connected.",
  row: (c) => el("tr", { class: c.lag > 0 ? "lagging" : null, data: { identity: c.identity, cluster: c.cluster, side: c.side } }),
});

async function loadClusters() {
  const body = await api("/api/v1/clusters");
  clusterTable.set(body.items || []);
}

// ---- fabric

function dpuChips(dpus) {
  return el("div", { class: "chips" }, (dpus || []).map((d) =>
    el("span", { class: "chip phase-" + cls(d.phase) + (d.stale ? " stale" : ""), data: { serial: d.serial, phase: d.phase },
      title: d.serial + ": " + txt(d.phase) + " (observed gen " + txt(d.observed_generation) + ")" + (d.stale ? " \u2014 stale" : "") + (d.message ? " \u2014 " + d.message : "") },
    [el("span", { class: "mono", text: d.serial }), " ", el("b", { text: txt(d.phase) }), d.stale ? [" ", staleBadge()] : null])));
}
const notReady = (o) => (o.dpus || []).filter((d) => d.phase !== "Programmed" && d.phase !== "Ready").length;

const fabricTable = makeTable("fabric", [
  { key: "kind", label: "Kind", value: (o) => o.kind },
  { key: "name", label: "Name", value: (o) => nsName(o), cell: (o) => el("span", { class: "mono", text: nsName(o) }) },
  { key: "generation", label: "Gen", cls: "num", value: (o) => o.generation },
  { key: "ready", label: "Ready", cls: "num", value: (o) => (o.total ? o.ready / o.total : null),
    cell: (o) => el("span", { class: o.ready < o.total ? "warn" : "ok", text: txt(o.ready) + "/" + txt(o.total) }) },
  { key: "dpus", label: "Per-DPU phase", value: (o) => notReady(o), cell: (o) => dpuChips(o.dpus) },
], {
  emptyText: "No fabric objects.",
  row: (o) => el("tr", { class: [o.ready < o.total ? "degraded" : "", (o.dpus || []).some((d) => d.stale) ? "has-stale" : ""].join(" ").trim() || null,
    data: { kind: o.kind, namespace: o.namespace, name: o.name } }),
});

let fabricSeq = 0;
async function loadFabric() {
  const seq = ++fabricSeq;
  const page = await fetchPages("/api/v1/fabric", { kind: $("fabric-kind").value }, Infinity, BULK);
  if (seq !== fabricSeq) return;
  fabricTable.set(page.items);
}

// ---- flow policies

const sumRules = (p, f) => (p.dpus || []).reduce((a, d) => a + (d.rules || []).reduce((b, r) => b + (Number(r[f]) || 0), 0), 0);

const flowTable = makeTable("flowpolicies", [
  { key: "name", label: "Name", value: (p) => nsName(p), cell: (p) => el("span", { class: "mono", text: nsName(p) }) },
  { key: "generation", label: "Gen", cls: "num", value: (p) => p.generation },
  { key: "rules", label: "Rules", cls: "num", value: (p) => p.rules },
  { key: "packets", label: "Packets", cls: "num", value: (p) => sumRules(p, "packets"), cell: (p) => fmtNum(sumRules(p, "packets")) },
  { key: "bytes", label: "Bytes", cls: "num", value: (p) => sumRules(p, "bytes"), cell: (p) => fmtBytes(sumRules(p, "bytes")) },
  { key: "dpus", label: "Per-DPU rules", value: (p) => notReady(p), cell: (p) => el("div", { class: "fp-dpus" }, (p.dpus || []).map((d) =>
    el("div", { class: "fp-dpu" + (d.stale ? " stale" : ""), data: { serial: d.serial } }, [
      el("div", { class: "fp-dpu-head" }, [el("span", { class: "mono", text: d.serial }), " ", phaseBadge(d.phase), d.stale ? staleBadge() : null,
        d.message ? el("span", { class: "err small", title: d.message, text: " " + d.message }) : null]),
      (d.rules && d.rules.length) ? el("table", { class: "mini" }, el("tbody", null, d.rules.map((r) => el("tr", { data: { rule: r.name } }, [
        el("td", { class: r.programmed ? "ok" : "warn", title: r.programmed ? "programmed" : "not programmed", text: (r.programmed ? "\u2713 " : "\u2717 ") + r.name }),
        el("td", { class: "muted", text: txt(r.offload) }),
        el("td", { class: "num", text: fmtNum(r.packets) + " pkts" }),
        el("td", { class: "num", text: fmtBytes(r.bytes) }),
      ])))) : null,
    ]))) },
], {
  emptyText: "No flow policies.",
  row: (p) => el("tr", { class: (p.dpus || []).some((d) => d.stale) ? "has-stale" : null, data: { namespace: p.namespace, name: p.name } }),
});

async function loadFlowPolicies() {
  const page = await fetchPages("/api/v1/flowpolicies", {}, Infinity, BULK);
  flowTable.set(page.items);
}

// ---- detail panel

const detail = { kind: null, id: null, seq: 0, json: null, at: 0 };

function kv(pairs) {
  return el("dl", { class: "kv" }, pairs.filter(Boolean).map(([k, v]) => [el("dt", { text: k }), el("dd", null, v == null || v === "" ? "\u2014" : v)]));
}

function openDetail(kind, id) {
  detail.kind = kind; detail.id = id; detail.json = null;
  const p = $("detail");
  p.hidden = false;
  p.dataset.kind = kind; p.dataset.id = id;
  document.body.classList.add("detail-open");
  $("detail-title").textContent = (kind === "dpu" ? "DPU " : "Netdev ") + id;
  $("detail-body").replaceChildren(el("p", { class: "muted", text: "loading\u2026" }));
  dpuTable.render(); netdevTable.render();
  loadDetail().catch(() => {});
}

function closeDetail() {
  detail.kind = null; detail.id = null; detail.seq++; detail.json = null;
  const p = $("detail");
  p.hidden = true;
  delete p.dataset.kind; delete p.dataset.id;
  document.body.classList.remove("detail-open");
  dpuTable.render(); netdevTable.render();
}

async function loadDetail() {
  if (!detail.kind) return;
  const seq = ++detail.seq, kind = detail.kind, id = detail.id;
  const body = $("detail-body");
  let data;
  try {
    data = kind === "dpu" ? await api("/api/v1/dpus/" + encodeURIComponent(id))
      : await api("/api/v1/netdevs/" + encodeURIComponent(id) + "?history_limit=100");
  } catch (e) {
    if (seq !== detail.seq) return;
    const msg = e.status === 404 ? (kind === "dpu" ? "This DPU is not known to the broker." : "This netdev no longer exists (deleted).") : "Could not load: " + e.message;
    const note = el("p", { class: "detail-error", text: msg });
    const old = body.querySelector(".detail-error");
    if (old) old.replaceWith(note);
    else if (!detail.json) body.replaceChildren(note);
    else body.prepend(note);
    return;
  }
  if (seq !== detail.seq) return;
  // Skip identical re-renders (keeps text selection), but refresh relative ages now and then.
  const json = JSON.stringify(data);
  if (json === detail.json && Date.now() - detail.at < 30000) return;
  detail.json = json; detail.at = Date.now();
  const content = kind === "dpu" ? renderDpuDetail(data) : renderNetdevDetail(data);
  const st = body.scrollTop;
  body.replaceChildren(content);
  body.scrollTop = st;
}

function renderNetdevDetail(data) {
  const n = (data && data.netdev) || {};
  const hist = ((data && data.history) || []).slice().sort((a, b) => (b.revision || 0) - (a.revision || 0));
  $("detail-title").replaceChildren("Netdev ", el("span", { class: "mono", text: n.id || detail.id }), " ", phaseBadge(n.phase), n.stale ? staleBadge() : "");
  const dpuLink = n.dpu ? el("button", { type: "button", class: "link mono", text: n.dpu, on: { click: () => openDetail("dpu", n.dpu) } }) : null;
  const frag = document.createDocumentFragment();
  if (n.message) frag.appendChild(el("p", { class: n.phase === "Error" ? "detail-msg err" : "detail-msg", text: n.message }));
  frag.appendChild(kv([
    ["Namespace / name", nsName(n)], ["DPU", dpuLink], ["Node", n.node], ["Pod", n.pod], ["Interface", n.interface],
    ["Network", n.network], ["Phase", n.phase], ["IP", n.ip], ["MAC", n.mac],
    ["Generation", el("span", { class: n.observed_generation !== n.generation ? "warn" : null, text: "observed " + txt(n.observed_generation) + " / desired " + txt(n.generation) })],
    ["Updated", n.updated_at ? fmtAge(ageOf(n.updated_at)) + " ago \u00b7 " + absTime(n.updated_at) : null],
    ["Revision", n.revision], ["Stale", n.stale ? "yes \u2014 the DPU's lease is not current" : "no"],
  ]));
  frag.appendChild(el("h3", { text: "Timeline (" + hist.length + ")" }));
  if (!hist.length) frag.appendChild(el("p", { class: "muted", text: "No history recorded." }));
  else frag.appendChild(el("table", { id: "history", class: "grid timeline" }, [
    el("thead", null, el("tr", null, ["Rev", "Time", "Change", "Author", "Gen", "Summary"].map((h) => el("th", { text: h })))),
    el("tbody", null, hist.map((h) => el("tr", { class: "change-" + cls(h.change), data: { revision: h.revision, change: h.change } }, [
      el("td", { class: "num", text: txt(h.revision) }),
      el("td", null, ageCell(h.at)),
      el("td", null, el("span", { class: "badge change change-" + cls(h.change), text: txt(h.change) })),
      el("td", { class: "mono small", text: txt(h.author) }),
      el("td", { class: "num", text: txt(h.observed_generation) + "/" + txt(h.generation) }),
      el("td", { class: "summary", text: txt(h.summary) }),
    ]))),
  ]));
  return frag;
}

function renderDpuDetail(d) {
  const stale = isStaleDpu(d);
  $("detail-title").replaceChildren("DPU ", el("span", { class: "mono", text: d.serial || detail.id }), " ", phaseBadge(d.lease_state), stale ? staleBadge() : "");
  const frag = document.createDocumentFragment();
  if (d.last_error) frag.appendChild(el("p", { class: "detail-msg err", text: d.last_error }));
  frag.appendChild(el("p", null, el("button", { type: "button", id: "detail-show-netdevs", text: "Show this DPU's netdevs", on: { click: () => {
    $("f-dpu").value = d.serial; reloadNetdevs(); $("netdevs-section").scrollIntoView({ behavior: "smooth", block: "start" });
  } } })));
  const labels = d.labels || {};
  frag.appendChild(kv([
    ["Product", d.product], ["Infra node", d.infra_node], ["Tenant node", d.tenant_node],
    ["Agent", (d.connected ? "connected" : "not connected") + (d.agent_version ? " \u00b7 v" + d.agent_version : "")],
    ["Dataplane", d.dataplane],
    ["Lease", txt(d.lease_state) + " \u00b7 age " + fmtAge(d.lease_age_seconds) + (d.lease_duration_seconds ? " of " + d.lease_duration_seconds + "s" : "")],
    ["Last heartbeat", d.last_heartbeat ? absTime(d.last_heartbeat) : null],
    ["Registered", d.registered_at ? absTime(d.registered_at) : null],
    ["Applied revision", txt(d.applied_revision) + " (lag " + txt(d.revision_lag) + ")"],
    ["Netdevs", txt(d.netdevs) + " (" + txt(d.pending) + " pending)"],
    ["Labels", Object.keys(labels).length ? el("div", { class: "chips" }, Object.keys(labels).sort().map((k) => el("span", { class: "chip", text: k + "=" + labels[k] }))) : null],
  ]));
  const inv = d.inventory || {};
  frag.appendChild(el("h3", { text: "Inventory" }));
  frag.appendChild(kv([["Product", inv.product], ["PFs", inv.pf_count], ["VFs", inv.vf_count], ["SFs", inv.sf_count]]));
  const caps = inv.capabilities || {};
  frag.appendChild(el("h3", { text: "Capabilities" }));
  const capKeys = Object.keys(caps).sort();
  frag.appendChild(capKeys.length ? el("div", { class: "chips", id: "capabilities" }, capKeys.map((k) => {
    const v = caps[k], on = v === true || (typeof v !== "boolean" && v != null && v !== "");
    return el("span", { class: "chip cap " + (on ? "cap-on" : "cap-off"), data: { cap: k }, text: (typeof v === "boolean" ? (v ? "\u2713 " : "\u2717 ") + k : k + "=" + JSON.stringify(v)) });
  })) : el("p", { class: "muted", text: "None reported." }));
  const conds = d.conditions || [];
  frag.appendChild(el("h3", { text: "Conditions" }));
  frag.appendChild(conds.length ? el("table", { id: "conditions", class: "grid" }, [
    el("thead", null, el("tr", null, ["Type", "Status", "Reason", "Message", "Since"].map((h) => el("th", { text: h })))),
    el("tbody", null, conds.map((c) => el("tr", { class: "cond-" + cls(c.status), data: { type: c.type } }, [
      el("td", { text: txt(c.type) }),
      el("td", null, el("span", { class: "badge cond cond-" + cls(c.status), text: txt(c.status) })),
      el("td", { text: txt(c.reason) }),
      el("td", { class: "summary", text: txt(c.message) }),
      el("td", null, ageCell(c.last_transition_time)),
    ]))),
  ]) : el("p", { class: "muted", text: "No conditions." }));
  return frag;
}

// ---- SLI charts

const SVGNS = "http://www.w3.org/2000/svg";
const svgEl = (tag, attrs) => { const n = document.createElementNS(SVGNS, tag); for (const k of Object.keys(attrs)) n.setAttribute(k, String(attrs[k])); return n; };
const W = 300, H = 80, PAD = 4;
let sli = { samples: [], interval: 5 };

const CHARTS = [
  { id: "chart-attach", title: "Attach latency (ms)", unit: "ms", digits: 1, series: [{ f: "attach_p50_ms", cls: "s-p50", label: "p50" }, { f: "attach_p99_ms", cls: "s-p99", label: "p99" }] },
  { id: "chart-writes", title: "Writes/s", unit: "/s", digits: 1, series: [{ f: "writes_per_second", cls: "s-main", label: "" }] },
  { id: "chart-statuses", title: "Status/s", unit: "/s", digits: 1, series: [{ f: "statuses_per_second", cls: "s-main", label: "" }] },
  { id: "chart-streams", title: "Streams", unit: "", digits: 0, series: [{ f: "streams", cls: "s-main", label: "" }] },
];

function buildChart(c) {
  const svg = svgEl("svg", { viewBox: "0 0 " + W + " " + H, preserveAspectRatio: "none", "aria-hidden": "true" });
  const legend = c.series.length > 1 ? el("span", { class: "legend" }, c.series.map((se) => [el("i", { class: "sw " + se.cls }), se.label + " "])) : null;
  $("charts").appendChild(el("figure", { class: "chart", id: c.id }, [
    el("figcaption", null, [el("span", { class: "title", text: c.title }), legend, el("span", { class: "val" })]),
    el("div", { class: "plot" }, [el("span", { class: "ymax" }), svg]),
    el("div", { class: "xaxis" }, [el("span", { class: "x0" }), el("span", { text: "now" })]),
  ]));
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function chartValue(c, s) {
  return c.series.map((se) => (se.label ? se.label + " " : "") + (s && s[se.f] != null ? fmtNum(s[se.f], c.digits) : "\u2014")).join(" \u00b7 ") + (c.unit && c.unit !== "/s" ? " " + c.unit : "");
}

function drawChart(c) {
  const fig = $(c.id), svg = fig.querySelector("svg"), samples = sli.samples, n = samples.length;
  let max = 0;
  for (const s of samples) for (const se of c.series) { const v = s[se.f]; if (v != null && isFinite(v) && v > max) max = v; }
  max = niceMax(max);
  const x = (i) => (n <= 1 ? W : (i / (n - 1)) * W);
  const y = (v) => H - PAD - (v / max) * (H - 2 * PAD);
  const nodes = [svgEl("line", { x1: 0, x2: W, y1: y(max / 2), y2: y(max / 2), class: "grid-line" }), svgEl("line", { x1: 0, x2: W, y1: y(0), y2: y(0), class: "axis-line" })];
  for (const se of c.series) {
    let seg = [];
    const segs = [];
    samples.forEach((s, i) => {
      const v = s[se.f];
      if (v == null || !isFinite(v)) { if (seg.length) segs.push(seg); seg = []; return; }
      seg.push([x(i), y(v)]);
    });
    if (seg.length) segs.push(seg);
    for (const sg of segs) {
      const pts = sg.length === 1 ? [[Math.max(0, sg[0][0] - 3), sg[0][1]], sg[0]] : sg;
      const d = pts.map((p) => p[0].toFixed(1) + "," + p[1].toFixed(1)).join(" ");
      if (c.series.length === 1) nodes.push(svgEl("polygon", { points: pts[0][0].toFixed(1) + "," + (H - PAD) + " " + d + " " + pts[pts.length - 1][0].toFixed(1) + "," + (H - PAD), class: "area " + se.cls }));
      nodes.push(svgEl("polyline", { points: d, class: "line " + se.cls, "vector-effect": "non-scaling-stroke" }));
    }
  }
  const cursor = svgEl("line", { x1: 0, x2: 0, y1: 0, y2: H, class: "cursor", "vector-effect": "non-scaling-stroke", visibility: "hidden" });
  nodes.push(cursor);
  svg.replaceChildren(...nodes);
  fig.querySelector(".ymax").textContent = fmtNum(max, max < 10 && c.digits ? 1 : 0) + (c.unit && c.unit !== "/s" ? " " + c.unit : "");
  fig.querySelector(".val").textContent = n ? chartValue(c, samples[n - 1]) : "no data";
  const first = n ? ageOf(samples[0].at) : null;
  fig.querySelector(".x0").textContent = first != null ? "\u2212" + fmtAge(first) : (n ? "\u2212" + fmtAge((n - 1) * sli.interval) : "");
  fig.dataset.samples = String(n);
}

function wireChartHover(c) {
  const fig = $(c.id), svg = fig.querySelector("svg");
  svg.addEventListener("mousemove", (e) => {
    const n = sli.samples.length;
    if (!n) return;
    const r = svg.getBoundingClientRect();
    const i = n === 1 ? 0 : Math.round(Math.min(1, Math.max(0, (e.clientX - r.left) / r.width)) * (n - 1));
    const s = sli.samples[i];
    const cur = svg.querySelector(".cursor");
    if (cur) { const cx = n <= 1 ? W : (i / (n - 1)) * W; cur.setAttribute("x1", cx); cur.setAttribute("x2", cx); cur.setAttribute("visibility", "visible"); }
    fig.querySelector(".val").textContent = chartValue(c, s) + " @ " + (s.at ? fmtAge(ageOf(s.at)) + " ago" : "#" + i);
  });
  svg.addEventListener("mouseleave", () => {
    const cur = svg.querySelector(".cursor");
    if (cur) cur.setAttribute("visibility", "hidden");
    const n = sli.samples.length;
    fig.querySelector(".val").textContent = n ? chartValue(c, sli.samples[n - 1]) : "no data";
  });
}

async function loadSli() {
  try {
    const body = await api("/api/v1/sli");
    sli = { samples: (body && body.samples) || [], interval: (body && body.interval_seconds) || 5 };
    CHARTS.forEach(drawChart);
    setError("sli", null);
  } catch (e) { setError("sli", e); }
}

// ---- refresh scheduling

const LOADERS = {
  fleet: loadFleet, dpus: loadDpus, netdevs: () => loadNetdevs("refresh"), clusters: loadClusters,
  fabric: loadFabric, flowpolicies: loadFlowPolicies, detail: loadDetail,
};

// Which views to refetch for a set of changed kinds (ALL = everything).
function viewsFor(kinds) {
  const v = new Set(["fleet", "clusters", "detail"]);
  if (kinds === ALL) return new Set(Object.keys(LOADERS));
  if (kinds.has("tick")) v.add("dpus");
  for (const k of kinds) {
    if (k === "tick") continue;
    if (KNOWN_KINDS.indexOf(k) < 0 || k === "Dpu") return new Set(Object.keys(LOADERS));
    if (k === "Netdev") { v.add("netdevs"); v.add("dpus"); }
    else if (k === "FlowPolicy") v.add("flowpolicies");
    else v.add("fabric");
  }
  return v;
}

let pending = null, refreshTimer = null, refreshing = false, lastRefresh = 0;

function requestRefresh(kinds) {
  if (redirecting) return;
  if (kinds === ALL || pending === ALL) pending = ALL;
  else { pending = pending || new Set(); for (const k of kinds) pending.add(k); }
  if (refreshing || refreshTimer) return;
  refreshTimer = setTimeout(runRefresh, Math.max(0, lastRefresh + MIN_REFRESH_MS - Date.now()));
}

async function runRefresh() {
  refreshTimer = null;
  if (!pending) return;
  const kinds = pending;
  pending = null;
  refreshing = true;
  lastRefresh = Date.now();
  const views = Array.from(viewsFor(kinds));
  try {
    const results = await Promise.allSettled(views.map((v) => LOADERS[v]()));
    results.forEach((r, i) => { if (views[i] !== "detail") setError(views[i], r.status === "rejected" ? r.reason : null); });
    if (results.some((r) => r.status === "fulfilled")) $("last-update").textContent = "updated " + new Date().toLocaleTimeString();
  } finally {
    refreshing = false;
    if (pending) requestRefresh(pending);
  }
}

// ---- live events

let es = null, live = false, reconnectTimer = null, reconnectDelay = 5000;

function connectEvents() {
  if (redirecting) return;
  if (typeof EventSource === "undefined") { setConn("polling"); return; }
  es = new EventSource("/api/v1/events");
  es.addEventListener("open", () => {
    live = true; reconnectDelay = 5000;
    setConn("live");
    requestRefresh(ALL); // catch up on anything missed while disconnected
  });
  es.addEventListener("revision", (ev) => {
    let d = {};
    try { d = JSON.parse(ev.data) || {}; } catch (e) { d = {}; }
    if (d.revision != null) setRevision(d.revision);
    requestRefresh(Array.isArray(d.kinds) && d.kinds.length ? new Set(d.kinds) : ALL);
  });
  es.addEventListener("error", () => {
    live = false;
    setConn("reconnecting");
    if (es && es.readyState === EventSource.CLOSED) {
      // The browser gave up (e.g. non-200 answer): probe (a 401 redirects) and retry ourselves.
      es.close(); es = null;
      clearTimeout(reconnectTimer);
      reconnectTimer = setTimeout(() => {
        api("/api/v1/fleet").catch(() => {}).then(() => { if (!es) connectEvents(); });
      }, reconnectDelay);
      reconnectDelay = Math.min(30000, reconnectDelay * 2);
    }
  });
}

let ticks = 0;
function tick() {
  if (redirecting || document.hidden) return;
  ticks++;
  loadSli();
  // While the stream is down poll everything; while live, refresh lease ages and
  // a full safety-net refresh every 30 s.
  if (!live || ticks % 6 === 0) requestRefresh(ALL);
  else requestRefresh(new Set(["tick"]));
}

// ---- wiring

function init() {
  CHARTS.forEach(buildChart);
  CHARTS.forEach(wireChartHover);
  $("dpu-search").addEventListener("input", () => dpuTable.render());
  $("netdev-search").addEventListener("input", () => netdevTable.render());
  const debouncedReload = debounce(reloadNetdevs, 350);
  for (const id of ["f-dpu", "f-node", "f-namespace"]) $(id).addEventListener("input", debouncedReload);
  $("f-phase").addEventListener("change", reloadNetdevs);
  $("netdev-filters").addEventListener("submit", (e) => { e.preventDefault(); reloadNetdevs(); });
  $("f-clear").addEventListener("click", () => {
    for (const id of ["f-dpu", "f-node", "f-namespace", "netdev-search"]) $(id).value = "";
    $("f-phase").value = "";
    reloadNetdevs();
  });
  $("netdev-more").addEventListener("click", () => {
    loadNetdevs("more").then(() => setError("netdevs", null), (e) => setError("netdevs", e));
  });
  $("fabric-kind").addEventListener("change", () => {
    loadFabric().then(() => setError("fabric", null), (e) => setError("fabric", e));
  });
  for (const card of document.querySelectorAll(".card-phase")) {
    card.addEventListener("click", () => {
      const f = $("f-phase");
      f.value = f.value === card.dataset.phase ? "" : card.dataset.phase;
      reloadNetdevs();
      $("netdevs-section").scrollIntoView({ behavior: "smooth", block: "start" });
    });
  }
  $("detail-close").addEventListener("click", closeDetail);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && detail.kind) closeDetail(); });
  document.addEventListener("visibilitychange", () => { if (!document.hidden) { loadSli(); requestRefresh(ALL); } });

  // Initial load (netdevs use the possibly browser-restored filter inputs).
  requestRefresh(ALL);
  loadSli();
  connectEvents();
  setInterval(tick, TICK_MS);
}


if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
else init();
})();
