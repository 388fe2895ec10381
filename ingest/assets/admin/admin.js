// herald's admin console. Plain DOM, no framework; the session is an HttpOnly cookie
// this script never sees. Everything from the server is put in the page as text.
"use strict";

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) {
    e.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  }
  return e;
}

async function api(method, path, body) {
  const init = { method, headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  if (r.status === 401) {
    showLogin("Your session has ended; log in again.");
    throw new Error("not logged in");
  }
  const text = await r.text();
  const json = text ? JSON.parse(text) : null;
  if (!r.ok) {
    const msg = json && json.error ? json.error.message : r.statusText;
    throw new Error(`${r.status}: ${msg}`);
  }
  return json;
}

const time = (ms) => (ms ? new Date(ms).toISOString().replace("T", " ").replace("Z", "") : "—");
const num = (v, digits = 0) =>
  v == null ? "—" : Number(v).toLocaleString("en-US", { maximumFractionDigits: digits });

// ------------------------------------------------------------------- log-in

function showLogin(message) {
  stopOverview();
  $("#tabs").hidden = true;
  $("#logout").hidden = true;
  for (const s of document.querySelectorAll(".tab")) s.hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = message || "";
}

async function start() {
  const r = await fetch("/v1/admin/session", { credentials: "same-origin" });
  if (!r.ok) {
    showLogin(r.status === 403 ? "Those credentials are not the admin's." : "");
    return;
  }
  $("#login").hidden = true;
  $("#tabs").hidden = false;
  $("#logout").hidden = false;
  const [tab, arg] = location.hash.replace(/^#/, "").split("/");
  openTab(tab || "overview", arg ? decodeURIComponent(arg) : undefined);
}

$("#login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const token = $("#token").value;
  const r = await fetch("/admin/login", {
    method: "POST",
    credentials: "same-origin",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ token }),
  });
  $("#token").value = "";
  if (r.status === 204) {
    start();
  } else {
    $("#login-error").textContent = "That is not the admin token.";
  }
});

$("#logout").addEventListener("click", async () => {
  await fetch("/admin/logout", { method: "POST", credentials: "same-origin" });
  showLogin("Logged out.");
});

// --------------------------------------------------------------------- tabs

function openTab(name, arg) {
  if (!document.getElementById(name)) name = "overview";
  for (const b of document.querySelectorAll("#tabs button")) {
    b.classList.toggle("active", b.dataset.tab === name);
  }
  for (const s of document.querySelectorAll(".tab")) s.hidden = s.id !== name;
  if (name === "overview") startOverview();
  if (name === "apps") loadApps();
  if (name === "devices" && arg) { $("#device-id").value = arg; showDevice(arg); }
  if (name === "messages" && arg) { $("#message-id").value = arg; showMessage(arg); }
}

for (const b of document.querySelectorAll("#tabs button")) {
  b.addEventListener("click", () => {
    history.replaceState(null, "", "#" + b.dataset.tab);
    openTab(b.dataset.tab);
  });
}

// ----------------------------------------------------------------- overview

const FIGURES = [
  ["accepted_per_s", "accepted / s", 0],
  ["sent_per_s", "sent / s", 0],
  ["acked_per_s", "acked / s", 0],
  ["ack_p50_ms", "ack latency p50 (ms)", 1],
  ["ack_p99_ms", "ack latency p99 (ms)", 1],
  ["connected", "connected devices", 0],
  ["lag_records", "delivery lag (records)", 0],
  ["sync_p50_ms", "log sync p50 (ms)", 2],
  ["sync_p99_ms", "log sync p99 (ms)", 2],
  ["accepted_total", "accepted (total)", 0],
  ["acked_total", "acked (total)", 0],
  ["inflight", "in flight", 0],
];

const CHARTS = [
  ["Pushes / s", [["accepted_per_s", "accepted", "#1f6feb"], ["sent_per_s", "sent", "#8250df"], ["acked_per_s", "acked", "#2e7d32"]]],
  ["Ack latency (ms)", [["ack_p50_ms", "p50", "#1f6feb"], ["ack_p99_ms", "p99", "#c62828"]]],
  ["Connected devices", [["connected", "connected", "#2e7d32"]]],
  ["Delivery lag (records)", [["lag_records", "lag", "#b08800"]]],
  ["Log sync (ms)", [["sync_p50_ms", "p50", "#1f6feb"], ["sync_p99_ms", "p99", "#c62828"]]],
];

const overview = { source: null, samples: [], charts: [], received: 0 };

function buildFigures() {
  const box = $("#figures");
  if (box.childElementCount) return;
  for (const [key, label] of FIGURES) {
    box.append(el("div", { class: "figure" },
      el("div", { class: "label" }, label),
      el("div", { class: "value", id: "fig-" + key, "data-value": "" }, "—")));
  }
}

function buildCharts() {
  if (overview.charts.length || typeof uPlot === "undefined") return;
  const box = $("#charts");
  const width = Math.max(400, Math.min(640, box.clientWidth / 2 - 20));
  for (const [title, series] of CHARTS) {
    const div = el("div", { class: "chart" });
    box.append(div);
    const opts = {
      title, width, height: 200,
      series: [{}, ...series.map(([, label, stroke]) => ({ label, stroke, width: 1.5, spanGaps: false }))],
      axes: [{}, { size: 60 }],
      scales: { x: { time: true } },
      legend: { live: false },
    };
    const chart = new uPlot(opts, [[], ...series.map(() => [])], div);
    overview.charts.push({ chart, keys: series.map(([k]) => k) });
  }
}

function redraw() {
  const s = overview.samples;
  const xs = s.map((p) => p.ts_ms / 1000);
  for (const { chart, keys } of overview.charts) {
    chart.setData([xs, ...keys.map((k) => s.map((p) => p[k]))]);
  }
  const last = s[s.length - 1];
  if (last) {
    for (const [key, , digits] of FIGURES) {
      const e = document.getElementById("fig-" + key);
      e.textContent = num(last[key], digits);
      e.dataset.value = last[key] == null ? "" : String(last[key]);
    }
    $("#updated").textContent = `Updated ${time(last.ts_ms)} UTC.`;
    document.body.dataset.samples = String(overview.received);
    document.body.dataset.lastSample = String(last.ts_ms);
  }
}

function startOverview() {
  buildFigures();
  buildCharts();
  if (overview.source) return;
  const source = new EventSource("/v1/admin/overview/stream");
  overview.source = source;
  source.addEventListener("history", (ev) => {
    overview.samples = JSON.parse(ev.data);
    redraw();
  });
  source.addEventListener("sample", (ev) => {
    overview.received += 1;
    overview.samples.push(JSON.parse(ev.data));
    if (overview.samples.length > 300) overview.samples.shift();
    redraw();
  });
  source.addEventListener("error", async () => {
    // The browser reconnects by itself; an ended session stops it for good.
    const r = await fetch("/v1/admin/session", { credentials: "same-origin" });
    if (r.status === 401 || r.status === 403) showLogin("Your session has ended; log in again.");
  });
}

function stopOverview() {
  if (overview.source) overview.source.close();
  overview.source = null;
}

// --------------------------------------------------------------------- apps

async function loadApps() {
  const tbody = $("#app-table tbody");
  try {
    const apps = await api("GET", "/v1/admin/apps");
    tbody.replaceChildren(...apps.map((a) => el("tr", { "data-app-id": a.app_id },
      el("td", {}, a.name), el("td", {}, el("code", {}, a.app_id)), el("td", {}, el("code", {}, a.app_key)),
      el("td", {}, el("code", {}, a.client_id)), el("td", {}, time(a.created_ms)),
      el("td", {}, num(a.accepted)), el("td", {}, num(a.stored)), el("td", {}, num(a.delivered)),
      el("td", {}, rotateButton(a), " ", limitsButton(a)))));
  } catch (e) {
    tbody.replaceChildren(el("tr", {}, el("td", { colspan: "9", class: "error" }, e.message)));
  }
}

function rotateButton(app) {
  const b = el("button", { class: "rotate", type: "button" }, "Rotate secret");
  b.addEventListener("click", async () => {
    if (!confirm(`Give ${app.name} a new client secret? The current one stops working now.`)) return;
    const box = $("#app-created");
    try {
      const r = await api("POST", `/v1/admin/apps/${encodeURIComponent(app.app_id)}/secret`);
      box.replaceChildren(
        el("strong", {}, `New client secret for ${app.name}, shown only now:`),
        el("dl", { class: "kv" },
          el("dt", {}, "client_id"), el("dd", { id: "created-client-id" }, el("code", {}, r.client_id)),
          el("dt", {}, "client_secret"), el("dd", { id: "rotated-client-secret" }, el("code", {}, r.client_secret))));
    } catch (e) {
      box.replaceChildren(el("span", { class: "error" }, e.message));
    }
    box.hidden = false;
  });
  return b;
}

// What an app may use: each field blank is the deployment's default (shown as the
// placeholder), as the admin API takes it (null).
const LIMITS = [
  ["pushes_per_s", "pushes / s"],
  ["broadcasts_per_min", "broadcasts / min"],
  ["max_data_bytes", "largest data (bytes)"],
  ["max_devices", "devices"],
  ["max_inbox_entries", "entries waiting per device"],
];

function limitsButton(app) {
  const b = el("button", { class: "limits", type: "button" }, "Limits");
  b.addEventListener("click", () => showLimits(app));
  return b;
}

async function showLimits(app) {
  const box = $("#app-limits");
  const path = `/v1/admin/apps/${encodeURIComponent(app.app_id)}/limits`;
  box.hidden = false;
  try {
    const view = await api("GET", path);
    const defaults = { ...view.effective };
    for (const [k] of LIMITS) if (view.set[k] != null) defaults[k] = null;
    const inputs = LIMITS.map(([k, label]) => el("label", {}, label,
      el("input", { name: k, type: "number", min: "1",
        value: view.set[k] == null ? "" : String(view.set[k]),
        placeholder: defaults[k] == null ? "default" : `default: ${defaults[k]}` })));
    const status = el("span", { class: "limits-status" });
    const form = el("form", { id: "limits-form", class: "row" },
      el("strong", {}, `Limits of ${app.name}`), ...inputs, el("button", { type: "submit" }, "Save"), status);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const body = {};
      for (const [k] of LIMITS) {
        const v = form.elements[k].value.trim();
        body[k] = v === "" ? null : Number(v);
      }
      try {
        const saved = await api("PUT", path, body);
        status.className = "limits-status saved";
        status.textContent = "Saved: " + LIMITS.map(([k, label]) =>
          `${label} ${saved.effective[k] == null ? "unlimited" : num(saved.effective[k])}`).join(", ");
      } catch (e) {
        status.className = "limits-status error";
        status.textContent = e.message;
      }
    });
    box.replaceChildren(form);
  } catch (e) {
    box.replaceChildren(el("span", { class: "error" }, e.message));
  }
}

$("#app-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const box = $("#app-created");
  try {
    const a = await api("POST", "/v1/apps", { name: $("#app-name").value });
    $("#app-name").value = "";
    box.replaceChildren(
      el("strong", {}, "App created. The client secret is shown only now:"),
      el("dl", { class: "kv" },
        el("dt", {}, "app_id"), el("dd", { id: "created-app-id" }, el("code", {}, a.app_id)),
        el("dt", {}, "app_key"), el("dd", {}, el("code", {}, a.app_key)),
        el("dt", {}, "client_id"), el("dd", { id: "created-client-id" }, el("code", {}, a.client_id)),
        el("dt", {}, "client_secret"), el("dd", { id: "created-client-secret" }, el("code", {}, a.client_secret))));
    box.hidden = false;
    loadApps();
  } catch (e) {
    box.replaceChildren(el("span", { class: "error" }, e.message));
    box.hidden = false;
  }
});

// ------------------------------------------------------------------ devices

$("#device-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const id = $("#device-id").value.trim();
  history.replaceState(null, "", "#devices/" + encodeURIComponent(id));
  showDevice(id);
});

async function showDevice(id) {
  const view = $("#device-view");
  try {
    const d = await api("GET", "/v1/admin/devices/" + encodeURIComponent(id));
    const p = d.presence;
    const presence = !p ? "never connected"
      : p.connected ? `connected to ${p.gateway_id} since ${time(p.since_ms)} UTC, keep-alive ${p.keep_alive_s} s`
      : `disconnected since ${time(p.since_ms)} UTC (last on ${p.gateway_id})`;
    view.replaceChildren(
      el("dl", { class: "kv" },
        el("dt", {}, "device"), el("dd", {}, el("code", {}, d.device_id)),
        el("dt", {}, "app"), el("dd", {}, el("code", {}, d.app_id)),
        el("dt", {}, "platform / network"), el("dd", {}, `${d.platform || "—"} / ${d.network || "—"}`),
        el("dt", {}, "registered"), el("dd", {}, time(d.registered_ms) + " UTC"),
        el("dt", {}, "presence"),
        el("dd", { id: "presence", class: p && p.connected ? "state-connected" : "state-disconnected" }, presence),
        el("dt", {}, "next seq"), el("dd", {}, d.next_seq)),
      el("h3", {}, `Inbox: ${d.inbox.length}${d.more ? "+" : ""} unacknowledged`),
      el("table", { id: "inbox" },
        el("thead", {}, el("tr", {}, ...["seq", "message", "accepted", "expires", "state"].map((h) => el("th", {}, h)))),
        el("tbody", {}, ...d.inbox.map((e) => el("tr", {},
          el("td", {}, e.seq),
          el("td", {}, el("a", { href: "#messages/" + encodeURIComponent(e.message_id) }, e.message_id)),
          el("td", {}, time(e.ts_ms)), el("td", {}, time(e.expires_at_ms)),
          el("td", { class: "state-" + e.state }, e.state))))));
  } catch (e) {
    view.replaceChildren(el("p", { class: "error" }, e.message));
  }
}

// ----------------------------------------------------------------- messages

$("#message-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const id = $("#message-id").value.trim();
  history.replaceState(null, "", "#messages/" + encodeURIComponent(id));
  showMessage(id);
});

window.addEventListener("hashchange", () => {
  const [tab, arg] = location.hash.replace(/^#/, "").split("/");
  if (!$("#tabs").hidden) openTab(tab, arg ? decodeURIComponent(arg) : undefined);
});

function describe(e) {
  const ev = e.event || {};
  switch (e.type) {
    case "PushAccepted": return ev.target ? `accepted for ${JSON.stringify(ev.target)}` : "accepted";
    case "Stored": return e.device_id ? `stored in device ${e.device_id}'s inbox` : `stored in ${e.devices} inbox(es)`;
    case "FanOut": return `share for partition ${ev.partition}`;
    case "DeviceReceived": return `device ${ev.device_id} received it (QoS 2) via ${ev.gateway_id}`;
    case "DeviceAcked": return `device ${ev.device_id} acknowledged it (seq ${ev.seq}) via ${ev.gateway_id}`;
    case "MessageRecalled": return "recalled by the app";
    case "Expired": return `expired with ${e.outstanding} device(s) not reached`;
    default: return "";
  }
}

async function showMessage(id) {
  const view = $("#message-view");
  try {
    const m = await api("GET", "/v1/admin/messages/" + encodeURIComponent(id));
    const s = m.status;
    view.replaceChildren(
      el("dl", { class: "kv", id: "message-status" },
        el("dt", {}, "message"), el("dd", {}, el("code", {}, s.message_id)),
        el("dt", {}, "app"), el("dd", {}, el("code", {}, m.app_id)),
        el("dt", {}, "accepted"), el("dd", {}, time(s.accepted_at_ms) + " UTC"),
        el("dt", {}, "expires"), el("dd", {}, time(s.expires_at_ms) + " UTC"),
        el("dt", {}, "targeted / acked"), el("dd", { id: "message-counts" }, `${s.targeted} / ${s.acked}`),
        el("dt", {}, "expired / recalled / replaced"), el("dd", {}, `${s.expired} / ${s.recalled} / ${s.replaced}`),
        el("dt", {}, "state"), el("dd", { id: "message-state" }, s.state)),
      el("h3", {}, "Timeline" + (m.complete ? "" : " (scan limit reached; later events not shown)")),
      el("table", { id: "timeline" },
        el("thead", {}, el("tr", {}, ...["time (UTC)", "event", "partition / offset", "what"].map((h) => el("th", {}, h)))),
        el("tbody", {}, ...m.timeline.map((e) => el("tr", { "data-type": e.type },
          el("td", {}, time(e.ts_ms)),
          el("td", { class: e.type === "DeviceAcked" ? "state-acked" : e.type === "Expired" ? "state-expired" : "" }, e.type),
          el("td", {}, e.offset == null ? "" : `${e.partition} / ${e.offset}`),
          el("td", {}, describe(e)))))));
  } catch (e) {
    view.replaceChildren(el("p", { class: "error" }, e.message));
  }
}

start();
