// The runs list: live status (refreshed every two seconds from the read model), pending
// approvals, tenant spend with the kill-switch, and a form to start a run.
"use strict";

(() => {
  const { api, el, money, when, badge } = Nerve;
  let me = null;
  let cursor = null;
  let timer = null;
  let shownApprovals = null; // what the list shows, so a refresh keeps a reason being typed

  const $ = (id) => document.getElementById(id);
  const tenant = () => (me && me.admin ? $("spend-tenant").value.trim() : me && me.tenant);

  async function loadRuns(append) {
    const params = new URLSearchParams({ limit: "50" });
    if ($("status-filter").value) params.set("status", $("status-filter").value);
    if ($("search").value.trim()) params.set("q", $("search").value.trim());
    if (append && cursor) params.set("cursor", cursor);
    const page = await api("GET", `/v1/runs?${params}`);
    const body = $("runs");
    if (!append) body.replaceChildren();
    for (const r of page.runs) {
      body.append(el("tr", { "data-run": r.run_id },
        el("td", {}, el("a", { href: `/runs/${encodeURIComponent(r.run_id)}`, text: r.run_id })),
        el("td", { text: r.tenant }),
        el("td", { text: r.workflow }),
        el("td", {}, badge(r.status)),
        el("td", { text: String(r.steps) }),
        el("td", { text: money(r.cost_usd) }),
        el("td", { text: when(r.created_at) }),
        el("td", { class: "task", text: (r.task || "").slice(0, 80) })));
    }
    cursor = page.next_cursor || null;
    $("more").classList.toggle("hidden", !cursor);
  }

  async function loadApprovals() {
    const list = $("approvals");
    const out = await api("GET", "/v1/approvals");
    const signature = out.approvals.map((a) => `${a.run_id}/${a.digest}`).join(",");
    if (signature === shownApprovals) return;
    shownApprovals = signature;
    list.replaceChildren();
    if (!out.approvals.length) list.append(el("li", { class: "muted", text: "none" }));
    for (const a of out.approvals) {
      const reason = el("input", { placeholder: "reason (optional)", class: "reason" });
      const decide = (approved) => async () => {
        try {
          await api("POST", `/v1/runs/${encodeURIComponent(a.run_id)}/signals/approval`, {
            payload: { approved, reason: reason.value || undefined }, approves: a.digest,
          });
          item.replaceChildren(el("span", { text: approved ? "approved" : "rejected" }));
        } catch (e) {
          item.append(el("span", { class: "error", text: e.message }));
        }
      };
      const item = el("li", { "data-digest": a.digest || "" },
        el("a", { href: `/runs/${encodeURIComponent(a.run_id)}`, text: a.run_id }),
        el("code", { text: `${a.tool || a.name} ${JSON.stringify(a.args || {})}` }),
        reason,
        el("button", { type: "button", class: "approve", onclick: decide(true), text: "Approve" }),
        el("button", { type: "button", class: "reject", onclick: decide(false), text: "Reject" }));
      list.append(item);
    }
  }

  async function loadSpend() {
    const t = tenant();
    const dl = $("spend");
    dl.replaceChildren();
    if (!t) return;
    const view = await api("GET", `/v1/tenants/${encodeURIComponent(t)}/budget`);
    const facts = [
      ["tenant", t],
      ["state", view.budget ? view.budget.state : "no budget set"],
      ["spent (histories)", money(view.spend.cost_usd)],
      ["LLM calls", String(view.spend.llm_calls)],
      ["runs", String(view.spend.runs)],
    ];
    if (view.budget) {
      for (const w of view.budget.windows) {
        if (w.limit_usd !== null) {
          facts.push([`this ${w.window}`, `${money(w.spent_usd)} of ${money(w.limit_usd)}`]);
        }
      }
    }
    for (const [k, v] of facts) dl.append(el("dt", { text: k }), el("dd", { text: v }));
    dl.dataset.state = view.budget ? view.budget.state : "none";
  }

  async function refresh() {
    try {
      await Promise.all([loadRuns(false), loadApprovals(), loadSpend()]);
    } catch (e) {
      // Shown by the key bar or the next refresh; a failed refresh keeps the old view.
    }
  }

  async function start() {
    $("start-error").textContent = "";
    const body = { task: $("task").value, workflow: $("workflow").value || "agent" };
    const split = (s) => s.split(",").map((x) => x.trim()).filter(Boolean);
    body.tools = split($("tools").value);
    const approval = split($("approval").value);
    if (approval.length) body.input = { requires_approval: approval };
    if (me && me.admin) body.tenant = $("run-tenant").value.trim();
    try {
      const out = await api("POST", "/v1/runs", body);
      location.assign(`/runs/${encodeURIComponent(out.run_id)}`);
    } catch (e) {
      $("start-error").textContent = e.message;
    }
  }

  async function kill() {
    const t = tenant();
    if (!t || !confirm(`Kill tenant ${t}? Every run of it stops spending now.`)) return;
    try {
      const out = await api("POST", `/v1/tenants/${encodeURIComponent(t)}/kill`,
        { reason: "killed from the console" });
      $("kill-result").textContent = `tenant ${out.tenant} killed`;
      await loadSpend();
    } catch (e) {
      $("kill-result").textContent = e.message;
    }
  }

  $("start").addEventListener("click", start);
  $("kill").addEventListener("click", kill);
  $("more").addEventListener("click", () => loadRuns(true));
  $("status-filter").addEventListener("change", refresh);
  $("search").addEventListener("input", refresh);
  $("spend-tenant").addEventListener("change", loadSpend);

  Nerve.keyBar((who) => {
    me = who;
    $("tenant-field").classList.toggle("hidden", !who.admin);
    $("spend-tenant-field").classList.toggle("hidden", !who.admin);
    refresh();
    if (!timer) timer = setInterval(refresh, 2000);
  });
})();
