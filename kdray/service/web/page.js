// The kdray service's web page (index.html): the jobs table and the selected job's detail.
"use strict";
// The kdray service's API, read with the bearer token kept in this tab's session storage
// (EventSource cannot send headers: the event stream is read with fetch).
const $ = (id) => document.getElementById(id);
const TERMINAL = ["succeeded", "failed", "cancelled"];
let token = sessionStorage.getItem("kdray-token") || "";
let selected = null;      // the job whose detail is shown
let follow = null;        // AbortController of its event stream
let points = [];          // [step, value] of the selected job's metric: its curve's points, then the steps streamed after them
let metric = "loss";      // the train_step number the curve shows (the #metric choice)
const metrics = new Set(["loss"]);  // the numbers the selected job's steps hold: #metric's options
const NOT_METRICS = new Set(["seq", "time", "kind", "step", "total_steps", "checkpoint", "final"]);
let drawTimer = 0;        // a pending redraw of the loss curve, or 0
const PAGE = 100;         // jobs per page of the table
let offset = 0;           // the table's page: how many newer jobs (of the state filter) come before it
let listing = 0;          // the table's reads in flight: the 3-s timer waits for them, a click does not
let totalSteps = null;    // the selected job's planned optimizer steps, once known

function headers() { return token ? { Authorization: "Bearer " + token } : {}; }

async function api(path) {
  const res = await fetch(path, { headers: headers() });
  if (res.status === 401) {
    $("status").textContent = token ? "the service refused this API token: enter the one it was started with"
                                    : "enter the API token (reads need it on this service)";
    $("jobs").classList.add("stale");
    throw new Error("401");
  }
  return res;
}

function text(value) { return value === null || value === undefined ? "" : String(value); }
function eta(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.round(seconds);
  return s >= 3600 ? `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min` : s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
}

// A job's row, updated in place (its cells keep their elements: no flicker, and a click or a
// hover is not lost to a redraw).
function fillRow(tr, job) {
  if (!tr.cells.length) {
    for (let i = 0; i < 8; i++) tr.insertCell();
    const bar = document.createElement("div"), fill = document.createElement("div");
    bar.className = "bar"; bar.appendChild(fill); tr.cells[4].appendChild(bar);
    tr.cells[5].className = tr.cells[6].className = "num";
    const open = () => { select(tr.dataset.job); $("detail").scrollIntoView({ block: "start" }); };
    tr.tabIndex = 0;  // a keyboard opens a job too: Tab to its row, then Enter or Space
    tr.addEventListener("click", open);
    tr.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); open(); } });
  }
  const values = [job.id, job.name, job.state, [job.phase, job.phase_detail].filter(Boolean).join(": "), null,
                  job.total_steps ? `${text(job.step)} / ${job.total_steps}` : "", eta(job.eta_s),
                  new Date(job.created * 1000).toLocaleString()];
  values.forEach((value, i) => { if (i !== 4 && tr.cells[i].textContent !== text(value)) tr.cells[i].textContent = text(value); });
  tr.cells[2].className = "state state-" + job.state;
  const bar = tr.cells[4].firstChild;
  bar.firstChild.style.width = `${job.percent || 0}%`;
  bar.title = job.percent === null ? "" : `${job.percent}%`;
  tr.classList.toggle("selected", job.id === selected);
  tr.setAttribute("aria-selected", String(job.id === selected));
}

async function refreshJobs() {
  const state = $("state-filter").value, at = offset;
  listing++;
  try {
    const res = await api(`/v1/jobs?limit=${PAGE}&offset=${at}` + (state ? `&state=${state}` : ""));
    if (!res.ok) throw new Error(await res.json().then((b) => b.error, () => `HTTP ${res.status}`));
    const page = await res.json();
    if (at !== offset || state !== $("state-filter").value) return;  // another page or filter was asked meanwhile
    if (offset && offset >= page.total) {  // jobs left (deleted, or moved out of the state): the last page there is
      offset = Math.max(0, Math.ceil(page.total / PAGE) - 1) * PAGE;
      return refreshJobs();
    }
    $("status").textContent = "";
    $("jobs").classList.remove("stale");
    $("range").textContent = page.total ? `${offset + 1}–${offset + page.jobs.length} of ${page.total}` : "";
    const focused = document.activeElement;
    $("newer").disabled = offset === 0;
    $("older").disabled = offset + page.jobs.length >= page.total;
    if (focused === $("older") && $("older").disabled) $("newer").focus();  // the keyboard's place is kept
    else if (focused === $("newer") && $("newer").disabled) $("older").focus();
    const body = $("jobs").querySelector("tbody");
    const rows = new Map([...body.rows].map((tr) => [tr.dataset.job, tr]));
    page.jobs.forEach((job, i) => {
      let tr = rows.get(job.id);
      if (!tr) { tr = document.createElement("tr"); tr.dataset.job = job.id; }
      fillRow(tr, job);
      if (body.rows[i] !== tr) body.insertBefore(tr, body.rows[i] || null);
      rows.delete(job.id);
    });
    rows.forEach((tr) => tr.remove());
    $("empty").hidden = page.total > 0 || Boolean(state);
    $("none-in-state").hidden = page.total > 0 || !state;
    const current = page.jobs.find((j) => j.id === selected);
    // The selected job's header: from its row, or its own read when it is not on this page or is
    // queued (a row has no queue position).
    if (current && current.state !== "queued") showMeta(current); else if (selected) refreshSelected();
  } catch (e) {
    if (e.message === "401") return;
    $("status").textContent = `the service does not answer (${e.message}): the table shows what it last said`;
    $("jobs").classList.add("stale");
  } finally {
    listing--;
  }
}

// The selected job's record, read on its own (it may not be on the table's page).
async function refreshSelected() {
  const jobId = selected;
  try {
    const res = await api(`/v1/jobs/${jobId}`);
    const job = await res.json();
    if (selected !== jobId) return;
    if (!res.ok) { $("d-title").textContent = job.error || `job ${jobId}: HTTP ${res.status}`; return; }
    showMeta(job);
    return job;
  } catch (e) { /* 401 or no answer: the status line says so */ }
}

function showMeta(job) {
  $("d-title").textContent = `${job.name} (${job.id}): ${job.state}`;
  $("d-meta").textContent = [job.queue_position && `number ${job.queue_position} in the queue`, job.phase && `phase ${job.phase}`, job.total_steps && `step ${text(job.step)} of ${job.total_steps}`,
                             job.eta_s !== null && job.eta_s !== undefined && `ETA ${eta(job.eta_s)}`, `output ${job.output_dir}`]
                            .filter(Boolean).join(" · ");
  $("d-error").hidden = !job.error; $("d-error").textContent = text(job.error);
  if (job.total_steps && job.total_steps !== totalSteps) { totalSteps = job.total_steps; drawSoon(); }
}

// The selected job's curve (plot.js): redrawn with the steps it has, the x-axis out to the job's
// last step once it is known.
const curve = new Curve($("loss"), $("readout"));
function drawLoss() { points = curve.draw(points, metric, totalSteps); }

// Steps arrive in bursts (a stream replays a job's history 500 events at a time): the curve is
// drawn once a burst is in, not once per step.
function drawSoon() {
  if (!drawTimer) drawTimer = setTimeout(() => { drawTimer = 0; drawLoss(); }, 50);
}

function onEvent(kind, data) {
  if (kind === "train_step" && typeof data.step === "number") {
    // Steps redone after a restore replace the lost ones from that step on, as in the report.
    while (points.length && points[points.length - 1][0] >= data.step) points.pop();
    if (typeof data[metric] === "number") points.push([data.step, data[metric]]);
    if (typeof data.total_steps === "number") totalSteps = data.total_steps;
    addMetrics(data);
    drawSoon();
  } else if (kind === "message" && typeof data.text === "string") {
    addMessage(data);
  } else if (kind === "end") {
    refreshJobs(); refreshSelected(); loadReport();
  }
}

// The driver's messages (the plan, a failed worker group, a restart, a stall): the newest
// MAX_MESSAGES, oldest first; opened by itself when one says a group failed or training stalls.
const MAX_MESSAGES = 200;
let messagesSeen = 0;
function addMessage(event) {
  const list = $("d-messages"), when = new Date(1000 * event.time).toTimeString().slice(0, 8);
  list.append(Object.assign(document.createElement("li"), { textContent: `${when} ${event.text}` }));
  while (list.children.length > MAX_MESSAGES) list.firstElementChild.remove();
  $("d-messages-count").textContent = String(++messagesSeen);
  if (/^train: (the worker group failed|no training step)/.test(event.text)) $("d-messages-box").open = true;
}

// The messages stored before ``upTo`` (the curve's seq: the stream brings those after it).
async function loadMessages(jobId, upTo) {
  const res = await api(`/v1/jobs/${jobId}/events?kind=message&limit=10000`);
  if (!res.ok || selected !== jobId) return;
  for (const event of (await res.json()).events) if (event.seq <= upTo) addMessage(event);
}

// The numbers a job's steps hold, as choices of the curve (once each).
function addMetrics(fields) {
  for (const [key, value] of Object.entries(fields || {})) {
    if (typeof value === "number" && !NOT_METRICS.has(key) && !metrics.has(key) && /^[A-Za-z_]\w{0,63}$/.test(key)) {
      metrics.add(key); $("metric").add(new Option(key, key));  // the keys GET /curve takes
    }
  }
}

// A problem following the selected job, shown under its title until another job is selected.
function following(problem) { $("d-follow").hidden = !problem; $("d-follow").textContent = problem; }

// A job's history: its loss curve cut to at most two points per pixel column of the plot
// (GET /curve, one read in the service however many steps), then its events after that.

async function followEvents(jobId) {
  if (follow) follow.abort();
  follow = new AbortController();
  const signal = follow.signal, width = $("loss").width - PLOT.left - PLOT.right, field = metric;
  // The curve, then the events after its seq until the stream's end event. A stream cut short
  // (the service restarted, a proxy timed out) resumes after the last event it brought, as an
  // EventSource would; so does a 5xx or a 429 (the service's streams all taken), waiting 1, 2,
  // 4 ... up to 15 s between tries, or what the service's Retry-After says, with some jitter so
  // that pages reconnecting after a restart spread out. Another 4xx ends it, saying why.
  let after = null, wait = 1000;
  for (;;) {
    let ended = false, why = "the connection to the service dropped";
    try {
      const path = after === null ? `/v1/jobs/${jobId}/curve?field=${encodeURIComponent(field)}&points=${width}`
                                  : `/v1/jobs/${jobId}/events?stream=true&after=${after}`;
      const res = await fetch(path, { headers: headers(), signal });
      if (!res.ok) {
        const said = await res.json().then((b) => b.error, () => `HTTP ${res.status}`);
        if (res.status < 500 && res.status !== 429) { following(`reading the job's ${after === null ? field + " curve" : "events"} failed: ${said}`); return; }
        why = res.status === 429 ? "the service follows as many pages as it can" : said;
        wait = Math.max(wait, 1000 * (Number(res.headers.get("retry-after")) || 0));
      } else if (after === null) {
        const curve = await res.json();
        if (signal.aborted || selected !== jobId) return;
        points = curve.points; drawSoon();
        if (after === null && !messagesSeen) await loadMessages(jobId, curve.seq);
        after = curve.seq; wait = 1000;
        continue;
      } else {
        following("");
        ended = await readStream(res, jobId, (seq) => { after = seq; wait = 1000; });
      }
    } catch (e) {
      if (signal.aborted) return;  // another job (or metric) was chosen
      if (e instanceof SyntaxError) { following(`the service sent an event the page cannot read (${e.message})`); return; }
    }
    if (ended || signal.aborted || selected !== jobId) return;
    const delay = wait * (0.75 + Math.random() / 2);
    following(`${why}: following the job again in ${Math.round(delay / 1000)} s`);
    await new Promise((resolve) => setTimeout(resolve, delay));
    wait = Math.min(2 * wait, 15000);
  }
}

// The frames of a server-sent event stream, handed to onEvent as they come; ``seen(seq)``
// after each event with an id. Whether the stream ended with its end event.
async function readStream(res, jobId, seen) {
  const reader = res.body.getReader(), decoder = new TextDecoder();
  let buffer = "", ended = false;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return ended;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
      let kind = "message", data = "", id = "";
      for (const line of frame.split("\n")) {
        if (line.startsWith("event: ")) kind = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
        else if (line.startsWith("id: ")) id = line.slice(4);
      }
      if (selected !== jobId) return true;
      onEvent(kind, data ? JSON.parse(data) : {});
      if (id) seen(Number(id));
      ended = ended || kind === "end";
    }
  }
}

async function loadReport() {
  const table = $("evaluation"), report_for = selected;
  try {
    const res = await api(`/v1/jobs/${report_for}/report`);
    if (!res.ok) {  // an ended job without its report: the service says why
      const why = await res.json().then((b) => b.error, () => `HTTP ${res.status}`);
      if (selected === report_for) table.replaceChildren(Object.assign(document.createElement("caption"), { textContent: why, className: "muted" }));
      return;
    }
    const report = await res.json(), evaluation = report.evaluation || {};
    if (selected !== report_for) return;
    $("comparisons").replaceChildren(...comparisons(report).map((line) => Object.assign(document.createElement("li"), { textContent: line })));
    const labels = Object.keys(evaluation);
    if (!labels.length) {
      table.innerHTML = '<tbody><tr><td class="muted">this job ran without held-out evaluation</td></tr></tbody>';
      return;
    }
    table.replaceChildren();
    const head = table.createTHead().insertRow();
    ["model", "ROUGE-L", "exact match", "mean length"].forEach((h) => { const th = document.createElement("th"); th.textContent = h; head.appendChild(th); });
    const body = table.createTBody();
    for (const label of labels) {
      const r = body.insertRow(), s = evaluation[label];
      // a score with its standard error where the report holds one (kdray.report.markdown.score)
      [label.replaceAll("_", " "), withError(s, "rougeL"), withError(s, "exact_match"), s.mean_length?.toFixed(2)]
        .forEach((v, i) => { const td = r.insertCell(); td.textContent = v === undefined ? "—" : text(v); if (i) td.className = "num"; });
    }
  } catch (e) { /* 401: the status line says so */ }
}

// A number with its standard error where there is one: "+0.118 ± 0.016" (kdray.report.markdown.score).
function withError(d, key, sign = "") {
  if (typeof d[key] !== "number") return "—";
  const value = (sign && d[key] >= 0 ? "+" : "") + d[key].toFixed(3);
  return value + (typeof d[`${key}_stderr`] === "number" ? ` ± ${d[`${key}_stderr`].toFixed(3)}` : "");
}

// The report's paired differences and the judge's verdict as sentences (kdray.report.markdown.paired, the CLI's judge line).
function comparisons(report) {
  const out = Object.entries(report.paired_differences || {}).map(([pair, d]) => {
    const [a, b] = pair.split(" - ").map((name) => name.replaceAll("_", " "));
    return `${a} − ${b}: ROUGE-L ${withError(d, "rougeL", "+")}, exact match ${withError(d, "exact_match", "+")} (${text(d.n)} prompts)`;
  });
  const judge = report.judge;
  if (judge) out.push(`judge ${text(judge.model)}: student after vs ${text(judge.reference)}: win rate ${withError(judge, "win_rate")} over ${text(judge.comparisons)} comparisons`);
  return out;
}

// A text (the driver log) in the viewer, or with asPage an HTML page (the report) in the sandboxed
// frame, which runs none of its scripts and loads nothing.
async function show(path, title, empty, asPage = false) {
  const jobId = selected, res = await api(path);
  const body = res.ok ? await res.text() : await res.json().then((b) => b.error, () => `HTTP ${res.status}`);
  if (selected !== jobId) return;
  $("viewer-title").textContent = res.ok ? title : `${title}: not available`;
  const framed = asPage && res.ok;
  if (framed) $("report-frame").srcdoc = body; else $("viewer").textContent = body || empty;
  $("viewer").hidden = framed; $("report-frame").hidden = !framed; $("viewer-title").hidden = false;
}

async function select(jobId) {
  if (jobId !== selected) { metric = "loss"; metrics.clear(); metrics.add("loss"); $("metric").replaceChildren(new Option("loss", "loss")); }
  if (follow) follow.abort();
  selected = jobId; points = []; totalSteps = null; drawLoss();
  ["d-title", "d-meta", "d-error", "d-follow"].forEach((id) => { $(id).textContent = ""; });
  $("d-error").hidden = $("d-follow").hidden = true;
  location.hash = "job=" + jobId;
  $("detail").hidden = false; $("viewer").hidden = $("viewer-title").hidden = $("report-frame").hidden = true;
  $("evaluation").innerHTML = '<tbody><tr><td class="muted">written when the job ends</td></tr></tbody>';
  $("comparisons").replaceChildren();
  $("d-messages").replaceChildren(); $("d-messages-count").textContent = "0"; messagesSeen = 0; $("d-messages-box").open = false;
  document.querySelectorAll("#jobs tbody tr").forEach((tr) => {
    tr.classList.toggle("selected", tr.dataset.job === jobId); tr.setAttribute("aria-selected", String(tr.dataset.job === jobId));
  });
  const job = await refreshSelected();
  if (!job || selected !== jobId) return;  // no such job (its error shows), or another was chosen meanwhile
  addMetrics(job.metrics);
  if (TERMINAL.includes(job.state)) loadReport();
  startFollowing(jobId);
}

function startFollowing(jobId) {
  points = []; drawLoss(); following("");
  followEvents(jobId).catch((e) => {
    if (e.name !== "AbortError" && selected === jobId) following(`lost the job's events (${e.message}): click the job again`);
  });
}

$("report-link").addEventListener("click", (e) => { e.preventDefault(); if (selected) show(`/v1/jobs/${selected}/report.html`, `report of job ${selected}`, "", true); });
$("logs-link").addEventListener("click", (e) => { e.preventDefault(); if (selected) show(`/v1/jobs/${selected}/logs`, `driver log of job ${selected}`,
                                                                                 "(empty: the job has not started on Ray yet, or printed nothing)"); });
$("to-jobs").addEventListener("click", (e) => {
  e.preventDefault();
  const row = document.querySelector(`#jobs tbody tr[data-job="${selected}"]`) || document.querySelector("#jobs tbody tr");
  if (row) row.focus(); else window.scrollTo(0, 0);
});
$("auth").addEventListener("submit", (e) => {
  e.preventDefault();
  token = $("token").value.trim();
  sessionStorage.setItem("kdray-token", token);
  $("token").value = "";
  refreshJobs();
  if (selected) select(selected);
});

$("metric").addEventListener("change", () => { metric = $("metric").value; if (selected) startFollowing(selected); });
$("state-filter").addEventListener("change", () => { offset = 0; refreshJobs(); });
$("newer").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); refreshJobs(); });
$("older").addEventListener("click", () => { offset += PAGE; refreshJobs(); });

refreshJobs();
setInterval(() => { if (!listing) refreshJobs(); }, 3000);  // not while the last read still waits: no pile-up
// The job in the address (#job=ID): opened at load, and again when it changes (a link, Back).
function fromHash() {
  const m = /job=([0-9a-f]+)/.exec(location.hash);
  if (m && m[1] !== selected) select(m[1]);
}
window.addEventListener("hashchange", fromHash);
fromHash();
