// The console's shared pieces: the API key, calls to /v1, and a resumable SSE reader.
// Plain JavaScript, no build step. Everything the page shows is set with textContent.
"use strict";

const Nerve = (() => {
  const KEY = "nerve.key";

  function key() {
    return localStorage.getItem(KEY) || "";
  }

  function setKey(value) {
    if (value) localStorage.setItem(KEY, value.trim());
    else localStorage.removeItem(KEY);
  }

  // A key handed over in the URL fragment (#key=...) is stored and wiped from the URL.
  function keyFromFragment() {
    const m = location.hash.match(/key=([^&]+)/);
    if (m) {
      setKey(decodeURIComponent(m[1]));
      history.replaceState(null, "", location.pathname + location.search);
    }
  }

  class ApiError extends Error {
    constructor(status, body) {
      const err = (body && body.error) || {};
      super(err.message || `HTTP ${status}`);
      this.status = status;
      this.code = err.code || "";
    }
  }

  async function api(method, path, body) {
    const headers = { Authorization: `Bearer ${key()}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const resp = await fetch(path, {
      method, headers, cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await resp.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (e) { data = text; }
    if (!resp.ok) throw new ApiError(resp.status, data);
    return data;
  }

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  // Follow a run's events: resumes with Last-Event-ID after any drop, waiting the
  // server's `retry:` hint (backing off), until the server sends `end`.
  async function follow(runId, handlers) {
    let last = 0;
    let retry = 1000;
    let failures = 0;
    for (;;) {
      try {
        const headers = { Authorization: `Bearer ${key()}`, Accept: "text/event-stream" };
        if (last) headers["Last-Event-ID"] = String(last);
        const resp = await fetch(`/v1/runs/${encodeURIComponent(runId)}/events`,
          { headers, cache: "no-store" });
        if (resp.status === 401 || resp.status === 403 || resp.status === 404) {
          const body = await resp.json().catch(() => null);
          handlers.state("error", new ApiError(resp.status, body).message);
          return;
        }
        if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
        handlers.state("live", failures);
        const reader = resp.body.getReader();
        const decoder = new TextDecoder();
        let buf = "";
        let ev = { id: null, event: "message", data: [] };
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += decoder.decode(value, { stream: true });
          let nl;
          while ((nl = buf.indexOf("\n")) >= 0) {
            const line = buf.slice(0, nl).replace(/\r$/, "");
            buf = buf.slice(nl + 1);
            if (line === "") {
              if (ev.data.length || ev.event !== "message") {
                const data = ev.data.length ? JSON.parse(ev.data.join("\n")) : null;
                if (ev.id !== null) last = ev.id;
                failures = 0;
                if (ev.event === "end") {
                  handlers.state("ended", data);
                  return;
                }
                handlers.event(ev.event, data, ev.id);
              }
              ev = { id: null, event: "message", data: [] };
              continue;
            }
            if (line.startsWith(":")) continue;
            const colon = line.indexOf(":");
            const field = colon < 0 ? line : line.slice(0, colon);
            const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
            if (field === "id" && /^\d+$/.test(value)) ev.id = Number(value);
            else if (field === "event") ev.event = value;
            else if (field === "data") ev.data.push(value);
            else if (field === "retry" && /^\d+$/.test(value)) retry = Number(value);
          }
        }
      } catch (e) {
        // A network drop or a restarting server: fall through and reconnect.
      }
      failures += 1;
      handlers.state("reconnecting", failures);
      await sleep(Math.min(retry * failures, 10000));
    }
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c));
    return node;
  }

  function money(usd) {
    return `$${Number(usd || 0).toFixed(4)}`;
  }

  function when(epoch) {
    if (!epoch) return "";
    return new Date(epoch * 1000).toLocaleString();
  }

  function badge(status) {
    return el("span", { class: `badge status-${status}`, text: status });
  }

  // The key bar at the top of every page.
  async function keyBar(onReady) {
    keyFromFragment();
    const input = document.getElementById("key");
    const who = document.getElementById("whoami");
    const save = document.getElementById("key-save");
    const show = async () => {
      if (!key()) {
        who.textContent = "paste an API key (nerve apikey create --tenant NAME)";
        return;
      }
      try {
        const me = await api("GET", "/v1/whoami");
        who.textContent = me.admin ? "admin" : `tenant ${me.tenant}`;
        document.body.dataset.tenant = me.tenant || "";
        document.body.dataset.admin = me.admin ? "1" : "";
        onReady(me);
      } catch (e) {
        who.textContent = `key refused: ${e.message}`;
      }
    };
    save.addEventListener("click", () => {
      setKey(input.value);
      input.value = "";
      show();
    });
    input.addEventListener("keydown", (e) => { if (e.key === "Enter") save.click(); });
    await show();
  }

  return { api, follow, el, money, when, badge, keyBar, sleep, key, setKey };
})();
