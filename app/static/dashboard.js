// The operator's dashboard: polls the worker's JSON endpoints every POLL_MS and redraws.
// Every value from the server is written as text (textContent), never as HTML: log lines,
// reasons and names come from the monitored systems.
"use strict";
(() => {
  const POLL_MS = 2000;
  const MAX_POINTS = 300; // per chart: ten minutes of polls
  const TOKEN_KEY = "streamspine.adminToken";
  const LEVELS = ["trace", "debug", "info", "warn", "error", "fatal"];
  const QUANTILES = [["p50", "#4477aa"], ["p95", "#ee7733"], ["p99", "#cc3311"]];
  // The endpoints sit next to /ui/ (also behind a proxy that adds a path prefix).
  const BASE = location.pathname.replace(/ui\/?$/, "");

  const charts = new Map(); // "service\u0000metric" -> {plot, data, lastEnd}
  const tokenInput = document.getElementById("admin-token");

  // --- small helpers ----------------------------------------------------------------------------

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props || {})) {
      if (name === "class") node.className = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function fill(node, ...children) {
    node.replaceChildren(...children.filter((child) => child !== null && child !== undefined));
  }

  function number(value, digits = 3) {
    if (value === null || value === undefined) return "–";
    return Number(value).toLocaleString("en-US", { maximumFractionDigits: digits });
  }

  function time(epochSeconds) {
    if (!epochSeconds) return "–";
    const moment = new Date(epochSeconds * 1000);
    if (Number.isNaN(moment.getTime())) return String(epochSeconds); // beyond what a Date holds
    return moment.toISOString().replace("T", " ").slice(0, 19) + " UTC";
  }

  function duration(ms) {
    if (ms === null || ms === undefined) return "–";
    return ms < 1000 ? `${Math.round(ms)} ms` : `${number(ms / 1000, 1)} s`;
  }

  function percent(ratio) {
    return ratio === null || ratio === undefined ? "–" : `${number(ratio * 100, 2)} %`;
  }

  function emptyRow(columns, text) {
    return el("tr", {}, el("td", { colspan: columns, class: "muted" }, text));
  }

  async function getJSON(path) {
    const response = await fetch(BASE + path, { cache: "no-store" });
    if (response.status === 404) return null;
    if (!response.ok) throw new Error(`${path} answered ${response.status}`);
    return response.json();
  }

  // --- state-changing actions: the token the operator typed, never one from the server ----------

  tokenInput.value = sessionStorage.getItem(TOKEN_KEY) || "";
  document.getElementById("token-form").addEventListener("submit", (event) => event.preventDefault());
  tokenInput.addEventListener("input", () => {
    const token = tokenInput.value.trim();
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  });

  function showAction(text, failed) {
    const status = document.getElementById("action-status");
    status.textContent = text;
    status.classList.toggle("error", Boolean(failed));
  }

  async function adminPost(path, body, what) {
    const token = tokenInput.value.trim();
    if (!token) {
      showAction(`${what}: enter the admin token first`, true);
      return null;
    }
    let response;
    try {
      response = await fetch(BASE + path, {
        method: "POST",
        headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
        body: JSON.stringify(body),
      });
    } catch (error) {
      showAction(`${what} failed: ${error.message}`, true);
      return null;
    }
    const answer = await response.json().catch(() => null);
    if (!response.ok) {
      showAction(`${what} refused (${response.status}): ${(answer && answer.error) || response.statusText}`, true);
      return null;
    }
    showAction(`${what}: done`, false);
    return answer;
  }

  // "alertname=HighCPU, service=~check.*" -> Alertmanager-style matchers
  function parseMatchers(text) {
    return text.split(",").filter((part) => part.trim()).map((part) => {
      const match = /^\s*([A-Za-z_][\w.-]*)\s*(=~|=)\s*(.*?)\s*$/.exec(part);
      if (!match) throw new Error(`not a matcher: ${part.trim()} (use name=value or name=~regex)`);
      return { name: match[1], value: match[3], is_regex: match[2] === "=~" };
    });
  }

  async function addSilence(matchers, hours, comment) {
    const body = { matchers, ends_at: Date.now() / 1000 + hours * 3600, created_by: "dashboard", comment };
    const created = await adminPost("alerts/silences", body, "Add silence");
    if (created) refresh();
    return created;
  }

  document.getElementById("silence-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    let matchers;
    try {
      matchers = parseMatchers(form.matchers.value);
    } catch (error) {
      showAction(error.message, true);
      return;
    }
    if (await addSilence(matchers, Number(form.hours.value), form.comment.value)) form.reset();
  });

  document.getElementById("phase-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    const body = { phase: form.phase.value };
    if (body.phase === "canary") body.canary_percent = Number(form.canary_percent.value);
    if (await adminPost("migration/phase", body, `Change phase to ${body.phase}`)) refresh();
  });

  // --- alerts and silences --------------------------------------------------------------------

  function alertLabels(alert) {
    return { ...alert.labels, alertname: alert.rule, service: alert.service, instance: alert.instance,
             severity: alert.severity, metric: alert.metric };
  }

  // The worker's rule (models/alerts.py silence_matches), for display: all matchers must match.
  function silencedBy(alert, silences, now) {
    const labels = alertLabels(alert);
    return silences.find((silence) => silence.starts_at <= now && now < silence.ends_at && silence.matchers.length > 0
      && silence.matchers.every((matcher) => {
        const actual = labels[matcher.name] ?? "";
        if (!matcher.is_regex) return actual === matcher.value;
        try { return new RegExp(`^(?:${matcher.value})$`).test(actual); } catch { return false; }
      }));
  }

  function renderAlerts(alerts, silences) {
    const now = Date.now() / 1000;
    const firing = alerts.filter((alert) => alert.status === "firing").length;
    document.getElementById("alert-count").textContent = `${firing} firing, ${alerts.length - firing} pending`;
    const rows = alerts.map((alert) => {
      const silence = silencedBy(alert, silences, now);
      const matchers = [["alertname", alert.rule], ["service", alert.service], ["instance", alert.instance]]
        .map(([name, value]) => ({ name, value, is_regex: false }));
      return el("tr", { class: `alert ${alert.status}${silence ? " silenced" : ""}` },
        el("td", {}, el("span", { class: `badge ${alert.status}` }, alert.status), silence ? el("span", { class: "badge" }, "silenced") : null),
        el("td", { class: "rule" }, alert.rule),
        el("td", {}, `${alert.service} / ${alert.instance}`),
        el("td", {}, alert.severity),
        el("td", {}, `${number(alert.value)} (${alert.metric}, threshold ${number(alert.threshold)})`),
        el("td", {}, alert.summary),
        el("td", {}, time(alert.starts_at || alert.active_since)),
        el("td", {}, silence ? null : el("button", { type: "button", onclick: () => addSilence(matchers, 1, `silenced from the dashboard: ${alert.rule}`) }, "Silence 1 h")));
    });
    fill(document.querySelector("#alerts tbody"), ...(rows.length ? rows : [emptyRow(8, "No pending or firing alerts.")]));
  }

  function matcherText(matcher) {
    return `${matcher.name}${matcher.is_regex ? "=~" : "="}${matcher.value}`;
  }

  function renderSilences(silences) {
    const now = Date.now() / 1000;
    const active = silences.filter((silence) => silence.ends_at > now).sort((a, b) => a.ends_at - b.ends_at);
    const rows = active.map((silence) => el("tr", { class: "silence" },
      el("td", {}, silence.matchers.map(matcherText).join(", ")),
      el("td", {}, time(silence.ends_at)),
      el("td", {}, silence.created_by || "–"),
      el("td", {}, silence.comment || "")));
    fill(document.querySelector("#silences tbody"), ...(rows.length ? rows : [emptyRow(4, "No active silences.")]));
  }

  // --- services: metric charts and log statistics ---------------------------------------------

  function serviceCard(name) {
    const container = document.getElementById("services");
    let card = [...container.children].find((child) => child.dataset.service === name);
    if (!card) {
      card = el("article", { class: "service" },
        el("h3", {}, name, " ", el("span", { class: "alert-badge" })),
        el("div", { class: "charts" }),
        el("div", { class: "logs" }));
      card.dataset.service = name;
      container.append(card);
    }
    return card;
  }

  function windowEnd(summary) {
    const ends = Object.values(summary.instances || {}).map((instance) => instance.window_end || 0);
    return ends.length ? Math.max(...ends) : Date.now() / 1000;
  }

  function chartFor(card, service, metric) {
    const key = `${service}\u0000${metric}`;
    let chart = charts.get(key);
    if (!chart || !card.contains(chart.box)) {
      const plotArea = el("div", { class: "plot" });
      const box = el("div", { class: "chart" }, el("h4", {}, metric), el("p", { class: "stats" }), plotArea);
      box.dataset.metric = metric;
      card.querySelector(".charts").append(box);
      const data = [[], [], [], []];
      const plot = new uPlot({
        width: 360, height: 150,
        // All points, and at least two minutes: uPlot gives one point alone an axis of 1,000 days.
        scales: { x: { time: true, range: (plot) => {
          const ends = plot.data[0];
          const last = ends.length ? ends[ends.length - 1] : Date.now() / 1000;
          return [Math.min(ends.length ? ends[0] : last, last - 120), last + 1];
        } } },
        cursor: { drag: { x: false, y: false } }, // no zoom: the range above follows the data
        tzDate: (seconds) => uPlot.tzDate(new Date(seconds * 1000), "Etc/UTC"), // UTC like the rest of the page
        series: [{}, ...QUANTILES.map(([label, stroke]) => ({ label, stroke, width: 1.5, points: { size: 4 } }))],
        axes: [{ values: "{HH}:{mm}:{ss}", space: 70, size: 32 }, { size: 56 }],
        legend: { live: false },
      }, data, plotArea);
      chart = { box, plot, data, lastEnd: null };
      charts.set(key, chart);
    }
    return chart;
  }

  // One point per window end (event time): a poll that sees the same window updates its point.
  function addWindow(chart, end, summary) {
    const values = QUANTILES.map(([quantile]) => summary[quantile]);
    if (chart.lastEnd !== null && end <= chart.lastEnd) {
      if (end === chart.lastEnd) values.forEach((value, i) => { chart.data[i + 1][chart.data[0].length - 1] = value; });
    } else {
      chart.data[0].push(end);
      values.forEach((value, i) => chart.data[i + 1].push(value));
      if (chart.data[0].length > MAX_POINTS) chart.data.forEach((column) => column.shift());
      chart.lastEnd = end;
    }
    chart.plot.setData(chart.data);
  }

  function renderMetrics(card, service, windows) {
    for (const [metric, summary] of Object.entries(windows.metrics)) {
      const chart = chartFor(card, service, metric);
      addWindow(chart, windowEnd(summary), summary);
      chart.box.querySelector(".stats").textContent =
        `p50 ${number(summary.p50)} · p95 ${number(summary.p95)} · p99 ${number(summary.p99)} · ` +
        `n ${number(summary.count, 0)} in ${windows.window_s} s · ${Object.keys(summary.instances || {}).length} instance(s)`;
    }
  }

  function renderLogs(card, stats, errors) {
    const logs = card.querySelector(".logs");
    if (!stats) {
      fill(logs);
      return;
    }
    const levels = LEVELS.filter((level) => stats.current.counts[level] || stats.previous.counts[level]);
    const table = el("table", { class: "log-stats" },
      el("thead", {}, el("tr", {}, el("th", {}, `log lines per ${stats.window_s} s`), ...levels.map((level) => el("th", { class: level }, level)), el("th", {}, "error ratio"))),
      el("tbody", {}, ...[["current", stats.current], ["previous", stats.previous]].map(([name, window]) =>
        el("tr", {}, el("td", {}, name), ...levels.map((level) => el("td", {}, number(window.counts[level] || 0, 0))), el("td", {}, percent(window.error_ratio))))));
    const lines = (errors ? errors.lines : []).map((line) => el("li", {},
      el("span", { class: "muted" }, (line["@timestamp"] || "").replace("T", " ").slice(0, 19)), " ", line.message));
    fill(logs, table, lines.length ? el("ol", { class: "error-lines" }, ...lines) : el("p", { class: "muted" }, "No error lines."));
  }

  async function refreshService(service, firingCount) {
    const card = serviceCard(service.name);
    card.querySelector(".alert-badge").textContent = firingCount ? `${firingCount} firing` : "";
    const enc = encodeURIComponent(service.name);
    const [windows, stats, errors] = await Promise.all([
      service.metrics ? getJSON(`metrics/${enc}/`) : null,
      service.logs ? getJSON(`logs/stats/${enc}/`) : null,
      service.logs ? getJSON(`logs/recent/${enc}/?level=error&limit=5`) : null,
    ]);
    if (windows) renderMetrics(card, service.name, windows);
    renderLogs(card, stats, errors);
  }

  function dropGoneServices(names) {
    for (const card of [...document.getElementById("services").children]) {
      if (!names.has(card.dataset.service)) card.remove();
    }
  }

  // --- CDC, migration, dead letters -------------------------------------------------------------

  function renderCdc(status) {
    const slot = status.slot;
    document.getElementById("cdc-slot").textContent = !slot
      ? "CDC is not configured on this worker (no CDC_SOURCE_DSN)."
      : slot.error
        ? `slot ${slot.slot}: ${slot.error}`
        : `slot ${slot.slot} (publication ${slot.publication}): ${slot.active ? "active" : "inactive"}, ` +
          `confirmed ${slot.confirmed_lsn || "–"}, source WAL ${slot.source_wal_lsn || "–"}, ` +
          `captured by ${slot.capturing_worker || "no worker"}`;
    const rows = Object.entries(status.tables).sort().map(([table, stats]) => el("tr", { class: "cdc-table" },
      el("td", {}, table),
      el("td", {}, duration(stats.lag_ms)),
      el("td", {}, `${Object.entries(stats.counts).map(([op, n]) => `${op} ${number(n, 0)}`).join(" · ")} (total ${number(stats.total, 0)})`),
      el("td", {}, Object.entries(stats.last_applied_lsn).map(([sink, lsn]) => `${sink} ${lsn}`).join(", ")),
      el("td", {}, stats.applied_at_ms ? time(stats.applied_at_ms / 1000) : "–")));
    fill(document.querySelector("#cdc-tables tbody"), ...(rows.length ? rows : [emptyRow(5, "No changes applied yet.")]));
  }

  function renderMigration(status) {
    const facts = [
      ["phase", status.phase === "canary" ? `canary ${status.canary_percent} %` : status.phase],
      ["parity", `${percent(status.parity)} of ${number(status.compared, 0)} compared (${number(status.mismatched, 0)} mismatched, ` +
                 `${number(status.missing_in_v1, 0)} missing in V1, ${number(status.missing_in_v2, 0)} missing in V2)`],
      ["completeness", `${number(status.completeness.reconciled, 0)} reconciled, ${number(status.completeness.missing_in_v2, 0)} missing in V2, ` +
                       `${number(status.completeness.unknown_in_v1, 0)} unknown in V1`],
      ["bridge", `${number(status.bridge.translated, 0)} translated, ${number(status.bridge.dead_lettered, 0)} dead-lettered, lag ${duration(status.bridge.lag)}`],
      ["router", `${number(status.router.routed, 0)} routed (V1 ${number(status.router.answered_by_v1, 0)}, V2 ${number(status.router.answered_by_v2, 0)})`],
    ];
    const mismatches = Object.entries(status.field_mismatches || {});
    if (mismatches.length) facts.push(["field mismatches", mismatches.map(([field, n]) => `${field} ${n}`).join(", ")]);
    fill(document.getElementById("migration"), ...facts.flatMap(([name, text]) => [el("dt", {}, name), el("dd", {}, text)]));
  }

  function renderDeadLetters(entries) {
    const rows = entries.filter(Boolean).map((entry) => el("tr", { class: "dead-letter" },
      el("td", {}, entry.topic),
      el("td", { class: "count" }, number(entry.count, 0)),
      el("td", {}, entry.dlq_topic),
      el("td", { class: "reason" }, entry.last_reason),
      el("td", {}, time(entry.last_at))));
    fill(document.querySelector("#dead-letters tbody"), ...(rows.length ? rows : [emptyRow(5, "No dead letters.")]));
  }

  // --- the refresh loop -------------------------------------------------------------------------

  async function refresh() {
    const problems = [];
    const attempt = (what, promise) => promise.catch((error) => { problems.push(`${what}: ${error.message}`); return undefined; });
    const [overview, alerts, silences, cdc, migration] = await Promise.all([
      attempt("overview", getJSON("ui/api/overview")),
      attempt("alerts", getJSON("alerts/")),
      attempt("silences", getJSON("alerts/silences")),
      attempt("cdc", getJSON("cdc/status/")),
      attempt("migration", getJSON("migration/status/")),
    ]);
    const alertList = alerts ? alerts.alerts : [];
    if (alerts && silences) renderAlerts(alertList, silences.silences);
    if (silences) renderSilences(silences.silences);
    if (cdc) renderCdc(cdc);
    if (migration) renderMigration(migration);
    if (overview) {
      const names = new Set(overview.services.map((service) => service.name));
      dropGoneServices(names);
      document.getElementById("no-services").hidden = names.size > 0;
      await Promise.all([
        ...overview.services.map((service) => attempt(service.name, refreshService(service,
          alertList.filter((alert) => alert.service === service.name && alert.status === "firing").length))),
        attempt("dead letters", Promise.all(overview.dead_letter_topics.map((topic) =>
          getJSON(`dead-letters/${encodeURIComponent(topic)}/`))).then(renderDeadLetters)),
      ]);
      problems.push(...overview.unreachable.map((worker) => `worker ${worker} did not answer`));
    }
    const status = document.getElementById("refresh-status");
    status.textContent = `updated ${time(Date.now() / 1000)}` + (problems.length ? ` · ${problems.join(" · ")}` : "");
    status.classList.toggle("error", problems.length > 0);
  }

  async function loop() {
    try {
      await refresh();
    } catch (error) {
      showAction(`refresh failed: ${error.message}`, true);
    } finally {
      setTimeout(loop, POLL_MS);
    }
  }

  loop();
})();
