// The eventrun dashboard: one page over the gateway's JSON API, no build step, no dependencies.
//
// Everything the server sends (names, payloads, log lines, error messages) is untrusted.
// The DOM is therefore built with createElement, textContent and setAttribute only; no
// HTML string is ever parsed. Links carry ids through encodeURIComponent.
"use strict";

const STATUSES = ["QUEUED", "RUNNING", "FINISHED", "FAILED", "TIMED_OUT", "ABORTED"];
const ACTIVE = new Set(["QUEUED", "RUNNING"]);
const PAGE_SIZE = 50;
const OVERVIEW_EVERY_MS = 2000;
const RUNS_EVERY_MS = 1000;
const RUN_EVERY_MS = 1000;
const LOG_FLUSH_MS = 40; // lines arriving in a burst are added to the page in one go
const LOG_LINES_SHOWN = 20000; // the last lines of a log the page holds: a 60 MB log would take it minutes and GBs
const JSON_CHARS_SHOWN = 100000; // of a result or an event shown pretty-printed; the rest is cut, and said so
const STREAM_RETRY_MS = 2000; // as EventSource waits before it reconnects
const LOG_TAIL_BYTES = 2 * 1024 * 1024; // of a live log so far, what a follow sends: its last lines, not 64 MB
const TOKEN_KEY = "eventrun.token";

// ------------------------------------------------------------------------------ DOM helpers

/** The element with this data-testid (the page's stable handles). */
function byTestId(testid) {
  return document.querySelector(`[data-testid="${testid}"]`);
}

/** Characters that turn the text after them around or mark its direction unseen (U+202E, U+2066
 * to U+2069, U+200E, U+200F, U+061C): shown escaped, as the CLI shows them, so that text from a
 * run cannot pass for other text ("1234 \u202e9876" would read "1234 6789"). */
const TURNING = /[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;

function shown(text) {
  return String(text).replace(TURNING, (char) => `\\u${char.charCodeAt(0).toString(16).padStart(4, "0")}`);
}

/** A new element; `props.text` becomes its text, other props plain attributes set by our code. */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = shown(value);
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  node.append(...children.filter((child) => child !== null && child !== undefined).map((child) => (typeof child === "string" ? shown(child) : child)));
  return node;
}

/** Set text only when it differs, so unchanged cells are not touched on every refresh. */
function setText(node, text) {
  const value = shown(text);
  if (node.textContent !== value) node.textContent = value;
}

/** A status badge's classes: one colour per status. */
function badgeClass(status) {
  const known = STATUSES.includes(status) ? status.toLowerCase().replace("_", "-") : "unknown";
  return `badge status-${known}`;
}

function setBadge(node, status) {
  setText(node, status || "…");
  const wanted = badgeClass(status);
  if (node.className !== wanted) node.className = wanted;
}

function showMessage(node, text) {
  setText(node, text || "");
  node.hidden = !text;
}

/** Link to a run's view; the id is encoded so it can only ever be a fragment. */
function runHref(requestId) {
  return `#/runs/${encodeURIComponent(requestId)}`;
}

// ------------------------------------------------------------------------------ formatting

/** "2026-12-05 08:42:11" in the browser's time zone (the filters use the same zone). */
function formatTime(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return String(iso);
  const pad = (n) => String(n).padStart(2, "0");
  return (
    `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ` +
    `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`
  );
}

/** Milliseconds as people read them: "350 ms", "4.2 s", "3m 05s", "2h 10m". */
function formatMs(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return "—";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(ms < 10_000 ? 2 : 1)} s`;
  const seconds = Math.round(ms / 1000);
  const h = Math.floor(seconds / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const s = seconds % 60;
  if (h > 0) return `${h}h ${String(m).padStart(2, "0")}m`;
  return `${m}m ${String(s).padStart(2, "0")}s`;
}

/** A timeout in seconds as a manifest would say it: "90s" stays "1m 30s", 7200 is "2h". */
function formatSeconds(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "—";
  if (seconds < 60) return `${Number(seconds.toFixed(3))}s`;
  const parts = [];
  let rest = Math.round(seconds);
  for (const [unit, size] of [["h", 3600], ["m", 60], ["s", 1]]) {
    const amount = Math.floor(rest / size);
    rest -= amount * size;
    if (amount) parts.push(`${amount}${unit}`);
  }
  return parts.join(" ");
}

/** A run's duration; while it runs, the time so far (by this browser's clock) with "…". */
function durationText(inv) {
  if (inv.DurationMs !== null && inv.DurationMs !== undefined) return formatMs(inv.DurationMs);
  if (inv.Status !== "RUNNING" || !inv.StartedAt) return "—";
  const sofar = Date.now() - new Date(inv.StartedAt).getTime();
  return Number.isNaN(sofar) ? "—" : `${formatMs(Math.max(0, sofar))}…`;
}

/** The gap between two server times, or null when one is missing. */
function between(startIso, endIso) {
  if (!startIso || !endIso) return null;
  const gap = new Date(endIso).getTime() - new Date(startIso).getTime();
  return Number.isNaN(gap) ? null : gap;
}

/** A datetime-local value (the browser's zone) as RFC 3339 UTC, e.g. 2026-12-05T08:00:00Z. */
function toRfc3339(localValue) {
  if (!localValue) return "";
  const date = new Date(localValue); // a date-time without offset is read as local time
  if (Number.isNaN(date.getTime())) return "";
  return date.toISOString().replace(/\.000Z$/, "Z");
}

/** Any JSON value as one compact line of text, for trigger reports. */
function compact(value) {
  if (value === null || value === undefined) return "—";
  if (Array.isArray(value)) return value.length ? value.map(compact).join("; ") : "none";
  if (typeof value === "object") {
    return Object.entries(value).map(([key, item]) => `${key}=${compact(item)}`).join(" ");
  }
  return String(value);
}

function pretty(value) {
  return JSON.stringify(value, null, 2) ?? "null";
}

/** pretty(value), cut after JSON_CHARS_SHOWN characters (a 5 MB result took the page seconds to lay out). */
function preview(value) {
  const text = pretty(value);
  if (text.length <= JSON_CHARS_SHOWN) return text;
  return `${text.slice(0, JSON_CHARS_SHOWN)}\n… (${text.length.toLocaleString("en")} characters in all; the first ${JSON_CHARS_SHOWN.toLocaleString("en")} shown)`;
}

// ------------------------------------------------------------------------------ the API

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** Reflect whether the server answers at all, in the header. */
function setConnection(ok) {
  const node = byTestId("connection");
  setText(node, ok ? "live" : "offline");
  node.className = `conn ${ok ? "conn-ok" : "conn-down"}`;
}

// -- the token
//
// A server with [server] ui_token answers 401 until a request carries
// `Authorization: Bearer <token>`. The page then asks for it and keeps it for this tab only
// (sessionStorage), so closing the tab forgets it.

// What a token may hold: printable ASCII, no spaces (engine/tokens.py, which the server's
// ui_token obeys). fetch() refuses a header outside Latin-1 and sends Latin-1 as it is, where
// the server reads UTF-8, so any other token would fail to send or be refused.
const SENDABLE_TOKEN = /^[!-~]+$/;
const TOKEN_ASKED = "This server asks for its ui_token.";
const TOKEN_REFUSED = "That token was refused; enter the server's ui_token.";
const TOKEN_UNSENDABLE =
  "That token cannot be sent: a ui_token holds only printable ASCII characters (no spaces, " +
  "control or non-ASCII characters), as it travels in an HTTP Authorization header.";

// `notice`: what the form says of the last token given (refused, or not sendable), kept
// while the requests that follow, sent without a token, are answered 401: until another is given.
const auth = { token: readStoredToken(), notice: "" };

function readStoredToken() {
  try {
    const token = sessionStorage.getItem(TOKEN_KEY) || "";
    if (SENDABLE_TOKEN.test(token)) return token;
    sessionStorage.removeItem(TOKEN_KEY); // (kept by an older page) no request could carry it: ask again
  } catch {
    // storage refused (e.g. by a privacy setting): ask on every load
  }
  return "";
}

function storeToken(token) {
  auth.token = token;
  try {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    // kept in memory only
  }
}

/** The header that carries `token`, if there is one. */
function authHeader(token) {
  return token ? { Authorization: `Bearer ${token}` } : {};
}

/** Show the token form with `message`, focused if it was hidden. */
function showTokenForm(message) {
  const form = byTestId("token-form");
  setText(byTestId("token-message"), message);
  if (form.hidden) {
    form.hidden = false;
    byTestId("token-input").focus();
  }
}

/**
 * A request sent with token `sent` (maybe none) was answered 401: show the token form, and
 * forget a token that was refused. Answers to requests sent before the token changed are
 * stale and change nothing.
 */
function askForToken(sent) {
  if (sent !== auth.token) return;
  if (sent) {
    storeToken("");
    auth.notice = TOKEN_REFUSED;
  }
  showTokenForm(auth.notice || TOKEN_ASKED);
}

function onTokenSubmit(event) {
  event.preventDefault();
  const input = byTestId("token-input");
  const token = input.value.trim();
  if (!token) return;
  if (!SENDABLE_TOKEN.test(token)) {
    auth.notice = TOKEN_UNSENDABLE; // the token is neither kept nor sent
    showTokenForm(auth.notice);
    return;
  }
  auth.notice = "";
  storeToken(token);
  input.value = "";
  byTestId("token-form").hidden = true;
  route(); // everything again, with the token
}

// -- requests

/** Fetch JSON; a non-2xx answer throws ApiError with the API's {"Error": {Code, Message}}. */
async function api(path, { method = "GET", headers = {}, body, signal } = {}) {
  const sent = auth.token;
  let response;
  try {
    response = await fetch(path, {
      method,
      body,
      signal,
      cache: "no-store",
      headers: { Accept: "application/json", ...headers, ...authHeader(sent) },
    });
  } catch (error) {
    if (error.name !== "AbortError") setConnection(false);
    throw error;
  }
  setConnection(true);
  const text = await response.text();
  let parsed = null;
  try {
    parsed = text ? JSON.parse(text) : null;
  } catch {
    parsed = null; // e.g. a proxy's HTML error page: reported below by status alone
  }
  if (!response.ok) {
    const error = parsed && typeof parsed === "object" ? parsed.Error : null;
    const code = (error && error.Code) || `HTTP ${response.status}`;
    const message = (error && error.Message) || response.statusText || "request failed";
    if (response.status === 401) askForToken(sent);
    throw new ApiError(response.status, code, message);
  }
  return parsed;
}

function describeError(error) {
  if (error instanceof ApiError) return `${error.code}: ${error.message}`;
  return `cannot reach the server (${error.message || error})`;
}

// ------------------------------------------------------------------------------ polling

/**
 * Calls `task` now and then again `every` ms after each call settles, so a slow server never
 * has requests piling up. `now()` asks for an immediate call (queued behind a running one).
 */
class Poller {
  constructor(task, every) {
    this.task = task;
    this.every = every;
    this.running = false;
    this.busy = false;
    this.again = false;
    this.timer = null;
  }

  /** Run now, then keep going (also when already running: then it is a refresh now). */
  start() {
    this.running = true;
    this.now();
  }

  stop() {
    this.running = false;
    clearTimeout(this.timer);
  }

  async now() {
    if (this.busy) {
      this.again = true;
      return;
    }
    clearTimeout(this.timer);
    this.busy = true;
    try {
      // A hidden tab skips the work but keeps the rhythm, and catches up when shown.
      if (!document.hidden) await this.task();
    } catch (error) {
      console.error(error);
    } finally {
      this.busy = false;
    }
    if (this.again) {
      this.again = false;
      this.now();
    } else if (this.running) {
      this.timer = setTimeout(() => this.now(), this.every);
    }
  }
}

// ------------------------------------------------------------------------------ overview

const overview = {
  functionsKey: "", // what the functions table last showed, to skip identical redraws
  healthKey: "",
  counted: [], // the functions GET /counts last listed: the manifest's, then any other with runs
};

/** Functions, counts and health; each may fail on its own without blanking the others. */
async function refreshOverview() {
  const [functions, counts, health] = await Promise.allSettled([
    api("/functions"),
    api("/counts"),
    api("/healthz"),
  ]);
  if (health.status === "fulfilled") {
    showNode(health.value);
    renderHealth(health.value.Triggers || {});
  }
  if (functions.status === "fulfilled") {
    const list = functions.value.Functions || [];
    const byName = counts.status === "fulfilled" ? counts.value.Functions || {} : null;
    renderFunctions(list, byName);
    // When /counts does not answer, the functions it last listed stay in the filter.
    if (byName) overview.counted = Object.keys(byName);
    syncFunctionOptions(list.map((f) => String(f.FunctionName)));
  }
}

function showNode(health) {
  setText(byTestId("node"), health.Node ?? "—");
}

/** Every function can be invoked over HTTP; its manifest triggers come on top. */
function triggerKinds(fn) {
  const kinds = ["http"];
  for (const trigger of fn.Triggers || []) {
    if (trigger.Type && !kinds.includes(trigger.Type)) kinds.push(trigger.Type);
  }
  return kinds;
}

function countBadges(counts) {
  if (!counts) return [el("span", { class: "muted", text: "—" })];
  return STATUSES.map((status) => {
    const n = Number(counts[status] || 0);
    return el("span", {
      class: `${badgeClass(status)} count${n ? "" : " zero"}`,
      "data-status": status,
      title: status,
      text: `${status.replace("_", " ").toLowerCase()} ${n}`,
    });
  });
}

function functionRow(fn, counts) {
  const name = String(fn.FunctionName);
  return el(
    "tr",
    { "data-function": name },
    el("td", { class: "name", text: name }),
    el("td", { text: fn.AsyncExecution ? "async" : "sync" }),
    el("td", { text: formatSeconds(fn.Timeout) }),
    el("td", { class: "num", text: fn.Concurrency ?? "—" }),
    el("td", {}, ...triggerKinds(fn).map((kind) => el("span", { class: "tag", text: kind }))),
    el("td", {}, el("div", { class: "counts", "data-testid": "function-counts" }, ...countBadges(counts))),
  );
}

function renderFunctions(list, countsByName) {
  const key = JSON.stringify([list, countsByName]);
  if (key === overview.functionsKey) return;
  overview.functionsKey = key;
  const rows = list.map((fn) => functionRow(fn, countsByName ? countsByName[fn.FunctionName] || {} : null));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 6, class: "muted", text: "No functions." })));
  byTestId("functions-table").tBodies[0].replaceChildren(...rows);
}

/** A report's Status word as a colour: fine, or worth a look. */
function healthClass(report) {
  const status = typeof report.Status === "string" ? report.Status.toLowerCase() : "";
  if (!status) return "badge status-unknown";
  return ["ok", "running", "ready", "connected", "listening"].includes(status)
    ? "badge status-finished"
    : "badge status-failed";
}

/** One value of a report: arrays of objects (e.g. timer schedules) get a line per item. */
function reportValue(value) {
  if (Array.isArray(value) && value.some((item) => item && typeof item === "object")) {
    return el("dd", {}, ...value.map(reportLine));
  }
  return el("dd", { text: compact(value) });
}

/** One item as key=value tokens that wrap between pairs rather than inside them. */
function reportLine(item) {
  if (!item || typeof item !== "object" || Array.isArray(item)) return el("div", { class: "line", text: compact(item) });
  const line = el("div", { class: "line" });
  for (const [key, value] of Object.entries(item)) {
    if (line.childNodes.length) line.append(" "); // copied text reads as key=value pairs
    line.append(el("span", { class: "token", text: `${key}=${compact(value)}` }));
  }
  return line;
}

function healthCard(kind, report) {
  const head = el("div", { class: "health-head" }, el("strong", { text: kind }));
  const isObject = report && typeof report === "object" && !Array.isArray(report);
  if (isObject && "Status" in report) head.append(el("span", { class: healthClass(report), text: String(report.Status) }));
  const list = el("dl", { class: "kv" });
  const entries = isObject ? Object.entries(report) : [["report", report]];
  for (const [key, value] of entries) {
    if (key === "Status") continue;
    const dd = reportValue(value);
    list.append(el("div", { class: dd.childElementCount ? "block" : null }, el("dt", { text: key }), dd));
  }
  return el("div", { class: "health-card", "data-trigger": kind }, head, list);
}

function renderHealth(triggers) {
  const key = JSON.stringify(triggers);
  if (key === overview.healthKey) return;
  overview.healthKey = key;
  const kinds = Object.keys(triggers).sort();
  const cards = kinds.map((kind) => healthCard(kind, triggers[kind]));
  if (!cards.length) cards.push(el("p", { class: "muted", text: "No trigger reports." }));
  byTestId("trigger-health").replaceChildren(...cards);
}

const selectKeys = new WeakMap(); // <select> -> the options it shows, to skip identical rebuilds

/** Keep a select's options equal to `choices` (each an option's props for el()), keeping what the user chose. */
function syncSelect(select, choices, anyLabel) {
  const wanted = (anyLabel === null ? [] : [{ value: "", text: anyLabel }]).concat(choices);
  const key = JSON.stringify(wanted);
  if (selectKeys.get(select) === key) return;
  selectKeys.set(select, key);
  const chosen = select.value;
  select.replaceChildren(...wanted.map((choice) => el("option", choice)));
  if (wanted.some((choice) => choice.value === chosen)) select.value = chosen;
}

/** Invoke offers the manifest's functions; the filter also those with runs that it no longer lists
 * (removed from it, or another node's), so that their runs can still be found. */
function syncFunctionOptions(names) {
  const removed = overview.counted.filter((name) => !names.includes(name));
  const listed = names.map((name) => ({ value: name, text: name }));
  syncSelect(byTestId("invoke-function"), listed, null);
  const gone = removed.map((name) => ({
    value: name,
    text: `${name} (removed)`,
    class: "removed",
    title: "not in this server's manifest: only its runs are left",
  }));
  syncSelect(byTestId("filter-function"), listed.concat(gone), "any");
}

// ------------------------------------------------------------------------------ invoke

function invokeMessage(...children) {
  byTestId("invoke-result").replaceChildren(...children);
}

function invokeError(text) {
  invokeMessage(el("span", { class: "error", "data-testid": "invoke-error", text }));
}

async function onInvoke(event) {
  event.preventDefault();
  const name = byTestId("invoke-function").value;
  const text = byTestId("invoke-body").value.trim() || "{}";
  if (!name) return invokeError("Choose a function first.");
  try {
    JSON.parse(text);
  } catch (error) {
    return invokeError(`Invalid JSON: ${error.message}`);
  }
  const button = byTestId("invoke-submit");
  button.disabled = true;
  invokeMessage(el("span", { class: "muted", text: "sending…" }));
  try {
    // Queued as an event even for a sync function: the page shows the RequestId at once and
    // follows the run in its view, rather than holding a request open for the whole run.
    const answer = await api(`/functions/${encodeURIComponent(name)}/invocations`, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Invocation-Type": "Event" },
      body: text,
    });
    const id = String(answer.RequestId);
    invokeMessage(
      el("span", { class: "muted", text: "Accepted: " }),
      el("a", { href: runHref(id), class: "mono", "data-testid": "invoke-request-id", text: id }),
    );
    if (runs.page === 0) runsPoller.now();
  } catch (error) {
    invokeError(describeError(error));
  } finally {
    button.disabled = false;
  }
}

// ------------------------------------------------------------------------------ runs

const runs = {
  cursors: [null], // cursors[i] fetches page i; page 0 is the newest
  page: 0,
  next: null,
  generation: 0, // bumped when filters or page change: late answers for old queries are dropped
  rows: new Map(), // RequestId -> <tr>, so live refreshes update rows in place
};
const rowCells = new WeakMap(); // <tr> -> its cells, written on each refresh

function filterValues() {
  return {
    function: byTestId("filter-function").value,
    status: byTestId("filter-status").value,
    trigger: byTestId("filter-trigger").value,
    since: toRfc3339(byTestId("filter-since").value),
    until: toRfc3339(byTestId("filter-until").value),
  };
}

function runsUrl() {
  // The table shows no results: without them a page of large ones costs a refresh nothing.
  const params = new URLSearchParams({ limit: String(PAGE_SIZE), results: "false" });
  for (const [key, value] of Object.entries(filterValues())) if (value) params.set(key, value);
  const cursor = runs.cursors[runs.page];
  if (cursor) params.set("cursor", cursor);
  return `/invocations?${params}`;
}

async function refreshRuns() {
  const generation = runs.generation;
  let answer;
  try {
    answer = await api(runsUrl());
  } catch (error) {
    if (generation === runs.generation) showMessage(byTestId("runs-error"), describeError(error));
    return;
  }
  if (generation !== runs.generation) return;
  showMessage(byTestId("runs-error"), "");
  renderRuns(answer.Invocations || []);
  runs.next = answer.NextCursor || null;
  updatePager();
}

function runRow(requestId) {
  const cells = {
    link: el("a", { href: runHref(requestId), class: "mono", text: requestId }),
    function: el("td"),
    trigger: el("td"),
    status: el("span", { class: badgeClass(""), "data-testid": "run-row-status" }),
    created: el("td"),
    duration: el("td", { class: "num" }),
  };
  const row = el(
    "tr",
    { "data-testid": "run-row", "data-request-id": requestId },
    el("td", {}, cells.link),
    cells.function,
    cells.trigger,
    el("td", {}, cells.status),
    cells.created,
    cells.duration,
  );
  rowCells.set(row, cells);
  return row;
}

function updateRunRow(row, inv) {
  const cells = rowCells.get(row);
  setText(cells.function, inv.FunctionName ?? "");
  setText(cells.trigger, inv.Trigger ?? "");
  setBadge(cells.status, inv.Status);
  setText(cells.created, formatTime(inv.CreatedAt));
  if (cells.created.title !== (inv.CreatedAt || "")) cells.created.title = inv.CreatedAt || "";
  setText(cells.duration, durationText(inv));
}

/** Put the rows in the answer's order, reusing the <tr> of every run already shown. */
function renderRuns(invocations) {
  const tbody = byTestId("runs-table").tBodies[0];
  const seen = new Set();
  invocations.forEach((inv, index) => {
    const id = String(inv.RequestId);
    seen.add(id);
    let row = runs.rows.get(id);
    if (!row) {
      row = runRow(id);
      runs.rows.set(id, row);
    }
    updateRunRow(row, inv);
    const here = tbody.children[index] || null;
    if (here !== row) tbody.insertBefore(row, here);
  });
  for (const [id, row] of runs.rows) {
    if (!seen.has(id)) {
      row.remove();
      runs.rows.delete(id);
    }
  }
  byTestId("runs-empty").hidden = invocations.length > 0;
}

function updatePager() {
  byTestId("newest").disabled = runs.page === 0;
  byTestId("older").disabled = !runs.next;
  setText(byTestId("runs-page"), `page ${runs.page + 1}`);
  byTestId("runs-live").hidden = runs.page !== 0;
}

/** Show page `page` of the current filters: only the newest page updates live. */
function goToPage(page) {
  runs.page = page;
  runs.cursors.length = page + 1;
  runs.generation += 1;
  runs.next = null;
  updatePager();
  if (page === 0) {
    runsPoller.start();
  } else {
    runsPoller.stop();
    refreshRuns();
  }
}

function onFilterChange() {
  runs.cursors = [null];
  goToPage(0);
}

function onOlder() {
  if (!runs.next) return;
  runs.cursors[runs.page + 1] = runs.next; // goToPage keeps cursors up to the page it shows
  goToPage(runs.page + 1);
}

const runsPoller = new Poller(refreshRuns, RUNS_EVERY_MS);
const overviewPoller = new Poller(refreshOverview, OVERVIEW_EVERY_MS);

// ------------------------------------------------------------------------------ one run

const run = {
  id: null,
  stream: null, // what follows the log: { close() }
  pending: [], // lines received but not yet on the page
  flushTimer: null,
  lines: 0, // lines of the log received
  chunks: [], // lines in each text node of the log on the page, oldest first
  shownLines: 0, // their sum: at most LOG_LINES_SHOWN, and a batch
  outcome: null, // what the result box shows (see renderOutcome)
  logShown: false, // its log is being followed or was read
  status: null,
};

async function refreshRun() {
  const id = run.id;
  if (id === null) return;
  let inv;
  try {
    inv = await api(`/invocations/${encodeURIComponent(id)}`);
  } catch (error) {
    if (id === run.id) showMessage(byTestId("run-load-error"), describeError(error));
    if (error instanceof ApiError && error.status === 404) runPoller.stop();
    return;
  }
  if (id !== run.id) return;
  showMessage(byTestId("run-load-error"), "");
  renderRun(inv);
  if (!run.logShown) {
    // A run going on is followed live; an ended one's log is read as a file, its end kept.
    run.logShown = true;
    if (ACTIVE.has(inv.Status)) followLog(id);
    else loadPlainLog(id, inv.Status);
  }
  if (!ACTIVE.has(inv.Status)) runPoller.stop(); // an ended run changes no more
}

function renderRun(inv) {
  run.status = inv.Status;
  setBadge(byTestId("run-status"), inv.Status);
  setText(byTestId("run-function"), inv.FunctionName ?? "—");
  setText(byTestId("run-trigger"), inv.Trigger ?? "—");
  setText(byTestId("run-created"), formatTime(inv.CreatedAt));
  setText(byTestId("run-started"), formatTime(inv.StartedAt));
  setText(byTestId("run-ended"), formatTime(inv.EndedAt));
  setText(byTestId("run-waited"), formatMs(between(inv.CreatedAt, inv.StartedAt)));
  setText(byTestId("run-duration"), durationText(inv));
  byTestId("run-terminate").disabled = !ACTIVE.has(inv.Status);
  byTestId("run-replay").disabled = ACTIVE.has(inv.Status);
  renderLinks(byTestId("run-replay-of"), inv.ReplayOf ? [inv.ReplayOf] : []);
  renderLinks(byTestId("run-replays"), inv.Replays ?? []);
  renderOutcome(inv);
}

/** Links to runs (a replay's original, or its replays), or a dash; rebuilt only when they change. */
function renderLinks(node, requestIds) {
  const key = requestIds.join(" ");
  if (node.dataset.ids === key) return;
  node.dataset.ids = key;
  node.replaceChildren(...(requestIds.length ? [] : [document.createTextNode("—")]));
  requestIds.forEach((requestId, index) => {
    if (index) node.append(document.createTextNode(", "));
    node.append(el("a", { href: runHref(requestId), class: "mono", text: requestId }));
  });
}

async function onReplay() {
  const id = run.id;
  const button = byTestId("run-replay");
  const answerNode = byTestId("run-replay-result");
  button.disabled = true;
  setText(answerNode, "replaying…");
  try {
    const answer = await api(`/invocations/${encodeURIComponent(id)}/replay`, { method: "POST" });
    if (id !== run.id) return;
    answerNode.replaceChildren(
      document.createTextNode("Replayed as "),
      el("a", { href: runHref(answer.RequestId), class: "mono", "data-testid": "run-replay-link", text: answer.RequestId }),
    );
  } catch (error) {
    if (id === run.id) setText(answerNode, describeError(error));
  }
  if (id === run.id) button.disabled = ACTIVE.has(run.status);
  runPoller.now();
}

/** The result of a finished run, or the error of one that did not finish well. */
function renderOutcome(inv) {
  const box = byTestId("run-outcome");
  const ended = !ACTIVE.has(inv.Status);
  box.hidden = !ended;
  if (!ended) return;
  const failed = inv.Status !== "FINISHED";
  setText(byTestId("run-outcome-title"), failed ? "Error" : "Result");
  const error = [inv.ErrorType, inv.ErrorMessage].filter(Boolean).join(": ");
  showMessage(byTestId("run-error"), failed ? error || inv.Status : "");
  const result = byTestId("run-result");
  const showResult = !failed || (inv.Result !== null && inv.Result !== undefined);
  result.hidden = !showResult;
  const key = `${inv.RequestId} ${inv.Status} ${inv.EndedAt}`; // (an ended run's result does not change)
  if (showResult && run.outcome !== key) {
    run.outcome = key;
    setText(result, preview(inv.Result));
  }
}

async function loadEnvelope(id) {
  const box = byTestId("run-envelope");
  try {
    const envelope = await api(`/invocations/${encodeURIComponent(id)}/event`);
    if (id === run.id) setText(box, preview(envelope));
  } catch (error) {
    if (id === run.id) setText(box, `not available: ${describeError(error)}`);
  }
}

async function onTerminate() {
  const id = run.id;
  const button = byTestId("run-terminate");
  const answerNode = byTestId("run-terminate-result");
  button.disabled = true;
  setText(answerNode, "terminating…");
  try {
    const inv = await api(`/invocations/${encodeURIComponent(id)}/terminate`, { method: "POST" });
    if (id !== run.id) return;
    setText(answerNode, `Terminated: ${inv.Status}`);
    renderRun(inv);
  } catch (error) {
    if (id !== run.id) return;
    setText(answerNode, describeError(error));
    button.disabled = !ACTIVE.has(run.status);
  }
  runPoller.now();
}

// -- the live log

function setLogState(text) {
  setText(byTestId("run-log-state"), text);
}

function clearLog() {
  run.pending = [];
  run.lines = 0;
  run.skippedBytes = 0;
  run.chunks = [];
  run.shownLines = 0;
  clearTimeout(run.flushTimer);
  run.flushTimer = null;
  byTestId("run-log").replaceChildren();
}

function queueLine(line) {
  run.pending.push(line);
  if (run.flushTimer === null) run.flushTimer = setTimeout(flushLog, LOG_FLUSH_MS);
}

/** Add the waiting lines as one text node; keep the view pinned to the end if it was there. */
function flushLog() {
  run.flushTimer = null;
  if (!run.pending.length) return;
  const pre = byTestId("run-log");
  const pinned = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 24;
  const batch = run.pending.slice(-LOG_LINES_SHOWN);
  pre.append(document.createTextNode(shown(batch.join("\n") + "\n")));
  run.chunks.push(batch.length);
  run.shownLines += batch.length;
  run.lines += run.pending.length;
  run.pending = [];
  dropOldLines(pre);
  if (pinned) pre.scrollTop = pre.scrollHeight;
}

/** Keep the last LOG_LINES_SHOWN lines on the page (batches whole), under a line saying how many went. */
function dropOldLines(pre) {
  const first = pre.firstChild;
  let note = first && first.nodeType === Node.ELEMENT_NODE ? first : null;
  while (run.chunks.length > 1 && run.shownLines - run.chunks[0] >= LOG_LINES_SHOWN) {
    (note ? note.nextSibling : pre.firstChild).remove();
    run.shownLines -= run.chunks.shift();
  }
  const earlier = run.lines - run.shownLines;
  if (!earlier && !run.skippedBytes) return;
  if (!note) {
    note = el("span", { class: "log-cut", "data-testid": "run-log-cut" });
    pre.prepend(note);
  }
  setText(note, `[${cutText(earlier, run.skippedBytes)} not shown here: GET /invocations/${run.id}/logs has the whole log]\n`);
}

/** What the note above a log says it leaves out: lines dropped here, and the bytes of the log a
 * follow of its tail did not send. */
function cutText(lines, bytes) {
  const counted = lines.toLocaleString("en");
  if (!bytes) return `${counted} earlier lines are`;
  return `the log's first ${byteSize(bytes)}${lines ? ` and the ${counted} lines after them` : ""} are`;
}

function byteSize(bytes) {
  return bytes >= 1048576 ? `${(bytes / 1048576).toFixed(1)} MB` : `${Math.ceil(bytes / 1024)} KB`;
}

function stopFollowing() {
  if (run.stream) run.stream.close();
  run.stream = null;
}

/** Without a stream (e.g. refused), show the log as it is now. */
async function loadPlainLog(id, ended = null) {
  const sent = auth.token;
  try {
    const response = await fetch(`/invocations/${encodeURIComponent(id)}/logs`, {
      cache: "no-store",
      headers: authHeader(sent),
    });
    if (id !== run.id) return;
    if (response.status === 401) askForToken(sent);
    if (!response.ok) return setLogState(`log not available (HTTP ${response.status})`);
    setLogState("reading the log…");
    const { kept, total } = await lastLines(response);
    if (id !== run.id) return;
    clearLog();
    run.pending = kept;
    run.lines = total - kept.length; // (flushLog counts those it adds)
    flushLog();
    setLogState(ended ? `ended (${ended}) · ${total} lines` : "log as of now (not following)");
  } catch (error) {
    if (id === run.id) setLogState(`log not available: ${error.message || error}`);
  }
}

/** The last LOG_LINES_SHOWN lines of a response's text, read as it comes (a large log is never
 * held whole), and how many lines it had. */
async function lastLines(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let kept = [];
  let total = 0;
  let rest = "";
  for (;;) {
    const { done, value } = await reader.read();
    const parts = (rest + decoder.decode(value, { stream: !done })).split("\n");
    rest = parts.pop();
    total += parts.length;
    kept = kept.concat(parts);
    if (kept.length > 2 * LOG_LINES_SHOWN) kept = kept.slice(-LOG_LINES_SHOWN);
    if (done) break;
  }
  if (rest) {
    kept.push(rest);
    total += 1;
  }
  return { kept: kept.slice(-LOG_LINES_SHOWN), total };
}

// -- following a log stream
//
// EventSource cannot send an Authorization header, so with a token the same Server-Sent
// Events are read from a fetch() stream instead. Both report to one set of callbacks:
// open() (the stream starts, sending the log's last lines so far), skipped(data) (the bytes of
// the log so far it leaves out, before those lines), line(text), end(data),
// failed(message) (the server gave up on it), refused() (no stream at all), retrying().

function eventSourceStream(url, on) {
  const source = new EventSource(url);
  source.addEventListener("open", () => on.open());
  source.addEventListener("message", (event) => on.line(event.data));
  source.addEventListener("skipped", (event) => on.skipped(event.data));
  source.addEventListener("end", (event) => {
    source.close();
    on.end(event.data);
  });
  source.addEventListener("error", (event) => {
    if (event instanceof MessageEvent) {
      // The server's own `event: error`, not the connection's.
      source.close();
      on.failed(event.data);
    } else if (source.readyState === EventSource.CLOSED) {
      on.refused(); // e.g. a 404: the browser gives up
    } else {
      on.retrying(); // the browser reconnects by itself
    }
  });
  return { close: () => source.close() };
}

function fetchStream(url, on) {
  const controller = new AbortController();
  let closed = false;

  const retry = () => {
    if (closed) return;
    on.retrying();
    setTimeout(() => closed || connect(), STREAM_RETRY_MS);
  };

  // What the stream's events mean; true once the stream is done with.
  const dispatch = (type, data) => {
    if (type === "message") on.line(data);
    else if (type === "skipped") on.skipped(data);
    else if (type === "end") on.end(data);
    else if (type === "error") on.failed(data);
    return type === "end" || type === "error";
  };

  async function connect() {
    let response;
    try {
      response = await fetch(url, {
        cache: "no-store",
        signal: controller.signal,
        headers: { Accept: "text/event-stream", ...authHeader(auth.token) },
      });
    } catch {
      return retry();
    }
    if (!response.ok || !response.body) {
      if (!closed) on.refused();
      return;
    }
    on.open();
    let done = false;
    try {
      done = await readEvents(response.body, dispatch);
    } catch {
      done = false; // dropped (or closed by us, which retry() ignores)
    }
    if (!done) retry(); // ended without `end`: reconnect, as EventSource would
  }

  connect();
  return {
    close() {
      closed = true;
      controller.abort();
    },
  };
}

/**
 * Read Server-Sent Events from a response body, calling dispatch(type, data) for each, until
 * dispatch returns true (then true) or the body ends (then false).
 */
async function readEvents(body, dispatch) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let type = "message";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return false;
    buffer += value;
    const lines = buffer.split("\n");
    buffer = lines.pop(); // an unfinished line waits for the next chunk
    for (const raw of lines) {
      const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
      if (line === "") {
        // A blank line ends an event.
        if (data.length && dispatch(type, data.join("\n"))) {
          reader.cancel().catch(() => {});
          return true;
        }
        type = "message";
        data = [];
      } else if (!line.startsWith(":")) {
        // `field: value` (one optional space); lines starting with ":" are keepalive comments.
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const rest = colon < 0 ? "" : line.slice(colon + 1);
        const text = rest.startsWith(" ") ? rest.slice(1) : rest;
        if (field === "data") data.push(text);
        else if (field === "event") type = text;
      }
    }
  }
}

/** The message of the server's in-band `event: error` ({"Error": {Code, Message}}). */
function streamErrorMessage(data) {
  try {
    return JSON.parse(data).Error.Message || "the log stream failed";
  } catch {
    return "the log stream failed";
  }
}

function followLog(id) {
  const url = `/invocations/${encodeURIComponent(id)}/logs?follow=true&tail=${LOG_TAIL_BYTES}`;
  let stream = null;
  const current = () => stream !== null && run.stream === stream;
  const on = {
    // The stream sends the log's last lines so far, then the live ones, also after a reconnect:
    // start afresh.
    open() {
      if (!current()) return;
      clearLog();
      setLogState("following live");
    },
    // (first, when the log so far is longer than LOG_TAIL_BYTES: {"Bytes"} left out before its lines)
    skipped(data) {
      if (!current()) return;
      try {
        run.skippedBytes = Number(JSON.parse(data).Bytes) || 0;
      } catch {
        run.skippedBytes = 0;
      }
      dropOldLines(byTestId("run-log"));
    },
    line(text) {
      if (current()) queueLine(text);
    },
    end(data) {
      if (!current()) return;
      stopFollowing();
      flushLog();
      let status = "";
      try {
        status = JSON.parse(data).Status || "";
      } catch {
        status = "";
      }
      if (run.skippedBytes) {
        setLogState(`ended${status ? ` (${status})` : ""} · ${run.lines} lines after the first ${byteSize(run.skippedBytes)}`);
      } else {
        setLogState(`ended${status ? ` (${status})` : ""} · ${run.lines} lines`);
      }
      runPoller.now(); // the final status, result and timings
    },
    failed(data) {
      if (!current()) return;
      stopFollowing();
      flushLog();
      setLogState(streamErrorMessage(data));
    },
    refused() {
      if (!current()) return;
      stopFollowing();
      loadPlainLog(id); // shows why, and what can be read
    },
    retrying() {
      if (current()) setLogState("reconnecting…");
    },
  };
  setLogState("connecting…");
  stream = (auth.token ? fetchStream : eventSourceStream)(url, on);
  run.stream = stream;
}

const runPoller = new Poller(refreshRun, RUN_EVERY_MS);

function openRun(id) {
  closeRun();
  run.id = id;
  run.status = null;
  document.title = `eventrun · ${id}`;
  setText(byTestId("run-id"), id);
  setBadge(byTestId("run-status"), "");
  for (const name of ["function", "trigger", "created", "started", "ended", "waited", "duration"]) {
    setText(byTestId(`run-${name}`), "—");
  }
  byTestId("run-terminate").disabled = true;
  setText(byTestId("run-terminate-result"), "");
  byTestId("run-replay").disabled = true;
  byTestId("run-replay-result").replaceChildren();
  renderLinks(byTestId("run-replay-of"), []);
  renderLinks(byTestId("run-replays"), []);
  showMessage(byTestId("run-load-error"), "");
  byTestId("run-outcome").hidden = true;
  setText(byTestId("run-envelope"), "loading…");
  clearLog();
  run.logShown = false;
  runPoller.start(); // (its first answer starts the log: see refreshRun)
  loadEnvelope(id);
}

/** Leaving a run: its stream and timers end with the view. */
function closeRun() {
  runPoller.stop();
  stopFollowing();
  clearLog();
  run.id = null;
}

// ------------------------------------------------------------------------------ routing

/** The run id of `#/runs/<id>`, or null for every other hash (the home view). */
function routeRunId() {
  const match = /^#\/runs\/([^/?#]+)$/.exec(location.hash);
  if (!match) return null;
  try {
    return decodeURIComponent(match[1]);
  } catch {
    return null;
  }
}

function route() {
  const id = routeRunId();
  const home = byTestId("home-view");
  const runView = byTestId("run-view");
  if (id !== null) {
    overviewPoller.stop();
    runsPoller.stop();
    home.hidden = true;
    runView.hidden = false;
    openRun(id);
    window.scrollTo(0, 0);
    return;
  }
  closeRun();
  document.title = "eventrun";
  runView.hidden = true;
  home.hidden = false;
  overviewPoller.start();
  if (runs.page === 0) runsPoller.start();
  else refreshRuns();
}

// ------------------------------------------------------------------------------ start

function start() {
  byTestId("invoke-form").addEventListener("submit", onInvoke);
  const filters = byTestId("runs-filters");
  filters.addEventListener("change", onFilterChange);
  filters.addEventListener("submit", (event) => event.preventDefault());
  // A reset clears the inputs after this event; read them once it has.
  filters.addEventListener("reset", () => setTimeout(onFilterChange, 0));
  byTestId("older").addEventListener("click", onOlder);
  byTestId("newest").addEventListener("click", () => goToPage(0));
  byTestId("run-terminate").addEventListener("click", onTerminate);
  byTestId("run-replay").addEventListener("click", onReplay);
  byTestId("token-form").addEventListener("submit", onTokenSubmit);
  window.addEventListener("hashchange", route);
  // The node id belongs in the header whichever view the page opens on.
  api("/healthz").then(showNode, () => {});
  route();
}

start();
