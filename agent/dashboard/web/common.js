// Shared by the fleet and device pages: the live connection, ages, formatting.
"use strict";

const STALE_AFTER_MS = 15000; // no event (not even the 5 s ping) for this long: link lost

// Server clock minus page clock, so ages are computed against the collector's clock.
let clockOffset = 0;
function serverNow() { return Date.now() / 1000 + clockOffset; }
function syncClock(serverTs) { if (typeof serverTs === "number") clockOffset = serverTs - Date.now() / 1000; }

function ageText(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
  const s = Math.max(0, seconds);
  if (s < 60) return `${s.toFixed(0)} s`;
  if (s < 3600) return `${(s / 60).toFixed(0)} min`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}
function num(value, digits) { return value === null || value === undefined ? "–" : Number(value).toFixed(digits); }
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value; else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

// One EventSource; `onFleet` gets each update. The badge says when the link is lost: on an
// error, and when nothing (not even the server's ping) arrived for STALE_AFTER_MS.
function connectLive(onFleet) {
  const badge = document.getElementById("conn");
  let last = 0;
  function show(state, text) { badge.className = `conn ${state}`; badge.textContent = text; badge.dataset.state = state; }
  function open() {
    const source = new EventSource("/api/events");
    source.addEventListener("open", () => { last = Date.now(); show("live", "live"); });
    source.addEventListener("fleet", (event) => { last = Date.now(); show("live", "live"); onFleet(JSON.parse(event.data)); });
    source.addEventListener("ping", () => { last = Date.now(); show("live", "live"); });
    source.addEventListener("error", () => {
      show("lost", "connection to the collector lost — retrying");
      if (source.readyState === EventSource.CLOSED) { setTimeout(open, 2000); }
    });
  }
  setInterval(() => { if (last && Date.now() - last > STALE_AFTER_MS) show("lost", "connection to the collector lost — retrying"); }, 1000);
  open();
}
