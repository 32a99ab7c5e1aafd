// The device page: charts, recent predictions, rollout and presence history, health.
"use strict";

const deviceId = decodeURIComponent(location.pathname.replace(/^\/device\//, ""));
let lastVersion = -1;

function fmtTime(ts) { return ts ? new Date(ts * 1000).toLocaleTimeString() : "–"; }

function chart(svg, series, keys) {
  const W = 600, H = 160, L = 36, B = 18;
  const points = series.filter((p) => keys.some((k) => p[k] !== null && p[k] !== undefined));
  svg.replaceChildren();
  const ns = "http://www.w3.org/2000/svg";
  const add = (tag, attrs, text) => { const n = document.createElementNS(ns, tag); for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v); if (text !== undefined) n.textContent = text; svg.append(n); return n; };
  add("line", { x1: L, y1: H - B, x2: W, y2: H - B, class: "axis" });
  if (points.length < 2) { add("text", { x: L + 8, y: H / 2 }, "waiting for metrics…"); return; }
  const t0 = points[0].ts, t1 = points[points.length - 1].ts;
  const max = Math.max(1e-9, ...points.flatMap((p) => keys.map((k) => p[k] ?? 0))) * 1.1;
  const x = (t) => L + (W - L) * (t - t0) / Math.max(1e-9, t1 - t0);
  const y = (v) => (H - B) - (H - B - 6) * v / max;
  keys.forEach((k, i) => {
    const d = points.filter((p) => p[k] !== null && p[k] !== undefined).map((p, j) => `${j ? "L" : "M"}${x(p.ts).toFixed(1)},${y(p[k]).toFixed(1)}`).join(" ");
    add("path", { d, class: `s${i}`, "data-series": k });
  });
  add("text", { x: 2, y: 12 }, max.toFixed(1));
  add("text", { x: 2, y: H - B }, "0");
  add("text", { x: L, y: H - 4 }, fmtTime(t0));
  add("text", { x: W - 60, y: H - 4 }, fmtTime(t1));
}

function fact(name, value) { return el("div", { class: "card" }, el("b", {}, value), el("span", {}, name)); }

function render(body) {
  syncClock(body.ts);
  const r = body.row;
  document.title = `edgefleet · ${r.device}`;
  document.getElementById("device-name").textContent = r.device;
  const model = r.model ? `${r.model.name} v${r.model.version}` : "–";
  const desired = r.desired ? `${r.desired.name} v${r.desired.version}` : "–";
  const stateCard = fact("state", r.state);
  stateCard.querySelector("b").className = `state state-${r.state}`;
  stateCard.id = "device-state";
  document.getElementById("facts").replaceChildren(
    stateCard, fact("data age", ageText(r.last_seen ? serverNow() - r.last_seen : null)),
    fact("model", model), fact("desired", desired), fact("delegate", r.delegate || "–"),
    fact("fps", num(r.fps, 1)), fact("p50 / p99 ms", r.latency_p50_ms === null ? "–" : `${num(r.latency_p50_ms, 1)} / ${num(r.latency_p99_ms, 1)}`),
    fact("groups", r.groups.join(", ") || "–"), fact("agent", r.agent_version || "–"));
  chart(document.getElementById("chart-fps"), body.series, ["fps"]);
  chart(document.getElementById("chart-latency"), body.series, ["p50", "p99"]);
  document.querySelector("#predictions tbody").replaceChildren(...body.predictions.map((p) =>
    el("tr", {}, el("td", {}, p.label), el("td", { class: "num" }, num(p.score, 3)), el("td", {}, `${p.model ?? ""} v${p.model_version ?? ""}`), el("td", {}, ageText(p.ts ? serverNow() - p.ts : null)))));
  document.querySelector("#rollouts tbody").replaceChildren(...body.rollout_history.map((h) =>
    el("tr", {}, el("td", {}, fmtTime(h.ts)), el("td", {}, `${h.name ?? ""} v${h.version ?? ""}`), el("td", {}, h.state), el("td", {}, h.reason ?? ""))));
  document.querySelector("#presence tbody").replaceChildren(...body.presence_history.map((h) =>
    el("tr", {}, el("td", {}, fmtTime(h.ts)), el("td", {}, h.state))));
  const health = (body.metrics && body.metrics.health) || {};
  const items = Object.entries(health).flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, typeof v === "object" ? JSON.stringify(v) : String(v))]);
  document.getElementById("health").replaceChildren(...items);
}

async function refresh() {
  const response = await fetch(`/api/devices/${encodeURIComponent(deviceId)}`);
  if (response.status === 404) { document.getElementById("facts").replaceChildren(fact("state", "unknown device")); return; }
  const body = await response.json();
  lastVersion = body.row.version;
  render(body);
}

connectLive((update) => {
  const mine = (update.devices || []).find((r) => r.device === deviceId);
  if (update.full || mine) refresh();
});
setInterval(() => { if (lastVersion >= 0) refresh(); }, 5000);
