// Keeps the overview live: polls /overview.json and sets text (never HTML) on the page.
"use strict";

(function () {
  const section = document.querySelector("[data-live-source]");
  if (!section) {
    return;
  }
  const source = section.getAttribute("data-live-source");
  const everyMs = 2000; // what a person watching a queue notices; one small request per tick

  function cell(text) {
    const td = document.createElement("td");
    td.textContent = String(text);
    return td;
  }

  function workerRow(w) {
    const tr = document.createElement("tr");
    [w.id, w.hostname, w.running, w.waiting, w.memory_in_use + " of " + w.memory_budget]
      .forEach(function (v) { tr.appendChild(cell(v)); });
    const meterCell = document.createElement("td");
    const meter = document.createElement("meter");
    meter.min = 0;
    meter.max = w.memory_budget_bytes || 1;
    meter.value = w.memory_in_use_bytes;
    meterCell.appendChild(meter);
    tr.appendChild(meterCell);
    return tr;
  }

  function render(data) {
    section.querySelectorAll("[data-live]").forEach(function (el) {
      const key = el.getAttribute("data-live");
      const value = key.startsWith("outcome-") ? data.outcomes[key.slice(8)] : data[key];
      if (value !== undefined) {
        el.textContent = String(value);
      }
    });
    const body = section.querySelector("[data-live-workers]");
    const rows = data.workers.map(workerRow);
    if (rows.length === 0) {
      const empty = cell("no live worker");
      empty.colSpan = 6;
      empty.className = "none";
      const tr = document.createElement("tr");
      tr.appendChild(empty);
      rows.push(tr);
    }
    body.replaceChildren.apply(body, rows);
    const stamp = section.querySelector("[data-live-updated]");
    stamp.textContent = new Date().toLocaleTimeString();
    section.setAttribute("data-live-ticks", String(Number(section.getAttribute("data-live-ticks") || 0) + 1));
  }

  function tick() {
    fetch(source, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (data) { if (data) { render(data); } })
      .catch(function () { /* the next tick tries again */ })
      .finally(function () { setTimeout(tick, everyMs); });
  }
  setTimeout(tick, everyMs);
})();
