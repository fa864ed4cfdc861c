// The status page of the admin port: polls /api/status, draws each route, and sends an
// operator's actions with the admin token as a Bearer header. No build step, no library.
"use strict";

const POLL_MS = 2000;
const DECISIONS = 20; // as many as the proxy keeps per route
const TOKEN_KEY = "canary-proxy-admin-token";
const SVG = "http://www.w3.org/2000/svg";
const CHART = { width: 600, height: 180, left: 36, right: 12, top: 10, bottom: 24 };
const APPLIES = {
  // which buttons apply in which rollout status (the proxy refuses the rest with 409)
  pause: ["shadow", "progressing"],
  resume: ["paused", "rolled_back", "complete"],
  advance: ["shadow", "progressing", "paused"],
  promote: ["shadow", "progressing", "paused", "promoted", "rolled_back", "manual", "testing", "complete"],
  rollback: ["shadow", "progressing", "paused", "promoted", "rolled_back", "manual", "testing", "complete"],
};

const samples = new Map(); // route -> [[epoch ms, weight]] seen by this page
const cards = new Map(); // route -> its section

function token() {
  return document.getElementById("token").value.trim();
}

function percent(x) {
  return x === null || x === undefined ? "–" : `${(x * 100).toFixed(2)}%`;
}

function number(x) {
  return x === null || x === undefined ? "–" : x.toFixed(1);
}

function seconds(x) {
  if (x === null || x === undefined) return "–";
  return x < 1 ? `${Math.round(x * 1000)} ms` : `${x.toFixed(2)} s`;
}

function span(s) {
  const whole = Math.max(0, Math.round(s));
  const h = Math.floor(whole / 3600), m = Math.floor((whole % 3600) / 60), sec = whole % 60;
  if (h) return m ? `${h}h ${m}m` : `${h}h`;
  if (m) return sec ? `${m}m ${sec}s` : `${m}m`;
  return `${sec}s`;
}

function clock(ms) {
  return new Date(ms).toLocaleTimeString([], { hour12: false });
}

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

async function poll() {
  try {
    const response = await fetch(`/api/status?decisions=${DECISIONS}`, { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
    document.getElementById("problem").hidden = true;
  } catch (error) {
    const problem = document.getElementById("problem");
    problem.textContent = `The proxy does not answer: ${error.message}. Retrying…`;
    problem.hidden = false;
  }
}

function render(status) {
  const store = status.controller.store_up === false ? ", state store DOWN" : "";
  const leader = status.controller.leader ? "leader" : "not leader";
  document.getElementById("summary").textContent =
    `v${status.proxy_version} · config ${status.config.version} · ${leader}${store} · ` +
    `${status.processes.length || 1} process(es) · stats over ${status.window_s}s · ` +
    `updated ${clock(Date.now())}`;
  const main = document.getElementById("routes");
  for (const route of status.routes) {
    let card = cards.get(route.name);
    if (!card) {
      card = document.getElementById("route-template").content.firstElementChild.cloneNode(true);
      card.dataset.route = route.name;
      for (const button of card.querySelectorAll("button[data-action]")) {
        button.addEventListener("click", () => act(route.name, button, card));
      }
      cards.set(route.name, card);
      main.appendChild(card);
    }
    const history = samples.get(route.name) || [];
    history.push([Date.now(), route.weight]);
    if (history.length > 2000) history.shift();
    samples.set(route.name, history);
    fill(card, route, status.window_s);
  }
}

function fill(card, route, windowS) {
  const rollout = route.rollout;
  const state = rollout.status || "manual";
  card.querySelector(".name").textContent = route.name;
  card.querySelector(".variants").textContent = `stable ${route.stable} → canary ${route.canary}`;
  const badge = card.querySelector(".status");
  badge.textContent = state.replace("_", " ");
  badge.className = `status badge ${state}`;
  card.querySelector(".weight").textContent = `${route.weight}%`;
  const steps = rollout.steps;
  const shadow = route.shadow;
  card.querySelector(".step").textContent = !steps
    ? "no automatic steps"
    : state === "shadow"
      ? `in shadow (${percent(shadow.share)} of stable's requests), then ${steps.join(" · ")}%`
      : `step ${rollout.step + 1}/${steps.length} of ${steps.join(" · ")}%`;
  const waits = [];
  if (rollout.pause_left_s) {
    const where = state === "shadow" ? "in shadow" : "pausing at this step";
    waits.push(`${where}, ${span(rollout.pause_left_s)} left`);
  }
  if (shadow && shadow.requests.dispatched + shadow.requests.dropped) {
    const r = shadow.requests;
    waits.push(
      `shadow requests: ${r.completed} completed, ${r.failed} failed, ${r.dropped} dropped`,
    );
  }
  if (rollout.cooldown_left_s) waits.push(`cooldown, ${span(rollout.cooldown_left_s)} left`);
  if (rollout.ab_left_s) waits.push(`A/B test running, ${span(rollout.ab_left_s)} left`);
  if (rollout.next_judgement_in_s !== null && (state === "progressing" || state === "shadow")) {
    waits.push(`next judgement in ${span(rollout.next_judgement_in_s)}`);
  }
  card.querySelector(".waits").textContent = waits.join(" · ");
  for (const button of card.querySelectorAll("button[data-action]")) {
    if (button.dataset.force) continue;
    button.disabled = !(APPLIES[button.dataset.action] || []).includes(state);
  }
  chart(card.querySelector(".weight-chart"), route);
  const figures = { ...route.variants };
  if (shadow && shadow.pairs.canary.requests) {
    // Shadow pairs, apart from served traffic: stable's answers and the canary's to the same requests.
    figures["shadow stable"] = shadow.pairs.stable;
    figures["shadow canary"] = shadow.pairs.canary;
  }
  variants(card.querySelector(".variants-table tbody"), figures, windowS);
  const verdict = rollout.last_verdict;
  card.querySelector(".verdict").textContent = verdict
    ? `Last verdict: ${verdict.verdict} — ${verdict.reason}`
    : "No verdict yet.";
  decisions(card.querySelector(".decisions"), rollout.decisions || []);
}

function variants(body, figures, windowS) {
  body.replaceChildren();
  for (const [name, v] of Object.entries(figures)) {
    const row = element("tr");
    row.append(
      element("td", name, name.replace(" ", "-")),
      element("td", String(v.requests)),
      element("td", v.requests ? percent(v.error_rate) : "–"),
      element("td", ["p50", "p95", "p99"].map((q) => seconds(v.latency_s[q])).join(" / ")),
      element("td", ["p50", "p95"].map((q) => seconds(v.ttft_s[q])).join(" / ")),
      element("td", (v.output_tokens / windowS).toFixed(1)),
      element("td", number(v.output_tokens_per_request)),
      element("td", number(v.output_tokens_per_s)),
      element("td", v.feedback ? `${percent(v.feedback_negative_rate)} of ${v.feedback}` : "–"),
    );
    body.appendChild(row);
  }
}

function decisions(list, items) {
  list.replaceChildren();
  for (const d of items.slice(0, 8)) {
    const item = element("li");
    const at = new Date(d.at);
    const time = element("time", clock(at.getTime()));
    time.dateTime = d.at;
    item.append(time, element("strong", `${d.action} `), d.reason);
    list.appendChild(item);
  }
  if (!items.length) list.appendChild(element("li", "none yet", "muted"));
}

// The weight as a step line: from the decisions the proxy keeps, then what this page saw.
function points(route) {
  const known = (route.rollout.decisions || [])
    .map((d) => [Date.parse(d.at), d.weight_before, d.weight_after])
    .sort((a, b) => a[0] - b[0]);
  const result = [];
  for (const [at, before, after] of known) {
    result.push([at - 1, before], [at, after]);
  }
  for (const sample of samples.get(route.name) || []) result.push(sample);
  result.sort((a, b) => a[0] - b[0]);
  return result;
}

function chart(svg, route) {
  const data = points(route);
  const now = Date.now();
  const start = Math.min(data.length ? data[0][0] : now, now - 60_000);
  const { width, height, left, right, top, bottom } = CHART;
  const x = (t) => left + ((t - start) / Math.max(1, now - start)) * (width - left - right);
  const y = (w) => top + (1 - w / 100) * (height - top - bottom);
  svg.replaceChildren();
  for (const w of [0, 25, 50, 75, 100]) {
    svg.append(line(left, y(w), width - right, y(w), "grid"), label(left - 6, y(w) + 4, `${w}%`, "end"));
  }
  svg.append(label(left, height - 6, clock(start), "start"), label(width - right, height - 6, clock(now), "end"));
  if (!data.length) return;
  let path = `M ${x(data[0][0]).toFixed(1)} ${y(data[0][1]).toFixed(1)}`;
  let last = data[0][1];
  for (const [t, w] of data.slice(1)) {
    path += ` H ${x(t).toFixed(1)} V ${y(w).toFixed(1)}`;
    last = w;
  }
  path += ` H ${x(now).toFixed(1)}`;
  const area = document.createElementNS(SVG, "path");
  area.setAttribute("d", `${path} V ${y(0)} H ${x(data[0][0]).toFixed(1)} Z`);
  area.setAttribute("class", "area");
  const stroke = document.createElementNS(SVG, "path");
  stroke.setAttribute("d", path);
  stroke.setAttribute("class", "line");
  const mark = document.createElementNS(SVG, "circle");
  mark.setAttribute("cx", x(now).toFixed(1));
  mark.setAttribute("cy", y(last).toFixed(1));
  mark.setAttribute("r", "4");
  mark.setAttribute("class", "mark");
  svg.append(area, stroke, mark);
}

function line(x1, y1, x2, y2, className) {
  const node = document.createElementNS(SVG, "line");
  for (const [k, v] of Object.entries({ x1, y1, x2, y2 })) node.setAttribute(k, v.toFixed(1));
  node.setAttribute("class", className);
  return node;
}

function label(xPos, yPos, text, anchor) {
  const node = document.createElementNS(SVG, "text");
  node.setAttribute("x", xPos.toFixed(1));
  node.setAttribute("y", yPos.toFixed(1));
  node.setAttribute("text-anchor", anchor);
  node.setAttribute("class", "axis");
  node.textContent = text;
  return node;
}

async function act(route, button, card) {
  const action = button.dataset.action;
  const force = button.dataset.force === "true";
  if ((action === "promote" || action === "rollback") && !window.confirm(`${action} route ${route}?`)) {
    return;
  }
  const outcome = card.querySelector(".outcome");
  const forceButton = card.querySelector("button.force");
  outcome.className = "outcome";
  outcome.textContent = `${action}…`;
  const headers = token() ? { Authorization: `Bearer ${token()}` } : {};
  const url = `/api/routes/${encodeURIComponent(route)}/${action}${force ? "?force=true" : ""}`;
  try {
    const response = await fetch(url, { method: "POST", headers });
    const body = await response.json().catch(() => ({}));
    if (response.ok) {
      outcome.textContent = `${action}: done, ${body.status} at ${body.weight}%`;
      forceButton.hidden = true;
    } else if (response.status === 401) {
      throw new Error("the admin token is missing or wrong: enter it above");
    } else {
      forceButton.hidden = !(response.status === 409 && body.retry_after_s);
      throw new Error(body.error || `HTTP ${response.status}`);
    }
  } catch (error) {
    outcome.className = "outcome error";
    outcome.textContent = `${action} refused: ${error.message}`;
  }
  await poll();
}

function start() {
  const input = document.getElementById("token");
  input.value = sessionStorage.getItem(TOKEN_KEY) || "";
  input.addEventListener("input", () => sessionStorage.setItem(TOKEN_KEY, token()));
  document.getElementById("token-form").addEventListener("submit", (event) => event.preventDefault());
  poll();
  setInterval(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", start);
