// The vehicle user's portal: plain JavaScript, no build step, no CDN.
// Everything it shows comes from fleetgate's own routes with the user's
// token: /account, /sql, /live, /export, /grants. Data is only ever put
// into the page as text, never as markup.
"use strict";

const TOKEN_KEY = "fleetgate-token";
const PURPOSE = "own_data_access";
const VIN = /^[A-HJ-NPR-Z0-9]{17}$/;
const HISTORY_MS = 24 * 3600 * 1000;
const LATEST_ROWS = 10;

let token = sessionStorage.getItem(TOKEN_KEY);
let live = null; // the AbortController of the open live stream
let liveId = null; // the last position the live stream gave, to resume from
let points = []; // [ts_ms, soc_pct] of the chosen vehicle
let latest = []; // latest records of the chosen vehicle, newest first

const $ = (id) => document.getElementById(id);

function headers(extra) {
  return Object.assign({ Authorization: "Bearer " + token }, extra || {});
}

async function call(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  const answer = text ? JSON.parse(text) : null;
  if (!response.ok) {
    throw new Error((answer && answer.error) || response.status + " " + response.statusText);
  }
  return answer;
}

// An RFC 3339 time as "YYYY-MM-DD HH:MM:SS UTC"; other values unchanged.
function when(t) {
  return typeof t === "string" && /^\d{4}-\d\d-\d\dT/.test(t)
    ? new Date(t).toISOString().slice(0, 19).replace("T", " ") + " UTC"
    : t;
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  row.appendChild(td);
  return td;
}

function replaceRows(table, rows) {
  const body = $(table).querySelector("tbody");
  body.replaceChildren(...rows);
}

function option(select, value) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = value;
  select.appendChild(o);
}

async function signIn() {
  const account = await call("GET", "/account");
  $("user").textContent = account.user;
  $("sign-in").hidden = true;
  $("account").hidden = false;
  showVehicles(account.vehicles);
  showGrants(account.grants);
  const vehicle = $("vehicle");
  if (vehicle.value) {
    await showVehicle(vehicle.value);
  }
  document.body.dataset.state = "ready";
  document.body.dataset.readyMs = String(Math.round(performance.now()));
}

function showVehicles(vehicles) {
  const rows = [];
  const vehicle = $("vehicle");
  const grantVin = $("grant-vin");
  vehicle.replaceChildren();
  grantVin.replaceChildren();
  for (const v of vehicles) {
    for (const held of v.held) {
      const tr = document.createElement("tr");
      cell(tr, v.vin);
      cell(tr, when(held.from));
      cell(tr, held.until ? when(held.until) : "now");
      rows.push(tr);
    }
    option(vehicle, v.vin);
    option(grantVin, v.vin);
  }
  replaceRows("vehicles", rows);
}

function showGrants(grants) {
  const rows = grants.map((g) => {
    const tr = document.createElement("tr");
    tr.dataset.grant = g.id;
    cell(tr, g.recipient);
    cell(tr, g.vin);
    cell(tr, g.streams.join(", "));
    cell(tr, g.purpose);
    cell(tr, when(g.from) + " to " + (g.until ? when(g.until) : "open") +
      (g.revoked ? " (revoked " + when(g.revoked) + ")" : ""));
    cell(tr, g.last_read ? when(g.last_read) : "never");
    const action = cell(tr, "");
    if (!g.revoked) {
      const revoke = document.createElement("button");
      revoke.type = "button";
      revoke.textContent = "Revoke";
      revoke.addEventListener("click", () => revokeGrant(g.id));
      action.appendChild(revoke);
    }
    return tr;
  });
  replaceRows("grants", rows);
}

async function refreshAccount() {
  const account = await call("GET", "/account");
  showGrants(account.grants);
}

async function revokeGrant(id) {
  try {
    await call("DELETE", "/grants/" + encodeURIComponent(id));
    await refreshAccount();
  } catch (e) {
    $("grant-error").textContent = e.message;
  }
}

async function giveGrant(event) {
  event.preventDefault();
  $("grant-error").textContent = "";
  const streams = [...document.querySelectorAll("input[name=stream]:checked")].map((i) => i.value);
  try {
    await call("POST", "/grants", {
      recipient: $("grant-recipient").value.trim(),
      vin: $("grant-vin").value,
      streams,
      purpose: $("grant-purpose").value,
    });
    await refreshAccount();
  } catch (e) {
    $("grant-error").textContent = e.message;
  }
}

// The chosen vehicle: live rows from now on and, meanwhile, its last day
// of charging from SQL. Resolves once both are shown.
async function showVehicle(vin) {
  if (!VIN.test(vin)) return;
  points = [];
  latest = [];
  liveId = null;
  const connected = new Promise((resolve) => follow(vin, resolve));
  const since = Date.now() - HISTORY_MS;
  const history = await call("POST", "/sql", {
    sql:
      "SELECT ts, seq, soc_pct FROM charging WHERE vin = '" + vin + "' AND ts >= to_timestamp_millis(" +
      since + ") ORDER BY ts",
    purpose: PURPOSE,
  });
  const old = history.filter((r) => r.soc_pct !== undefined).map((r) => [Date.parse(r.ts), r.soc_pct]);
  points = old.concat(points).sort((a, b) => a[0] - b[0]);
  const older = history.reverse().map((r) => ({ table: "charging", row: r }));
  latest = latest.concat(older).slice(0, LATEST_ROWS);
  drawChart();
  drawLatest();
  await connected;
}

function drawChart() {
  const svg = $("soc-chart");
  const ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  const text = (x, y, content) => {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", x);
    t.setAttribute("y", y);
    t.textContent = content;
    svg.appendChild(t);
  };
  if (points.length === 0) {
    text(20, 100, "No charging records in the last 24 hours yet.");
    return;
  }
  const [w, h, pad] = [600, 200, 30];
  const t0 = points[0][0];
  const t1 = Math.max(points[points.length - 1][0], t0 + 1);
  const x = (t) => pad + ((t - t0) / (t1 - t0)) * (w - 2 * pad);
  const y = (v) => h - pad - (Math.min(Math.max(v, 0), 100) / 100) * (h - 2 * pad);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", points.map(([t, v]) => x(t) + "," + y(v)).join(" "));
  svg.appendChild(line);
  for (const [t, v] of points) {
    const c = document.createElementNS(ns, "circle");
    c.setAttribute("cx", x(t));
    c.setAttribute("cy", y(v));
    c.setAttribute("r", 3);
    svg.appendChild(c);
  }
  text(2, y(100) + 4, "100");
  text(8, y(0) + 4, "0");
  text(pad, h - 8, new Date(t0).toISOString().slice(11, 16));
  text(w - pad - 30, h - 8, new Date(t1).toISOString().slice(11, 16));
}

function drawLatest() {
  const rows = latest.map(({ table, row }) => {
    const tr = document.createElement("tr");
    cell(tr, when(row.ts));
    cell(tr, table);
    cell(tr, row.seq);
    const detail =
      table === "charging" ? (row.soc_pct === undefined ? "" : row.soc_pct + " %")
      : table === "diagnostics" ? [row.ecu, row.severity].filter(Boolean).join(" ")
      : row.trigger || "";
    cell(tr, detail);
    return tr;
  });
  replaceRows("latest", rows);
}

// Follows the user's live stream (Server-Sent Events over fetch, so that the
// token travels in a header, not in the URL) and keeps the chosen vehicle's rows.
// `started` is called once the stream is open, or could not be.
async function follow(vin, started) {
  const opened = started || (() => {});
  if (live) live.abort();
  const stream = new AbortController();
  live = stream;
  const status = $("live-status");
  let ended = false;
  try {
    const extra = { "x-fleetgate-purpose": PURPOSE, Accept: "text/event-stream" };
    if (liveId) extra["Last-Event-ID"] = liveId;
    const response = await fetch("/live?tables=charging,diagnostics,teleservice", {
      headers: headers(extra),
      signal: stream.signal,
    });
    if (!response.ok) {
      const answer = await response.json();
      status.textContent = "live: " + answer.error;
      opened();
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const event = { name: "message", data: "" };
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) event.name = line.slice(6).trim();
          else if (line.startsWith("id:")) liveId = line.slice(3).trim();
          else if (line.startsWith("data:")) event.data += line.slice(5).trim();
        }
        if (!event.data) continue;
        ended = ended || event.name === "end";
        handleLive(vin, event.name, JSON.parse(event.data), status);
        if (event.name === "start") opened();
      }
    }
  } catch (e) {
    opened();
    if (e.name === "AbortError") return;
    status.textContent = "live: " + e.message;
  }
  // Cut off (not ended by the policy, nor replaced): resume where it stopped.
  if (!ended && live === stream) {
    status.textContent = "live: reconnecting";
    setTimeout(() => live === stream && follow(vin), 3000);
  }
}

function handleLive(vin, name, data, status) {
  if (name === "start") {
    status.textContent = "live: connected";
  } else if (name === "end") {
    status.textContent = "live ended: " + data.reason;
  } else if (name === "rows") {
    const mine = data.rows.filter((r) => r.vin === vin);
    for (const row of mine) {
      latest.unshift({ table: data.table, row });
      if (data.table === "charging" && row.soc_pct !== undefined) {
        points.push([Date.parse(row.ts), row.soc_pct]);
      }
    }
    latest = latest.slice(0, LATEST_ROWS);
    points.sort((a, b) => a[0] - b[0]);
    if (mine.length) {
      status.textContent = "live: connected, last record " + mine[mine.length - 1].ts;
      drawChart();
      drawLatest();
    }
  }
}

async function download() {
  const response = await fetch("/export", { headers: headers() });
  if (!response.ok) {
    $("grant-error").textContent = "export: " + response.status;
    return;
  }
  const link = $("export-link");
  link.href = URL.createObjectURL(await response.blob());
  link.hidden = false;
  link.click();
}

function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  if (live) live.abort();
  location.reload();
}

async function start(given) {
  token = given;
  try {
    await signIn();
    sessionStorage.setItem(TOKEN_KEY, token);
  } catch (e) {
    sessionStorage.removeItem(TOKEN_KEY);
    $("sign-in-error").textContent = e.message;
    document.body.dataset.state = "signed-out";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in-form").addEventListener("submit", (event) => {
    event.preventDefault();
    start($("token").value.trim());
  });
  $("sign-out").addEventListener("click", signOut);
  $("grant-form").addEventListener("submit", giveGrant);
  $("export").addEventListener("click", download);
  $("vehicle").addEventListener("change", (event) => showVehicle(event.target.value));
  // A sign-in link carries the token in the fragment, which no server sees;
  // it is taken from the address at once.
  if (location.hash.startsWith("#token=")) {
    token = decodeURIComponent(location.hash.slice(7));
    history.replaceState(null, "", location.pathname);
  }
  if (token) start(token);
});
