// The operators' dashboard: plain JS, inline SVG charts, everything served by the service.
// Sign-in (CONTRACT section 8): the authorization code flow with PKCE (S256) at the issuer that
// /auth/config names; the issuer sends the browser back to /auth/callback, the code is exchanged
// through /auth/token and the access token kept in sessionStorage, sent as a Bearer token on every
// API call. No figure is asked for, nor shown, before that.
"use strict";
(function () {
  const EN = {
    title: "One-stop public administrative service center — figures", range: "Range", all: "All data",
    updated: "Updated", received: "Received", resolved: "Resolved", early: "Early", on_time: "On time",
    late: "Late", on_time_rate: "On-time rate", online_rate: "Online rate", in_progress: "In progress",
    overdue_open: "Open overdue", withdrawn: "Withdrawn", rejected: "Rejected",
    supplement_requested: "Supplement requested", apologies: "Apologies",
    over_time: "On-time rate and online rate over time", online_by_tier: "Online rate (procedures at level 3–4) per tier against targets",
    late_by_sector: "Late rate by sector", overdue_by_agency: "Open overdue dossiers by agency", agency: "Agency",
    payments: "Online payments", p_requested: "Requested", p_succeeded: "Succeeded", p_failed: "Failed",
    p_expired: "Expired", p_amount: "Amount (VND)", p_mismatches: "Reconciliation mismatches",
    postal: "Public postal service", pickups: "Pickups", returns: "Result returns", delivered: "Delivered",
    failed: "Failed", cod: "Collected on delivery (VND)", sms: "SMS", sent: "Sent", segments: "Segments",
    suppressed: "Suppressed", target: "target", no_data: "no data",
    sign_in: "Sign in", sign_out: "Sign out", signed_in_as: "Signed in",
    sign_in_needed: "Sign in with your operator account to see the figures.",
    session_ended: "Your session has ended: sign in again.",
    online_eligible_resolved: "Resolved, procedures online (level 3–4)",
    online_rate_eligible: "Online rate (procedures at level 3–4)",
    tier: "Tier", sector: "Sector", every_agency: "Every agency", every_tier: "Every tier",
    every_sector: "Every sector", clear_filters: "Clear filters", export_csv: "Download CSV",
    gauges_note: "In progress and open overdue: dossiers as of the end of the range (its start does not change them); a dossier waiting for the applicant's documents is not overdue, and its due date moves by the working days it waited.",
    as_of: "As of", step_hour: "hourly", step_day: "daily", step_week: "weekly",
    satisfaction_rate: "Satisfied (survey)", answers: "answers",
  };
  const VI = { target: "chỉ tiêu", no_data: "chưa có dữ liệu", session_ended: "Phiên đăng nhập đã hết hạn: đăng nhập lại.",
    step_hour: "theo giờ", step_day: "theo ngày", step_week: "theo tuần" };
  document.querySelectorAll("[data-i18n]").forEach((el) => { VI[el.dataset.i18n] = VI[el.dataset.i18n] || el.textContent; });
  const TIER_NAMES = { vi: { province: "Cấp tỉnh", district: "Cấp huyện", commune: "Cấp xã", vertical: "Ngành dọc", unknown: "Chưa rõ" },
                       en: { province: "Province", district: "District", commune: "Commune", vertical: "Vertical", unknown: "Unknown" } };
  let lang = localStorage.getItem("motcua-lang") || "vi";
  let timer = null;
  let info = null;
  let config = null;
  const TOKEN_KEY = "motcua-access-token";
  const PENDING_KEY = "motcua-sign-in";  // the PKCE verifier and state of a sign-in under way
  const t = (key) => (lang === "en" ? EN : VI)[key] || key;
  const nf = () => new Intl.NumberFormat(lang === "en" ? "en-US" : "vi-VN");
  const pct = (x) => (x === null || x === undefined ? "—" : (x * 100).toFixed(1) + " %");
  const svgNS = "http://www.w3.org/2000/svg";

  function applyLang() {
    document.documentElement.lang = lang;
    document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
    document.getElementById("lang").textContent = lang === "en" ? "Tiếng Việt" : "English";
  }

  class SignedOut extends Error {}

  async function get(path) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (!token) throw new SignedOut(t("sign_in_needed"));
    const response = await fetch(path, { cache: "no-store", headers: { Authorization: "Bearer " + token } });
    if (response.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      throw new SignedOut(t("session_ended"));
    }
    if (!response.ok) throw new Error(path + ": HTTP " + response.status);
    return response.json();
  }

  // --- sign-in -----------------------------------------------------------------------------

  const b64url = (bytes) => btoa(String.fromCharCode(...new Uint8Array(bytes)))
    .replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  const randomString = () => b64url(crypto.getRandomValues(new Uint8Array(32)));
  const redirectUri = () => location.origin + "/auth/callback";

  async function loadConfig() {
    const response = await fetch("/auth/config", { cache: "no-store" });
    if (!response.ok) throw new Error("/auth/config: HTTP " + response.status);
    config = await response.json();
  }

  async function signIn() {
    const verifier = randomString(), state = randomString();
    const challenge = b64url(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier)));
    sessionStorage.setItem(PENDING_KEY, JSON.stringify({ verifier, state, search: location.pathname === "/" ? location.search : "" }));
    location.assign(config.authorization_endpoint + "?" + qs({
      response_type: "code", client_id: config.client_id, redirect_uri: redirectUri(), scope: config.scope,
      state, code_challenge: challenge, code_challenge_method: "S256",
    }));
  }

  async function completeSignIn() {
    // Back from the issuer at /auth/callback?code=...&state=...: exchange the code once.
    const params = new URLSearchParams(location.search);
    const pending = JSON.parse(sessionStorage.getItem(PENDING_KEY) || "null");
    sessionStorage.removeItem(PENDING_KEY);
    history.replaceState(null, "", "/" + ((pending && pending.search) || ""));
    if (params.get("error")) throw new Error(params.get("error") + ": " + (params.get("error_description") || ""));
    if (!pending || !params.get("code") || params.get("state") !== pending.state) {
      throw new Error("the sign-in answer does not match the sign-in this page started");
    }
    const response = await fetch("/auth/token", {
      method: "POST", cache: "no-store", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ code: params.get("code"), code_verifier: pending.verifier, redirect_uri: redirectUri() }),
    });
    const body = await response.json();
    if (!response.ok || !body.access_token) throw new Error("sign-in: " + (body.error_description || body.detail || response.status));
    sessionStorage.setItem(TOKEN_KEY, body.access_token);
  }

  function clearFigures() {
    document.querySelectorAll("[data-figure]").forEach((el) => { delete el.dataset.value; el.textContent = "—"; });
    for (const id of ["chart-time", "chart-tier", "chart-sector"]) document.getElementById(id).replaceChildren();
    document.querySelector("#overdue-table tbody").replaceChildren();
    for (const id of ["from", "to", "updated", "as-of"]) document.getElementById(id).textContent = "—";
    shown = null;
  }

  function showSignedOut(message) {
    clearTimeout(timer);
    clearFigures();
    document.body.dataset.signedIn = "0";
    document.getElementById("figures").hidden = true;
    document.getElementById("filters").hidden = true;
    document.getElementById("who").hidden = true;
    document.getElementById("sign-out").hidden = true;
    document.getElementById("sign-in-panel").hidden = false;
    showError(message);
  }

  function showSignedIn(operator) {
    document.body.dataset.signedIn = "1";
    document.getElementById("sign-in-panel").hidden = true;
    document.getElementById("who-name").textContent = operator.sub;
    document.getElementById("who-role").textContent = operator.role || "";
    document.getElementById("who-agencies").textContent = operator.agencies ? " · " + operator.agencies.join(", ") : "";
    document.getElementById("who").hidden = false;
    document.getElementById("sign-out").hidden = false;
    document.getElementById("figures").hidden = false;
    document.getElementById("filters").hidden = false;
  }

  function signOut() {
    sessionStorage.removeItem(TOKEN_KEY);
    showSignedOut(null);
    if (config && config.end_session_endpoint) {
      location.assign(config.end_session_endpoint + "?" + qs({ client_id: config.client_id, post_logout_redirect_uri: location.origin + "/" }));
    }
  }

  function showError(message) {
    const box = document.getElementById("error");
    box.textContent = message || "";
    box.hidden = !message;
  }

  // --- what is shown: range, filters -------------------------------------------------------

  const qs = (params) => new URLSearchParams(params).toString();
  const FILTERS = ["agency_code", "tier", "sector"];
  const DAY = 86400e3;

  // Every range ends now (the API's clock): the gauges (in progress, open overdue) are counts as
  // of the end of the range, so every range shows the same ones. "All data" starts on the day of
  // the first event.
  function range() {
    const choice = document.getElementById("range").value;
    const now = new Date(info.now);
    if (choice !== "all") {
      const hours = { "24h": 24, "7d": 168, "30d": 720 }[choice];
      return [new Date(now.getTime() - hours * 3600e3), now];
    }
    if (!info.first_event_time) return [new Date(now.getTime() - DAY), now];
    const first = new Date(info.first_event_time);
    return [new Date(Math.min(Math.floor(first.getTime() / DAY) * DAY, now.getTime())), now];
  }

  // The part of [start, end) that has data, and a step giving at most a few hundred points.
  function seriesRange(start, end) {
    let from = start.getTime(), to = end.getTime();
    if (info.first_event_time) from = Math.max(from, Math.floor(new Date(info.first_event_time).getTime() / 3600e3) * 3600e3);
    if (info.watermark) to = Math.min(to, Math.ceil((new Date(info.watermark).getTime() + 60e3) / 3600e3) * 3600e3);
    if (to <= from) { from = start.getTime(); to = end.getTime(); }
    const span = to - from;
    const step = span <= 3 * DAY ? "hour" : span <= 200 * DAY ? "day" : "week";
    return [new Date(from), new Date(to), step];
  }

  function filters() {
    const out = {};
    for (const name of FILTERS) {
      const value = document.getElementById("filter-" + name).value;
      if (value) out[name] = value;
    }
    return out;
  }

  function readUrl() {
    const params = new URLSearchParams(location.search);
    const choice = params.get("range");
    if (choice && [...document.getElementById("range").options].some((o) => o.value === choice)) {
      document.getElementById("range").value = choice;
    }
    for (const name of FILTERS) wanted[name] = params.get(name) || "";
  }

  function writeUrl() {
    const params = { range: document.getElementById("range").value, ...filters() };
    if (params.range === "all") delete params.range;
    const search = qs(params);
    history.replaceState(null, "", "/" + (search ? "?" + search : ""));
  }

  const wanted = { agency_code: "", tier: "", sector: "" };  // from the URL, until the options exist
  const agencyName = (code) => (info && info.agencies[code] && info.agencies[code].name) || code;
  const sectorName = (key) => (info && info.sectors[key] && info.sectors[key][lang]) || key;
  const tierName = (tier) => TIER_NAMES[lang][tier] || tier;

  function fillFilters() {
    const scope = info.operator.agencies;
    const agencies = Object.entries(info.agencies)
      .filter(([code]) => !scope || scope.includes(code))
      .sort((a, b) => a[1].name.localeCompare(b[1].name, "vi"));
    for (const code of scope || []) if (!info.agencies[code]) agencies.push([code, { name: code }]);
    const options = {
      agency_code: agencies.map(([code, a]) => [code, a.name]),
      tier: ["province", "district", "commune", "vertical"].map((tier) => [tier, tierName(tier)]),
      sector: Object.keys(info.sectors).map((key) => [key, sectorName(key)]).sort((a, b) => a[1].localeCompare(b[1], lang)),
    };
    for (const name of FILTERS) {
      const select = document.getElementById("filter-" + name);
      const current = select.options.length > 1 ? select.value : wanted[name];
      const first = select.options[0];
      first.textContent = t(first.dataset.i18n);
      select.replaceChildren(first, ...options[name].map(([value, label]) => {
        const option = document.createElement("option");
        option.value = value; option.textContent = label;
        return option;
      }));
      if (current && !options[name].some(([value]) => value === current)) {
        const option = document.createElement("option");  // a code the catalogue does not list
        option.value = current; option.textContent = current;
        select.append(option);
      }
      select.value = current || "";
    }
  }

  // --- drawing -----------------------------------------------------------------------------

  function showFigures(summary) {
    document.querySelectorAll("[data-figure]").forEach((el) => {
      const [block, name] = el.dataset.figure.split(".");
      const value = summary[block][name];
      el.dataset.value = value === null ? "null" : String(value);
      el.textContent = el.dataset.kind === "rate" ? pct(value) : nf().format(value);
    });
    // the survey's satisfied share against the Center's target (/v1/metrics/info)
    const target = info ? info.satisfaction_target : null;
    const rate = summary.satisfaction.rate;
    document.getElementById("satisfaction-target").textContent = target === null ? "—" : pct(target);
    document.getElementById("satisfaction-card").classList.toggle("warn", rate !== null && target !== null && rate < target);
  }

  function el(name, attrs, text) {
    const node = document.createElementNS(svgNS, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function html(name, attrs, text) {
    const node = document.createElement(name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function pointLabel(point, step) {
    const when = new Date(point.from);
    const locale = lang === "en" ? "en-GB" : "vi-VN";
    if (step === "hour") return when.toLocaleTimeString(locale, { hour: "2-digit", minute: "2-digit", timeZone: "Asia/Ho_Chi_Minh" });
    return when.toLocaleDateString(locale, { day: "2-digit", month: "2-digit", year: step === "week" ? "2-digit" : undefined, timeZone: "Asia/Ho_Chi_Minh" });
  }

  function lineChart(container, series) {
    const points = series.points;
    const W = Math.max(container.clientWidth || 600, 280), H = 220, L = 40, R = 8, B = 26, T = 10;
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": t("over_time"), "data-step": series.step, "data-points": points.length });
    for (const y of [0, 0.25, 0.5, 0.75, 1]) {
      const py = T + (1 - y) * (H - T - B);
      svg.append(el("line", { x1: L, x2: W - R, y1: py, y2: py, stroke: "#e4e8ec" }));
      svg.append(el("text", { x: 2, y: py + 4, "font-size": 11, fill: "#5b6b7b" }, y * 100 + "%"));
    }
    if (!points.some((p) => p.dossiers.resolved > 0)) svg.append(el("text", { x: L + 10, y: H / 2, fill: "#5b6b7b" }, t("no_data")));
    const step = (W - L - R) / Math.max(points.length, 1);
    const lines = [["on_time_rate", "#1a8f4c"], ["online_rate_eligible", "#0b6bcb"]];
    for (const [key, colour] of lines) {
      let d = "";
      points.forEach((p, i) => {
        const v = p.dossiers[key];
        if (v === null) return;
        const x = L + step * (i + 0.5), y = T + (1 - v) * (H - T - B);
        d += (d ? " L" : "M") + x.toFixed(1) + " " + y.toFixed(1);
        if (points.length <= 60) svg.append(el("circle", { cx: x, cy: y, r: 2.5, fill: colour }));
      });
      if (d) svg.append(el("path", { d, fill: "none", stroke: colour, "stroke-width": 2, "data-series": key }));
    }
    const every = Math.max(1, Math.ceil(points.length * 64 / (W - L - R)));  // labels 64 px apart at least
    points.forEach((p, i) => {
      if (i % every) return;
      svg.append(el("text", { x: L + step * (i + 0.5), y: H - 8, "font-size": 11, "text-anchor": "middle", fill: "#5b6b7b" }, pointLabel(p, series.step)));
    });
    container.replaceChildren(svg);
    document.getElementById("series-step").textContent = "· " + t("step_" + series.step);
  }

  // Bars as HTML rows: long names wrap instead of overlapping, at any width.
  function barChart(container, rows, opts) {
    const box = html("div", { class: "bars" });
    if (!rows.length) box.append(html("span", {}, t("no_data")));
    const scale = opts.max || Math.max(0.01, ...rows.map((r) => r.value || 0));
    for (const r of rows) {
      const label = html("span", { class: "bar-label" }, r.label);
      const track = html("span", { class: "bar-track" });
      if (r.band) {
        const [lo, hi] = r.band;
        track.append(html("span", { class: "bar-band", style: `left:${(lo / scale) * 100}%;width:${((hi - lo) / scale) * 100}%` }));
      }
      const width = Math.min(100, ((r.value || 0) / scale) * 100);
      track.append(html("span", { class: "bar-fill", style: `width:${width}%;background:${opts.colour}`,
        "data-group": r.key, "data-value": r.value === null ? "null" : String(r.value) }));
      const value = html("span", { class: "bar-value" }, r.value === null ? "—" : pct(r.value) + (r.note ? " " + r.note : ""));
      box.append(label, track, value);
      if (r.band) {
        const met = r.value !== null && r.value >= r.band[0];
        box.append(html("span", { class: "bar-target", "data-met": String(met) },
          `${t("target")} ${Math.round(r.band[0] * 100)}–${Math.round(r.band[1] * 100)} %` + (r.value === null ? "" : met ? " ✓" : " ✗")));
      }
    }
    container.replaceChildren(box);
  }

  // --- export: what the page shows, as CSV ------------------------------------------------

  let shown = null;  // the rows of the CSV: section, key, name, label, value

  function csvCell(value) {
    const text = value === null || value === undefined ? "" : String(value);
    return /[",\n\r]/.test(text) || /^[=+\-@]/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text;
  }

  function exportCsv() {
    if (!shown) return;
    const lines = [["section", "key", "name", "label", "value"], ...shown].map((row) => row.map(csvCell).join(","));
    const blob = new Blob(["\ufeff" + lines.join("\r\n") + "\r\n"], { type: "text/csv;charset=utf-8" });
    const link = html("a", { href: URL.createObjectURL(blob), download: `motcua-${shown.stamp}.csv` });
    document.body.append(link);
    link.click();
    setTimeout(() => { URL.revokeObjectURL(link.href); link.remove(); }, 1000);
  }

  function rowsShown(params, summary, series, tierRows, sectorRows, agencyRows) {
    const rows = [["range", "from", "", "", params.from], ["range", "to", "", "", params.to]];
    for (const name of FILTERS) if (params[name]) rows.push(["filter", name, "", "", params[name]]);
    for (const block of ["dossiers", "payments", "postal", "sms", "satisfaction"]) {
      for (const [name, value] of Object.entries(summary[block])) rows.push(["summary", block + "." + name, name, t(name), value]);
    }
    for (const p of series.points) {
      for (const key of ["resolved", "on_time_rate", "online_rate_eligible", "overdue_open"]) rows.push(["series:" + series.step, p.from, key, t(key), p.dossiers[key]]);
    }
    for (const r of tierRows) {
      rows.push(["online_by_tier", r.key, "online_rate_eligible", r.label, r.value]);
      if (r.band) rows.push(["online_by_tier", r.key, "target", r.label, r.band.join("-")]);
    }
    for (const r of sectorRows) rows.push(["late_by_sector", r.key, "late_rate", r.label, r.value]);
    for (const g of agencyRows) {
      rows.push(["overdue_by_agency", g.agency_code, "overdue_open", agencyName(g.agency_code), g.dossiers.overdue_open]);
      rows.push(["overdue_by_agency", g.agency_code, "in_progress", agencyName(g.agency_code), g.dossiers.in_progress]);
    }
    rows.stamp = params.to.slice(0, 16).replace(/[:T]/g, "");
    return rows;
  }

  let generation = 0;  // a refresh started before a newer one draws nothing (stale choices)

  async function refresh() {
    if (!sessionStorage.getItem(TOKEN_KEY)) { showSignedOut(null); return; }
    const mine = ++generation;
    try {
      info = await get("/v1/metrics/info");
      if (mine !== generation) return;
      showSignedIn(info.operator);
      fillFilters();
      writeUrl();
      const [start, end] = range();
      const chosen = filters();
      const params = { from: start.toISOString(), to: end.toISOString(), ...chosen };
      document.getElementById("from").textContent = params.from;
      document.getElementById("to").textContent = params.to;
      const [seriesFrom, seriesTo, step] = seriesRange(start, end);
      const [summary, tiers, sectors, agencies, series] = await Promise.all([
        get("/v1/metrics/summary?" + qs(params)),
        get("/v1/metrics/breakdown?" + qs({ ...params, by: "tier" })),
        get("/v1/metrics/breakdown?" + qs({ ...params, by: "sector" })),
        get("/v1/metrics/breakdown?" + qs({ ...params, by: "agency_code" })),
        get("/v1/metrics/series?" + qs({ ...chosen, from: seriesFrom.toISOString(), to: seriesTo.toISOString(), step })),
      ]);
      if (mine !== generation) return;
      showFigures(summary);
      document.getElementById("as-of").textContent = new Date(params.to).toLocaleString(lang === "en" ? "en-GB" : "vi-VN", { timeZone: "Asia/Ho_Chi_Minh" });
      lineChart(document.getElementById("chart-time"), series);
      const tierRows = tiers.groups.map((g) => ({  // each tier's target of the year of `to`
        key: g.tier, label: tierName(g.tier), value: g.dossiers.online_rate_eligible, band: g.online_target,
      }));
      barChart(document.getElementById("chart-tier"), tierRows, { colour: "#0b6bcb", max: 1 });
      const sectorRows = sectors.groups.filter((g) => g.dossiers.resolved > 0).map((g) => ({
        key: g.sector, label: sectorName(g.sector), value: g.dossiers.late / g.dossiers.resolved,
      })).sort((a, b) => b.value - a.value);
      barChart(document.getElementById("chart-sector"), sectorRows, { colour: "#c0392b" });
      const rows = agencies.groups.filter((g) => g.dossiers.overdue_open > 0)
        .sort((a, b) => b.dossiers.overdue_open - a.dossiers.overdue_open).slice(0, 15);
      document.querySelector("#overdue-table tbody").replaceChildren(...rows.map((g) => {
        const tr = document.createElement("tr");
        const name = html("td", { class: "name" }, g.agency_name || g.agency_code);
        name.append(html("span", { class: "code" }, g.agency_code));
        tr.append(name);
        for (const v of [nf().format(g.dossiers.overdue_open), nf().format(g.dossiers.in_progress)]) tr.append(html("td", {}, v));
        tr.dataset.agency = g.agency_code;
        return tr;
      }));
      shown = rowsShown(params, summary, series, tierRows, sectorRows, rows);
      document.body.dataset.from = params.from;
      document.body.dataset.to = params.to;
      document.getElementById("updated").textContent = new Date().toLocaleTimeString(lang === "en" ? "en-GB" : "vi-VN");
      showError(null);
      document.body.dataset.loaded = String(Number(document.body.dataset.loaded) + 1);
    } catch (error) {
      if (mine !== generation) return;
      if (error instanceof SignedOut) { showSignedOut(error.message); return; }
      showError(String(error));
    }
    clearTimeout(timer);
    timer = setTimeout(refresh, ((info && info.refresh_seconds) || 10) * 1000);
  }

  document.getElementById("lang").addEventListener("click", () => {
    lang = lang === "en" ? "vi" : "en";
    localStorage.setItem("motcua-lang", lang);
    applyLang();
    refresh();
  });
  document.getElementById("range").addEventListener("change", refresh);
  for (const name of FILTERS) document.getElementById("filter-" + name).addEventListener("change", refresh);
  document.getElementById("filters").addEventListener("submit", (event) => { event.preventDefault(); refresh(); });
  document.getElementById("clear-filters").addEventListener("click", () => {
    for (const name of FILTERS) document.getElementById("filter-" + name).value = "";
    refresh();
  });
  document.getElementById("export").addEventListener("click", exportCsv);
  readUrl();
  document.getElementById("sign-in").addEventListener("click", () => signIn().catch((e) => showError(String(e))));
  document.getElementById("sign-out").addEventListener("click", signOut);
  applyLang();

  async function start() {
    try {
      await loadConfig();
      if (location.pathname === "/auth/callback") await completeSignIn();
    } catch (error) {
      showSignedOut(String(error));
      return;
    }
    refresh();
  }
  start();
})();
