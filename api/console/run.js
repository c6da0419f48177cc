// A run's page: the live token stream (resumed after any network drop), tool calls and
// status as they happen, approvals to approve or reject, the history as a timeline.
"use strict";

(() => {
  const { api, el, money, when, follow } = Nerve;
  const $ = (id) => document.getElementById(id);
  const runId = decodeURIComponent(location.pathname.split("/").pop());
  const texts = new Map(); // step index -> the text streamed so far (by offsets)
  const approvals = new Map(); // digest -> approval
  let status = "";
  let started = false;

  document.title = `${runId} · nerve console`;
  $("run-id").textContent = runId;

  function setStatus(s) {
    status = s;
    const b = $("status");
    b.textContent = s;
    b.className = `badge status-${s}`;
    document.body.dataset.status = s;
  }

  function renderText() {
    const steps = [...texts.keys()].sort((a, b) => a - b);
    $("stream-text").textContent = steps.map((i) => texts.get(i)).join("\n\n");
  }

  function liveLine(kind, text) {
    const list = $("live");
    list.append(el("li", { class: `live-${kind}` }, el("b", { text: kind }), " ", text));
    while (list.children.length > 200) list.firstChild.remove();
  }

  function renderApprovals() {
    const list = $("approvals");
    list.replaceChildren();
    const items = [...approvals.values()];
    if (!items.length) list.append(el("li", { class: "muted", text: "none" }));
    for (const a of items) {
      const item = el("li", { "data-digest": a.digest || "", "data-status": a.status },
        el("code", { text: `${a.tool || a.name} ${JSON.stringify(a.args || {})}` }),
        el("span", { class: `badge status-${a.status}`, text: a.status }));
      if (a.status === "pending" && status !== "completed" && status !== "cancelled") {
        const reason = el("input", { placeholder: "reason (optional)", class: "reason" });
        const decide = (approved) => async () => {
          try {
            await api("POST", `/v1/runs/${encodeURIComponent(runId)}/signals/approval`, {
              payload: { approved, reason: reason.value || undefined }, approves: a.digest,
            });
            a.status = approved ? "approved" : "rejected";
            renderApprovals();
          } catch (e) {
            item.append(el("span", { class: "error", text: e.message }));
          }
        };
        item.append(reason,
          el("button", { type: "button", class: "approve", onclick: decide(true), text: "Approve" }),
          el("button", { type: "button", class: "reject", onclick: decide(false), text: "Reject" }));
      } else if (a.reason) {
        item.append(el("span", { class: "muted", text: ` ${a.reason}` }));
      }
      list.append(item);
    }
  }

  async function loadRun() {
    const out = await api("GET", `/v1/runs/${encodeURIComponent(runId)}`);
    const r = out.run;
    setStatus(r.status);
    const facts = $("facts");
    facts.replaceChildren();
    for (const [k, v] of [["tenant", r.tenant], ["workflow", `${r.workflow} v${r.version}`],
      ["cost", money(r.cost_usd)], ["steps", String(r.steps)],
      ["started", when(r.created_at)], ["ended", when(r.ended_at)]]) {
      facts.append(el("dt", { text: k }), el("dd", { text: v }));
    }
    $("task-text").textContent = r.task || "";
    for (const a of out.approvals) approvals.set(a.digest || `#${a.idx}`, a);
    renderApprovals();
    $("cancel").disabled = ["completed", "failed", "cancelled"].includes(r.status);
  }

  async function loadHistory() {
    const out = await api("GET", `/v1/runs/${encodeURIComponent(runId)}/history`);
    const list = $("timeline");
    list.replaceChildren();
    const t0 = out.events.length ? out.events[0].at : 0;
    for (const ev of out.events) {
      const rest = Object.fromEntries(Object.entries(ev).filter(
        ([k]) => !["type", "at", "v", "index", "seq"].includes(k)));
      const fork = el("button", {
        type: "button", class: "fork", title: "start a new run from here",
        onclick: async () => {
          try {
            const f = await api("POST", `/v1/runs/${encodeURIComponent(runId)}/fork`,
              { at: ev.index + 1 });
            location.assign(`/runs/${encodeURIComponent(f.run_id)}`);
          } catch (e) {
            $("action-result").textContent = e.message;
          }
        },
      }, "fork here");
      list.append(el("li", { "data-type": ev.type },
        el("span", { class: "t", text: `+${(ev.at - t0).toFixed(3)}s` }),
        el("span", { class: `ev ev-${ev.type}`, text: ev.type }),
        el("code", { text: JSON.stringify(rest).slice(0, 300) }), fork));
    }
  }

  function onEvent(type, ev, id) {
    const d = (ev && ev.data) || {};
    document.body.dataset.lastId = String(id || document.body.dataset.lastId || 0);
    if (type === "token") {
      const have = texts.get(d.index) || "";
      texts.set(d.index, have.slice(0, d.offset) + d.text);
      renderText();
    } else if (type === "status") {
      if (d.status && d.status !== "finishing") setStatus(d.status);
      liveLine("status", d.status || "");
      if (["completed", "failed", "cancelled", "waiting"].includes(d.status)) {
        loadHistory().catch(() => {});
      }
    } else if (type === "approval_requested") {
      approvals.set(d.digest, { digest: d.digest, tool: d.tool, args: d.args,
        name: "approval", status: "pending" });
      renderApprovals();
      liveLine("approval", `${d.tool} waits for a human`);
    } else if (type === "tool_call_started") {
      liveLine("tool", `${d.name} ${JSON.stringify(d.args || {}).slice(0, 200)}`);
    } else if (type === "tool_call_finished") {
      liveLine("tool", `${d.name} → ${String(d.result || "").slice(0, 200)}`);
    } else if (type === "final") {
      liveLine("final", "the run finished");
    } else if (type === "error") {
      liveLine("error", JSON.stringify(d.error || d).slice(0, 300));
    } else if (type === "revoked") {
      liveLine("error", (ev && ev.message) || "this key was revoked");
    }
  }

  function onState(state, info) {
    const conn = $("conn");
    document.body.dataset.conn = state;
    if (state === "reconnecting") {
      document.body.dataset.reconnects = String(Number(document.body.dataset.reconnects || 0) + 1);
      conn.textContent = `reconnecting (${info})…`;
    } else if (state === "live") {
      conn.textContent = "live";
    } else if (state === "ended") {
      conn.textContent = "";
      if (info && info.status) setStatus(info.status);
      Promise.all([loadRun(), loadHistory()]).catch(() => {});
    } else if (state === "error") {
      conn.textContent = info;
    }
  }

  $("cancel").addEventListener("click", async () => {
    if (!confirm(`Cancel run ${runId}?`)) return;
    try {
      await api("POST", `/v1/runs/${encodeURIComponent(runId)}/cancel`,
        { reason: "cancelled from the console" });
      $("action-result").textContent = "cancellation requested";
    } catch (e) {
      $("action-result").textContent = e.message;
    }
  });

  Nerve.keyBar(async () => {
    if (started) return;
    started = true;
    try {
      await Promise.all([loadRun(), loadHistory()]);
    } catch (e) {
      $("conn").textContent = e.message;
      return;
    }
    follow(runId, { event: onEvent, state: onState });
  });
})();
