// kiln's dashboard: reads the HTTP API every few seconds and redraws in place (docs/http.md).
// Everything it loads comes from kiln. The token (for Cancel) stays in this tab's storage.
"use strict";

const REFRESH_MS = 5000;
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

function token() {
  return sessionStorage.getItem("kiln-token") || "";
}

function headers() {
  const h = { "Accept": "application/json" };
  if (token()) h["Authorization"] = "Bearer " + token();
  return h;
}

async function get(path) {
  const r = await fetch(path, { headers: headers(), cache: "no-store" });
  const body = await r.json();
  if (!r.ok || !body.ok) throw new Error(path + ": " + (body.error || r.status));
  return body;
}

function cell(row, value, numeric) {
  const td = document.createElement("td");
  td.textContent = value === null || value === undefined ? "-" : String(value);
  if (numeric) td.className = "n";
  row.appendChild(td);
  return td;
}

function fill(tableId, items, draw) {
  const body = document.querySelector("#" + tableId + " tbody");
  const rows = items.map((item) => {
    const tr = document.createElement("tr");
    draw(tr, item);
    return tr;
  });
  body.replaceChildren(...rows);
}

function when(ms) {
  return ms === null || ms === undefined ? "-" : new Date(ms).toISOString().replace(".000Z", "Z");
}

function drawRamps(status) {
  $("plan").textContent = status.plan + " (" + status.timezone + ")";
  fill("ramps", status.ramps, (tr, r) => {
    tr.dataset.key = r.batch + "/" + r.provider;
    cell(tr, r.batch);
    cell(tr, r.provider);
    cell(tr, r.state).className = "state";
    cell(tr, r.step + " of " + r.steps).className = "step";
    cell(tr, r.day_cap_total, true).classList.add("daily-cap");
    cell(tr, r.day_used, true).classList.add("day-used");
    cell(tr, r.hourly_cap, true);
    cell(tr, r.hour_used, true);
  });
  const choice = $("ramp-choice");
  const keys = status.ramps.map((r) => r.batch + "/" + r.provider);
  if (choice.options.length !== keys.length) {
    const kept = choice.value;
    choice.replaceChildren(...keys.map((k) => new Option(k, k)));
    if (keys.includes(kept)) choice.value = kept;
  }
}

function drawKeys(caps, today) {
  const counts = new Map(today.keys.map((k) => [k.ip + "|" + k.provider, k]));
  const rows = caps.keys.map((k) => ({ tier: "warming", room: k, c: counts.get(k.ip + "|" + k.provider) }));
  for (const k of today.keys) {
    if (!k.warming) rows.push({ tier: "warm", room: null, c: k, ip: k.ip, provider: k.provider });
  }
  fill("keys", rows, (tr, r) => {
    const ip = r.room ? r.room.ip : r.ip;
    const provider = r.room ? r.room.provider : r.provider;
    tr.dataset.key = ip + "/" + provider;
    if (r.room && r.room.per_hour === 0) tr.className = "held";
    cell(tr, ip);
    cell(tr, provider);
    cell(tr, r.tier);
    cell(tr, r.room ? r.room.per_hour : "no cap", true).classList.add("per-hour");
    cell(tr, r.room ? r.room.bound : "");
    for (const f of ["granted", "delivered", "deferred", "bounced"]) cell(tr, r.c ? r.c[f] : 0, true);
  });
}

function drawAutomations(list) {
  fill("automations", list.automations, (tr, a) => {
    tr.dataset.id = a.id;
    cell(tr, a.id);
    cell(tr, a.kind);
    cell(tr, a.scope);
    cell(tr, a.rule);
    cell(tr, a.expires || a.ends_when);
    cell(tr, a.reason);
    const td = document.createElement("td");
    const b = document.createElement("button");
    b.className = "cancel";
    b.textContent = "Cancel";
    b.addEventListener("click", () => cancel(a.id));
    td.appendChild(b);
    tr.appendChild(td);
  });
}

function drawSignals(signals) {
  fill("signals", signals.sources, (tr, s) => {
    tr.dataset.source = s.source;
    cell(tr, s.source);
    cell(tr, s.stale ? "stale: holds its ramps" : "fresh");
    cell(tr, when(s.last_good_ms));
    cell(tr, s.failures, true);
    cell(tr, s.last_error);
  });
}

function drawDecisions(log) {
  const latest = log.decisions.slice(-20).reverse();
  fill("decisions", latest, (tr, e) => {
    cell(tr, when(e.at_ms));
    cell(tr, e.kind);
    cell(tr, e.subject);
    cell(tr, e.action);
    cell(tr, e.reason);
  });
}

function line(svg, points, cls, colour) {
  const p = document.createElementNS(SVG, "polyline");
  p.setAttribute("points", points.map((xy) => xy.join(",")).join(" "));
  p.setAttribute("fill", "none");
  p.setAttribute("stroke", colour);
  p.setAttribute("stroke-width", "2");
  p.setAttribute("class", cls);
  svg.appendChild(p);
}

function drawChart(history) {
  const days = history.days;
  const w = 800, h = 200, pad = 30;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 " + w + " " + h);
  const top = Math.max(1, ...days.map((d) => Math.max(d.planned_cap || 0, d.actual_cap || 0, d.delivered)));
  const x = (i) => pad + (i + 0.5) * ((w - 2 * pad) / Math.max(days.length, 1));
  const y = (v) => h - pad - (v / top) * (h - 2 * pad);
  const barW = Math.max(1, (w - 2 * pad) / Math.max(days.length, 1) - 2);
  days.forEach((d, i) => {
    const bar = document.createElementNS(SVG, "rect");
    bar.setAttribute("x", x(i) - barW / 2);
    bar.setAttribute("y", y(d.delivered));
    bar.setAttribute("width", barW);
    bar.setAttribute("height", h - pad - y(d.delivered));
    bar.setAttribute("fill", "#8cc084");
    bar.setAttribute("class", "delivered");
    svg.appendChild(bar);
    if (d.move === "hold" || d.move === "step_down") {
      const m = document.createElementNS(SVG, "circle");
      m.setAttribute("cx", x(i));
      m.setAttribute("cy", pad / 2);
      m.setAttribute("r", 4);
      m.setAttribute("fill", d.move === "hold" ? "#e0a800" : "#c0392b");
      m.setAttribute("class", "mark " + d.move);
      const t = document.createElementNS(SVG, "title");
      t.textContent = d.date + ": " + d.move + " - " + (d.reason || "");
      m.appendChild(t);
      svg.appendChild(m);
    }
  });
  line(svg, days.filter((d) => d.planned_cap !== null).map((d) => [x(days.indexOf(d)), y(d.planned_cap)]), "planned", "#8a96a3");
  line(svg, days.filter((d) => d.actual_cap !== null).map((d) => [x(days.indexOf(d)), y(d.actual_cap)]), "actual", "#2a7ab8");
  const label = document.createElementNS(SVG, "text");
  label.setAttribute("x", pad);
  label.setAttribute("y", h - 8);
  label.textContent = days.length ? days[0].date + " .. " + days[days.length - 1].date + " (max " + top + ")" : "no days yet";
  svg.appendChild(label);
  $("chart").replaceChildren(svg);
}

function showError(err) {
  const box = $("error");
  if (err) {
    box.textContent = String(err.message || err);
    box.hidden = false;
  } else {
    box.hidden = true;
  }
}

async function refresh() {
  try {
    const since = Date.now() - 86400000;
    const [status, caps, today, autos, signals, log] = await Promise.all([
      get("/api/status"),
      get("/api/caps"),
      get("/api/today"),
      get("/api/automations"),
      get("/api/signals"),
      get("/api/decisions?limit=1000&since_ms=" + since),
    ]);
    drawRamps(status);
    drawKeys(caps, today);
    drawAutomations(autos);
    drawSignals(signals);
    drawDecisions(log);
    const choice = $("ramp-choice").value;
    if (choice) {
      const [batch, provider] = choice.split("/");
      drawChart(await get("/api/ramp?batch=" + encodeURIComponent(batch) + "&provider=" + encodeURIComponent(provider)));
    }
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.ready = "true";
    showError(null);
  } catch (err) {
    showError(err);
  }
}

async function cancel(id) {
  try {
    const r = await fetch("/api/automations/" + encodeURIComponent(id) + "/cancel", {
      method: "POST",
      headers: { ...headers(), "Content-Type": "application/json" },
      body: JSON.stringify({ by: "the dashboard" }),
    });
    const body = await r.json();
    if (!r.ok) throw new Error("cancel " + id + ": " + body.error);
    await refresh();
  } catch (err) {
    showError(err);
  }
}

$("token").value = token();
$("token").addEventListener("change", (e) => {
  sessionStorage.setItem("kiln-token", e.target.value.trim());
  refresh();
});
$("ramp-choice").addEventListener("change", refresh);
refresh();
setInterval(refresh, REFRESH_MS);
