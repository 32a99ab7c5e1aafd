// The fleet page: one row per device, worst first by default, live through /api/events.
"use strict";

const RANK = { offline: 0, stale: 1, unknown: 2, stopped: 3, online: 4 };
const rows = new Map();
let summary = {};
let sortKey = "worst";

function trouble(r) { return (r.throttled && r.throttled.length > 0) || ["failed", "rolled_back"].includes(r.rollout && r.rollout.state); }
function age(r) { return r.last_seen ? serverNow() - r.last_seen : null; }
function modelText(m) { return m ? `${m.name} v${m.version}` : ""; }

const SORTS = {
  worst: (a, b) => (RANK[a.state] ?? 2) - (RANK[b.state] ?? 2) || (trouble(b) - trouble(a)) || (age(b) ?? 0) - (age(a) ?? 0) || a.device.localeCompare(b.device),
  state: (a, b) => a.state.localeCompare(b.state) || a.device.localeCompare(b.device),
  age: (a, b) => (age(b) ?? 0) - (age(a) ?? 0),
  model: (a, b) => modelText(a.model).localeCompare(modelText(b.model)),
  rollout: (a, b) => String(a.rollout && a.rollout.state).localeCompare(String(b.rollout && b.rollout.state)),
  delegate: (a, b) => String(a.delegate).localeCompare(String(b.delegate)),
  fps: (a, b) => (a.fps ?? -1) - (b.fps ?? -1),
  dropped: (a, b) => (b.dropped_frames ?? 0) - (a.dropped_frames ?? 0),
  p99: (a, b) => (b.latency_p99_ms ?? -1) - (a.latency_p99_ms ?? -1),
  temp: (a, b) => (b.cpu_temp_c ?? -1) - (a.cpu_temp_c ?? -1),
  spool: (a, b) => (b.spool_backlog ?? 0) - (a.spool_backlog ?? 0),
  disk: (a, b) => (a.disk_free_bytes ?? Infinity) - (b.disk_free_bytes ?? Infinity),
};

function bytesText(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function throttledText(r) {
  const now = r.throttled || [];
  const before = (r.throttled_since_boot || []).filter((f) => !now.includes(f));
  return [...now, ...before.map((f) => `${f} (since boot)`)].join(", ");
}

function renderSummary() {
  const box = document.getElementById("summary");
  const cards = [["devices", summary.devices ?? 0]];
  for (const [state, n] of Object.entries(summary.by_state || {})) cards.push([state, n]);
  cards.push(["fps (fleet)", summary.fps_total ?? 0], ["throttled", summary.throttled ?? 0], ["not on desired model", summary.not_converged ?? 0]);
  const models = Object.entries(summary.by_model || {}).map(([m, n]) => `${m}: ${n}`).join(" · ");
  const delegates = Object.entries(summary.by_delegate || {}).map(([d, n]) => `${d}: ${n}`).join(" · ");
  const rollouts = Object.entries(summary.rollouts || {}).map(([s, n]) => `${s}: ${n}`).join(" · ");
  const shadows = Object.entries(summary.shadow || {}).map(([r, a]) => `${r}: ${a.devices} devices, agreement ${(a.min * 100).toFixed(1)}-${(a.max * 100).toFixed(1)}% (median ${(a.median * 100).toFixed(1)}%)`).join(" · ");
  box.replaceChildren(
    ...cards.map(([name, value]) => el("div", { class: "card", "data-card": name }, el("b", {}, value), el("span", {}, name))),
    el("div", { class: "card" }, el("span", {}, "models"), el("div", { "data-card": "models" }, models || "–")),
    el("div", { class: "card" }, el("span", {}, "delegates"), el("div", {}, delegates || "–")),
    el("div", { class: "card" }, el("span", {}, "rollouts in progress"), el("div", { "data-card": "rollouts" }, rollouts || "none")),
    ...(shadows ? [el("div", { class: "card" }, el("span", {}, "shadow phases"), el("div", { "data-card": "shadow" }, shadows))] : []),
  );
}

function rowNode(r) {
  const link = el("a", { href: `/device/${encodeURIComponent(r.device)}` }, r.device);
  const ro = r.rollout;
  const sh = ro && ro.shadow;
  const shadow = sh ? ` ${sh.samples}/${sh.target ?? "?"} · agree ${sh.agreement === null ? "–" : (sh.agreement * 100).toFixed(1) + "%"}${ro.awaiting_decision ? " · awaiting decision" : ""}` : "";
  const rollout = ro ? `${ro.state}${ro.progress !== null && ro.progress !== undefined && ro.state === "downloading" ? ` ${ro.progress}%` : ""}${shadow}${ro.reason ? ` (${ro.reason})` : ""}` : "";
  const model = r.desired && !r.converged ? `${modelText(r.model) || "none"} → ${modelText(r.desired)}` : modelText(r.model);
  const latency = r.latency_p50_ms === null ? "–" : `${num(r.latency_p50_ms, 1)} / ${num(r.latency_p99_ms, 1)} ms` + (r.latency_window ? ` (${r.latency_window} fr)` : "");
  const p = r.prediction;
  const prediction = p ? `${p.label} ${num(p.score, 2)} · ${ageText(p.ts ? serverNow() - p.ts : null)} ago` : "";
  return el("tr", { "data-device": r.device, "data-state": r.state },
    el("td", {}, link),
    el("td", { class: `state state-${r.state}` }, r.state),
    el("td", { class: "age" }, ageText(age(r))),
    el("td", { class: r.converged ? "" : "behind" }, model),
    el("td", { class: trouble(r) ? "trouble rollout" : "rollout" }, rollout),
    el("td", {}, r.delegate || ""),
    el("td", { class: "num fps" }, num(r.fps, 2)),
    el("td", { class: "num" }, num(r.dropped_frames, 0)),
    el("td", { class: "num" }, latency),
    el("td", { class: "num" }, num(r.cpu_temp_c, 1)),
    el("td", { class: r.throttled.length ? "trouble" : "" }, throttledText(r)),
    el("td", { class: "num" }, num(r.spool_backlog, 0)),
    el("td", { class: r.state_dir_full ? "num trouble" : "num", title: r.state_dir_full ? "state directory full" : "" }, r.state_dir_full ? `full (${bytesText(r.disk_free_bytes)})` : bytesText(r.disk_free_bytes)),
    el("td", {}, prediction),
  );
}

function render() {
  const state = document.getElementById("filter-state").value;
  const group = document.getElementById("filter-group").value;
  const text = document.getElementById("filter-text").value.toLowerCase();
  const shown = [...rows.values()].filter((r) =>
    (!state || r.state === state) && (!group || r.groups.includes(group)) &&
    (!text || [r.device, modelText(r.model), r.prediction && r.prediction.label].join(" ").toLowerCase().includes(text)));
  shown.sort(SORTS[sortKey]);
  document.querySelector("#fleet tbody").replaceChildren(...shown.map(rowNode));
  document.getElementById("shown").textContent = `${shown.length} of ${rows.size} devices`;
  renderSummary();
  fillFilters();
}

function fillFilters() {
  for (const [id, values] of [["filter-state", new Set([...rows.values()].map((r) => r.state))],
                              ["filter-group", new Set([...rows.values()].flatMap((r) => r.groups))]]) {
    const select = document.getElementById(id);
    const have = new Set([...select.options].map((o) => o.value));
    for (const value of [...values].sort()) if (!have.has(value)) select.append(el("option", { value }, value));
  }
}

function onFleet(update) {
  syncClock(update.ts);
  if (update.full) rows.clear();
  for (const r of update.devices || []) rows.set(r.device, r);
  for (const name of update.removed || []) rows.delete(name);
  if (update.summary) summary = update.summary;
  render();
}

for (const th of document.querySelectorAll("th[data-sort]")) {
  th.addEventListener("click", () => {
    sortKey = th.dataset.sort;
    document.querySelectorAll("th").forEach((h) => h.classList.toggle("sorted", h === th));
    render();
  });
}
for (const id of ["filter-state", "filter-group", "filter-text"]) document.getElementById(id).addEventListener("input", render);
document.querySelector('th[data-sort="worst"]').classList.add("sorted");
setInterval(render, 1000); // ages move between messages
connectLive(onFleet);
