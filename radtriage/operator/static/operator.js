// radtriage operator page: live sections over Server-Sent Events, acknowledge and replay.
// No framework: the server renders every section; this only swaps them in, counts the
// "time since" clocks, and posts the two actions.
"use strict";

(function () {
  const NAME_KEY = "radtriage.operator.name";
  const SECTIONS = ["status", "alerts", "worklist", "finished", "deadletters"];
  let clockOffsetMs = 0; // server time minus this workstation's time
  let openStudy = null;
  let lastWaterfall = 0;
  let source = null;
  let retryTimer = null;

  const $ = (id) => document.getElementById(id);

  function fmt(seconds) {
    seconds = Math.max(0, seconds);
    if (seconds < 60) return Math.floor(seconds) + "s";
    if (seconds < 3600) return Math.floor(seconds / 60) + "m " + String(Math.floor(seconds % 60)).padStart(2, "0") + "s";
    return Math.floor(seconds / 3600) + "h " + String(Math.floor((seconds % 3600) / 60)).padStart(2, "0") + "m";
  }

  function tick() {
    const now = Date.now() + clockOffsetMs;
    for (const el of document.querySelectorAll("time[data-since]")) {
      const t = Date.parse(el.dataset.since);
      if (!isNaN(t)) el.textContent = fmt((now - t) / 1000);
    }
  }

  function setConn(ok, text) {
    const el = $("conn");
    el.className = "pill " + (ok ? "ok" : "down");
    el.textContent = text;
  }

  function apply(data) {
    clockOffsetMs = Date.parse(data.now) - Date.now();
    for (const id of SECTIONS) {
      const el = $(id);
      if (el && id in data.sections) el.innerHTML = data.sections[id];
    }
    document.body.dataset.version = data.version;
    tick();
    if (openStudy && Date.now() - lastWaterfall > 1500) loadStudy(openStudy);
  }

  function connect() {
    if (source) source.close();
    source = new EventSource("/operator/events");
    source.addEventListener("open", () => setConn(true, "connected"));
    source.addEventListener("snapshot", (ev) => {
      setConn(true, "connected");
      try { apply(JSON.parse(ev.data)); } catch (err) { console.error(err); }
    });
    source.addEventListener("error", () => {
      setConn(false, "server unreachable — reconnecting");
      // EventSource retries by itself unless the server refused the stream (then CLOSED).
      if (source.readyState === EventSource.CLOSED && !retryTimer) {
        retryTimer = setTimeout(() => { retryTimer = null; connect(); }, 3000);
      }
    });
  }

  async function post(url, body) {
    const res = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    let data = {};
    try { data = await res.json(); } catch (err) { /* not JSON */ }
    if (!res.ok) throw new Error(data.error || ("HTTP " + res.status));
    return data;
  }

  async function loadStudy(uid) {
    openStudy = uid;
    lastWaterfall = Date.now();
    const panel = $("waterfall-panel");
    try {
      const res = await fetch("/operator/studies/" + encodeURIComponent(uid), { cache: "no-store" });
      if (openStudy !== uid) return;
      $("waterfall").innerHTML = await res.text();
    } catch (err) {
      $("waterfall").textContent = "Could not load the waterfall: " + err.message;
    }
    panel.hidden = false;
  }

  // -- acknowledge ------------------------------------------------------------------------
  let ackTarget = null;

  function openAck(button) {
    ackTarget = button;
    $("ack-what").textContent = button.dataset.label || button.dataset.alertId;
    $("ack-by").value = $("who").value || localStorage.getItem(NAME_KEY) || "";
    $("ack-error").textContent = "";
    $("ack-confirm").disabled = false;
    $("ack-dialog").showModal();
    $("ack-by").focus();
  }

  async function confirmAck(ev) {
    ev.preventDefault();
    const by = $("ack-by").value.trim();
    if (!by) { $("ack-error").textContent = "Say who acknowledges."; return; }
    localStorage.setItem(NAME_KEY, by);
    $("who").value = by;
    $("ack-confirm").disabled = true;
    try {
      await post("/operator/api/ack", { alert_id: ackTarget.dataset.alertId, by: by });
      $("ack-dialog").close();
      // Shown as acknowledged once the server reads it back from triage.audit (next push).
      ackTarget.textContent = "Recorded…";
      ackTarget.disabled = true;
    } catch (err) {
      $("ack-error").textContent = "Not recorded: " + err.message;
      $("ack-confirm").disabled = false;
    }
  }

  async function replay(button) {
    button.disabled = true;
    button.textContent = "Replaying…";
    try {
      const data = await post("/operator/api/replay", {
        topic: button.dataset.topic,
        partition: Number(button.dataset.partition),
        offset: Number(button.dataset.offset),
      });
      button.textContent = "replayed → " + data.replayed_to;
    } catch (err) {
      button.textContent = "Replay refused: " + err.message;
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    const served = Date.parse(document.body.dataset.now);
    if (!isNaN(served)) clockOffsetMs = served - Date.now();
    $("who").value = localStorage.getItem(NAME_KEY) || "";
    $("who").addEventListener("change", () => localStorage.setItem(NAME_KEY, $("who").value.trim()));
    $("ack-form").addEventListener("submit", confirmAck);
    $("ack-cancel").addEventListener("click", () => $("ack-dialog").close());
    document.addEventListener("click", (ev) => {
      const target = ev.target.closest("button, [data-study]");
      if (!target) return;
      if (target.classList.contains("ack-btn")) openAck(target);
      else if (target.classList.contains("replay-btn")) replay(target);
      else if (target.classList.contains("wf-close")) { openStudy = null; $("waterfall-panel").hidden = true; }
      else if (target.dataset.study && target.tagName !== "BUTTON") loadStudy(target.dataset.study);
    });
    setInterval(tick, 1000);
    tick();
    connect();
  });
})();
