// The labelling page: a gallery of stored samples, one selected, labelled from the keyboard.
"use strict";

const FILTERS = ["state", "device", "trigger", "model", "predicted"];
let samples = [];
let selected = 0;
const classesOf = {}; // model -> its classes (asked once per model)

function query() {
  const params = new URLSearchParams();
  for (const name of FILTERS) {
    const value = document.getElementById(`filter-${name}`).value;
    if (value) params.set(name, value);
  }
  return params.toString();
}

async function getJSON(url) {
  const response = await fetch(url, { headers: { Accept: "application/json" } });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function say(text) { document.getElementById("message").textContent = text; }

async function loadFacets() {
  const facets = await getJSON("/api/samples/facets");
  const fill = (name, values) => {
    const select = document.getElementById(`filter-${name}`);
    const keep = select.value;
    select.replaceChildren(el("option", { value: "" }, "all"), ...values.map((v) => el("option", { value: v }, v)));
    select.value = values.includes(keep) ? keep : "";
  };
  fill("device", facets.devices); fill("trigger", facets.triggers);
  fill("model", facets.models); fill("predicted", facets.predicteds);
  document.getElementById("count").textContent = `${facets.unlabelled} unlabelled of ${facets.total}`;
}

async function classes(model) {
  if (!(model in classesOf)) {
    classesOf[model] = (await getJSON(`/api/samples/classes?model=${encodeURIComponent(model)}`)).classes;
  }
  return classesOf[model];
}

async function load() {
  try {
    samples = (await getJSON(`/api/samples?${query()}`)).samples;
    selected = Math.min(selected, Math.max(0, samples.length - 1));
    await render();
    await loadFacets();
  } catch (error) { say(String(error.message || error)); }
}

function choices(sample, known) {
  // The model's own guesses first (the likely answers), then nothing else: any other class by '/'.
  const guesses = sample.top.map((t) => t.label).filter((l) => known.includes(l));
  if (sample.shadow) for (const t of sample.shadow.top) if (known.includes(t.label) && !guesses.includes(t.label)) guesses.push(t.label);
  return guesses.slice(0, 9);
}

async function render() {
  const gallery = document.getElementById("gallery");
  gallery.replaceChildren(...samples.map((s, i) => {
    const card = el("figure", { class: i === selected ? "sample selected" : "sample", "data-sample": s.sample, tabindex: "-1" },
      el("img", { src: `/api/samples/${s.sample}.jpg`, alt: `sample from ${s.device}`, loading: "lazy" }),
      el("figcaption", {}, `${s.predicted ?? "?"} ${num(s.score, 2)} · ${s.triggers.join(", ")}`,
        el("br"), el("span", { class: "muted" }, `${s.device} · ${ageText(Date.now() / 1000 - s.ts)} ago`),
        s.label ? el("b", { class: "label" }, ` → ${s.label}`) : ""));
    card.addEventListener("click", () => { selected = i; render(); });
    return card;
  }));
  const current = document.getElementById("current");
  const sample = samples[selected];
  if (!sample) { current.replaceChildren(el("p", { class: "muted" }, "Nothing to label here.")); return; }
  let known = [];
  try { known = await classes(sample.model); } catch (error) { say(String(error.message || error)); }
  const buttons = choices(sample, known).map((label, i) => {
    const button = el("button", { type: "button", "data-label": label }, `${i + 1} · ${label}`);
    button.addEventListener("click", () => give(label));
    return button;
  });
  const other = el("input", { id: "other", list: "known", placeholder: "any class (/)", "aria-label": "any class" });
  other.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && other.value) { event.preventDefault(); give(other.value); }
    if (event.key === "Escape") other.blur();
    event.stopPropagation();
  });
  const skip = el("button", { type: "button", id: "skip" }, "s · skip");
  skip.addEventListener("click", () => give(null));
  current.replaceChildren(
    el("img", { src: `/api/samples/${sample.sample}.jpg`, alt: "the selected sample", class: "big" }),
    el("div", { class: "choices" },
      el("p", {}, `${sample.model} v${sample.model_version} says ${sample.predicted ?? "?"} (${num(sample.score, 3)})`,
        sample.shadow ? ` · candidate ${sample.shadow.model} v${sample.shadow.version} says ${sample.shadow.top[0]?.label}` : ""),
      ...buttons, other, el("datalist", { id: "known" }, ...known.map((c) => el("option", { value: c }))), skip),
  );
  if (!known.length) say(`No classes known for model ${sample.model}: edgefleet samples classes MODEL.tflite`);
}

async function give(label) {
  const sample = samples[selected];
  if (!sample) return;
  try {
    const response = await fetch(`/api/samples/${sample.sample}/label`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ label }),
    });
    const body = await response.json();
    if (!response.ok) { say(body.error || response.statusText); return; }
    say(label === null ? `skipped ${sample.sample.slice(0, 12)}` : `${sample.sample.slice(0, 12)} → ${label}`);
    if (document.getElementById("filter-state").value === "unlabelled") samples.splice(selected, 1);
    else Object.assign(sample, { label, skipped: label === null });
    selected = Math.min(selected, Math.max(0, samples.length - 1));
    await render();
    loadFacets();
  } catch (error) { say(String(error.message || error)); }
}

document.addEventListener("keydown", (event) => {
  if (event.target instanceof HTMLInputElement || event.target instanceof HTMLSelectElement) return;
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.key === "ArrowRight" || event.key === "j") { selected = Math.min(selected + 1, samples.length - 1); render(); }
  else if (event.key === "ArrowLeft" || event.key === "k") { selected = Math.max(selected - 1, 0); render(); }
  else if (event.key === "s") give(null);
  else if (event.key === "/") { event.preventDefault(); document.getElementById("other")?.focus(); }
  else if (/^[1-9]$/.test(event.key)) {
    const button = document.querySelectorAll("#current button[data-label]")[Number(event.key) - 1];
    if (button) give(button.dataset.label);
  } else return;
  event.preventDefault();
});
for (const name of FILTERS) document.getElementById(`filter-${name}`).addEventListener("change", () => { selected = 0; load(); });
load();
