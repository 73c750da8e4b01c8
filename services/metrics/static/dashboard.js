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
    over_time: "On-time rate and online rate over time", online_by_tier: "Online rate per tier against targets",
    late_by_sector: "Late rate by sector", overdue_by_agency: "Open overdue dossiers by agency", agency: "Agency",
    payments: "Online payments", p_requested: "Requested", p_succeeded: "Succeeded", p_failed: "Failed",
    p_expired: "Expired", p_amount: "Amount (VND)", p_mismatches: "Reconciliation mismatches",
    postal: "Public postal service", pickups: "Pickups", returns: "Result returns", delivered: "Delivered",
    failed: "Failed", cod: "Collected on delivery (VND)", sms: "SMS", sent: "Sent", segments: "Segments",
    suppressed: "Suppressed", target: "target", no_data: "no data",
    sign_in: "Sign in", sign_out: "Sign out", signed_in_as: "Signed in",
    sign_in_needed: "Sign in with your operator account to see the figures.",
    session_ended: "Your session has ended: sign in again.",
  };
  const VI = { target: "chỉ tiêu", no_data: "chưa có dữ liệu", session_ended: "Phiên đăng nhập đã hết hạn: đăng nhập lại." };
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
    sessionStorage.setItem(PENDING_KEY, JSON.stringify({ verifier, state }));
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
    history.replaceState(null, "", "/");
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
    for (const id of ["from", "to", "updated"]) document.getElementById(id).textContent = "—";
  }

  function showSignedOut(message) {
    clearTimeout(timer);
    clearFigures();
    document.body.dataset.signedIn = "0";
    document.getElementById("figures").hidden = true;
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

  function range() {
    const choice = document.getElementById("range").value;
    const now = new Date(info.now);
    if (choice !== "all") {
      const hours = { "24h": 24, "7d": 168, "30d": 720 }[choice];
      return [new Date(now.getTime() - hours * 3600e3), now];
    }
    if (!info.first_event_time) return [new Date(now.getTime() - 24 * 3600e3), now];
    const first = new Date(info.first_event_time);
    const last = new Date(Math.max(new Date(info.watermark).getTime(), first.getTime()));
    const start = new Date(Math.floor(first.getTime() / 86400e3) * 86400e3);
    const end = new Date(Math.ceil((last.getTime() + 60e3) / 86400e3) * 86400e3);
    return [start, end];
  }

  const qs = (params) => new URLSearchParams(params).toString();

  function showFigures(summary) {
    document.querySelectorAll("[data-figure]").forEach((el) => {
      const [block, name] = el.dataset.figure.split(".");
      const value = summary[block][name];
      el.dataset.value = value === null ? "null" : String(value);
      el.textContent = el.dataset.kind === "rate" ? pct(value) : nf().format(value);
    });
  }

  function el(name, attrs, text) {
    const node = document.createElementNS(svgNS, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function lineChart(container, buckets) {
    const W = 900, H = 220, L = 40, B = 24, T = 10;
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
    for (const y of [0, 0.25, 0.5, 0.75, 1]) {
      const py = T + (1 - y) * (H - T - B);
      svg.append(el("line", { x1: L, x2: W, y1: py, y2: py, stroke: "#e4e8ec" }));
      svg.append(el("text", { x: 2, y: py + 4, "font-size": 11, fill: "#5b6b7b" }, y * 100 + "%"));
    }
    const step = (W - L) / Math.max(buckets.length, 1);
    const series = [["on_time_rate", "#1a8f4c"], ["online_rate", "#0b6bcb"]];
    for (const [key, colour] of series) {
      let d = "";
      buckets.forEach((b, i) => {
        const v = b.dossiers[key];
        if (v === null) return;
        const x = L + step * (i + 0.5), y = T + (1 - v) * (H - T - B);
        d += (d ? " L" : "M") + x.toFixed(1) + " " + y.toFixed(1);
        svg.append(el("circle", { cx: x, cy: y, r: 3, fill: colour }));
      });
      if (d) svg.append(el("path", { d, fill: "none", stroke: colour, "stroke-width": 2, "data-series": key }));
    }
    buckets.forEach((b, i) => {
      if (i % Math.ceil(buckets.length / 8)) return;
      const label = new Date(b.from).toLocaleDateString(lang === "en" ? "en-GB" : "vi-VN", { day: "2-digit", month: "2-digit" });
      svg.append(el("text", { x: L + step * (i + 0.5), y: H - 6, "font-size": 11, "text-anchor": "middle", fill: "#5b6b7b" }, label));
    });
    container.replaceChildren(svg);
  }

  function barChart(container, rows, opts) {
    const rowH = 26, W = 420, L = 120, R = 60;
    const H = Math.max(rows.length, 1) * rowH + 10;
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
    if (!rows.length) svg.append(el("text", { x: 10, y: 20, fill: "#5b6b7b" }, t("no_data")));
    const scale = opts.max || Math.max(0.01, ...rows.map((r) => r.value || 0));
    rows.forEach((r, i) => {
      const y = 5 + i * rowH;
      if (r.band) {
        const [lo, hi] = r.band;
        svg.append(el("rect", { x: L + (lo / scale) * (W - L - R), y: y, width: ((hi - lo) / scale) * (W - L - R), height: rowH - 6, fill: "#d8ecd9" }));
      }
      svg.append(el("text", { x: 4, y: y + 15, "font-size": 12 }, r.label));
      const width = ((r.value || 0) / scale) * (W - L - R);
      svg.append(el("rect", { x: L, y: y + 5, width: Math.max(width, 0), height: rowH - 16, fill: opts.colour, "data-group": r.key, "data-value": r.value === null ? "null" : r.value }));
      let text = pct(r.value);
      if (r.band) text += ` (${t("target")} ${Math.round(r.band[0] * 100)}–${Math.round(r.band[1] * 100)} %)`;
      svg.append(el("text", { x: L + Math.max(width, 0) + 4, y: y + 15, "font-size": 11, fill: "#1d2733" }, r.value === null ? "—" : text));
    });
    container.replaceChildren(svg);
  }

  async function refresh() {
    if (!sessionStorage.getItem(TOKEN_KEY)) { showSignedOut(null); return; }
    try {
      info = await get("/v1/metrics/info");
      showSignedIn(info.operator);
      const [start, end] = range();
      const params = { from: start.toISOString(), to: end.toISOString() };
      document.getElementById("from").textContent = params.from;
      document.getElementById("to").textContent = params.to;
      const n = 12, span = (end - start) / n;
      const bucketRequests = [...Array(n).keys()].map((i) =>
        get("/v1/metrics/summary?" + qs({ from: new Date(start.getTime() + i * span).toISOString(), to: new Date(start.getTime() + (i + 1) * span).toISOString() })));
      const [summary, tiers, sectors, agencies, ...buckets] = await Promise.all([
        get("/v1/metrics/summary?" + qs(params)),
        get("/v1/metrics/breakdown?" + qs({ ...params, by: "tier" })),
        get("/v1/metrics/breakdown?" + qs({ ...params, by: "sector" })),
        get("/v1/metrics/breakdown?" + qs({ ...params, by: "agency_code" })),
        ...bucketRequests,
      ]);
      showFigures(summary);
      lineChart(document.getElementById("chart-time"), buckets);
      const names = TIER_NAMES[lang];
      barChart(document.getElementById("chart-tier"), tiers.groups.map((g) => ({
        key: g.tier, label: names[g.tier] || g.tier, value: g.dossiers.online_rate, band: info.online_targets[g.tier],
      })), { colour: "#0b6bcb", max: 1 });
      barChart(document.getElementById("chart-sector"), sectors.groups.filter((g) => g.dossiers.resolved > 0).map((g) => ({
        key: g.sector, label: g.sector, value: g.dossiers.late / g.dossiers.resolved,
      })).sort((a, b) => b.value - a.value), { colour: "#c0392b" });
      const rows = agencies.groups.filter((g) => g.dossiers.overdue_open > 0)
        .sort((a, b) => b.dossiers.overdue_open - a.dossiers.overdue_open).slice(0, 15);
      document.querySelector("#overdue-table tbody").replaceChildren(...rows.map((g) => {
        const tr = document.createElement("tr");
        for (const v of [g.agency_code, nf().format(g.dossiers.overdue_open), nf().format(g.dossiers.in_progress)]) {
          const td = document.createElement("td"); td.textContent = v; tr.append(td);
        }
        tr.dataset.agency = g.agency_code;
        return tr;
      }));
      document.body.dataset.from = params.from;
      document.body.dataset.to = params.to;
      document.getElementById("updated").textContent = new Date().toLocaleTimeString(lang === "en" ? "en-GB" : "vi-VN");
      showError(null);
      document.body.dataset.loaded = String(Number(document.body.dataset.loaded) + 1);
    } catch (error) {
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
