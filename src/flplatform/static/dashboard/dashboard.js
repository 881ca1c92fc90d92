// flplatform dashboard: a small single-page view over the JSON API (docs/dashboard.md).
//
// The API token lives only in this page's memory (never in a cookie or in storage): every request
// carries it as "Authorization: Bearer", so the dashboard sees exactly what the API lets the
// signed-in user read, and no ambient credential exists for another site to abuse (no CSRF).
// Live updates use fetch() streaming of GET /api/trainings/{id}/events/ (EventSource cannot send
// an Authorization header) and fall back to polling the training where that route is missing.
"use strict";

(() => {
  const ROOT = new URL("../", document.baseURI); // the page is served at <root>/ui/
  const POLL_MS = 2000;
  const state = { token: null, me: null, names: new Map(), live: null, charts: [] };
  const main = document.getElementById("main");
  const statusLine = document.getElementById("status");

  // ------------------------------------------------------------------ helpers

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") el.className = value;
      else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else el.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  function say(text, error = false) {
    statusLine.textContent = text || "";
    statusLine.classList.toggle("error", !!error);
  }

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail || `HTTP ${status}`);
      this.status = status;
    }
  }

  async function api(path, options = {}) {
    const headers = Object.assign({}, options.headers || {});
    if (state.token) headers.Authorization = `Bearer ${state.token}`;
    const response = await fetch(new URL(path, ROOT), Object.assign({ cache: "no-store" }, options, { headers }));
    if (response.status === 401 && state.token) {
      logout("Your session has ended: log in again.");
      throw new ApiError(401, "Not signed in.");
    }
    if (!response.ok) {
      let detail = `HTTP ${response.status}`;
      try {
        detail = (await response.json()).detail || detail;
      } catch (_) { /* not JSON */ }
      throw new ApiError(response.status, detail);
    }
    return response;
  }

  const getJSON = async (path) => (await api(path)).json();
  const shortId = (id) => (id ? String(id).slice(0, 8) : "—");
  const who = (id) => state.names.get(String(id)) || shortId(id);

  function when(value) {
    if (!value) return "—";
    const d = new Date(value);
    return h("time", { datetime: d.toISOString(), title: d.toISOString() }, d.toLocaleString());
  }

  function ago(value) {
    if (!value) return "—";
    const seconds = Math.max(0, (Date.now() - new Date(value).getTime()) / 1000);
    const text = seconds < 60 ? `${Math.round(seconds)} s ago`
      : seconds < 3600 ? `${Math.round(seconds / 60)} min ago`
      : seconds < 86400 ? `${Math.round(seconds / 3600)} h ago` : `${Math.round(seconds / 86400)} d ago`;
    return h("time", { datetime: new Date(value).toISOString(), title: new Date(value).toLocaleString() }, text);
  }

  const STATES = { I: "initial", O: "ongoing", C: "completed", E: "error", S: "SWAG round" };
  const stateText = (t) => `${STATES[t.state] || t.state}${t.state === "O" || t.state === "S" ? ` (${t.phase})` : ""}`;

  function roundText(t) {
    const total = t.target_num_updates;
    const done = Math.max(0, (t.round || 0) - (t.start_round || 0));
    const current = t.state === "O" && t.phase === "update" ? done + 1 : done;
    return `round ${Math.min(current, total)} of ${total}`;
  }

  function aggregationText(t) {
    const aggregator = t.options && t.options.aggregator;
    const same = !aggregator || String(aggregator).toLowerCase() === String(t.aggregation_method).toLowerCase();
    return same ? t.aggregation_method : `${t.aggregation_method} (${aggregator})`;
  }

  function mark(ok, yes, no) {
    return h("span", { class: ok ? "ok" : "no" },
      h("span", { "aria-hidden": "true" }, ok ? "✓ " : "✗ "), h("span", { class: "sr" }, ok ? yes : no));
  }

  function table(caption, headings, rows, empty = "Nothing to show.") {
    if (!rows.length) return h("p", { class: "muted" }, empty);
    return h("table", {},
      h("caption", {}, caption),
      h("thead", {}, h("tr", {}, headings.map((x) => h("th", { scope: "col", class: x.startsWith("#") ? "num" : null }, x.replace(/^#/, ""))))),
      h("tbody", {}, rows.map((cells) => h("tr", {}, cells.map((c, i) =>
        i === 0 ? h("th", { scope: "row" }, c) : h("td", { class: headings[i].startsWith("#") ? "num" : null }, c))))));
  }

  async function download(path, filename) {
    try {
      const blob = await (await api(path)).blob();
      const url = URL.createObjectURL(blob);
      const link = h("a", { href: url, download: filename });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
      say(`Downloaded ${filename}.`);
    } catch (error) {
      say(`Download failed: ${error.message}`, true);
    }
  }

  // ------------------------------------------------------------------ sign in

  function showLogin(message) {
    document.getElementById("nav").hidden = true;
    document.getElementById("who").hidden = true;
    const form = h("form", { class: "login", id: "login-form" },
      h("label", {}, "Username or email", h("input", { id: "username", name: "username", autocomplete: "username", required: true })),
      h("label", {}, "Password", h("input", { id: "password", name: "password", type: "password", autocomplete: "current-password", required: true })),
      h("button", { type: "submit", class: "primary" }, "Log in"));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const body = new URLSearchParams({ grant_type: "password", username: form.username.value, password: form.password.value });
      say("Signing in…");
      try {
        const response = await fetch(new URL("api/auth/token/", ROOT), { method: "POST", body, cache: "no-store" });
        const data = await response.json();
        if (!response.ok) throw new ApiError(response.status, data.detail);
        await signedIn(data.access_token);
      } catch (error) {
        say(`Log-in failed: ${error.message}`, true);
      }
    });
    const tokenForm = h("form", { class: "login", id: "token-form" },
      h("label", {}, "API token", h("input", { id: "api-token", name: "token", type: "password", autocomplete: "off", required: true })),
      h("button", { type: "submit" }, "Use this token"));
    tokenForm.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        await signedIn(tokenForm.token.value.trim());
      } catch (error) {
        say(`That token was refused: ${error.message}`, true);
      }
    });
    main.replaceChildren(
      h("h1", { tabindex: "-1" }, "Log in"),
      h("p", {}, "Sign in with your flplatform account. The session lasts as long as this tab: nothing is stored in the browser."),
      form,
      h("details", {}, h("summary", {}, "Use an API token instead"), tokenForm));
    say(message || "");
    document.getElementById("username").focus();
  }

  async function signedIn(token) {
    state.token = token;
    try {
      state.me = await getJSON("api/users/myself/");
    } catch (error) {
      state.token = null;
      throw error;
    }
    state.names = new Map([[String(state.me.id), state.me.username]]);
    try {
      for (const user of await getJSON("api/users/?limit=1000")) state.names.set(String(user.id), user.username);
    } catch (_) { /* names are a nicety */ }
    document.getElementById("nav").hidden = false;
    document.getElementById("who").hidden = false;
    document.getElementById("who-name").textContent = `Signed in as ${state.me.username}`;
    say("");
    if (!location.hash || location.hash === "#/login") location.hash = "#/trainings";
    else route();
  }

  function logout(message) {
    stopLive();
    state.token = null;
    state.me = null;
    state.names = new Map();
    showLogin(message || "Logged out.");
  }

  document.getElementById("logout").addEventListener("click", () => logout());
  // The skip link moves focus to the content without touching the hash (the hash is the route).
  document.querySelector("a.skip").addEventListener("click", (event) => {
    event.preventDefault();
    main.focus();
  });

  // ------------------------------------------------------------------ routing

  const VIEWS = [
    [/^#\/trainings\/([0-9a-f-]{36})$/, (m) => trainingView(m[1]), "trainings"],
    [/^#\/trainings$/, () => trainingsView(), "trainings"],
    [/^#\/models$/, () => modelsView(), "models"],
    [/^#\/topics$/, () => topicsView(), "topics"],
    [/^#\/jobs$/, () => jobsView(), "jobs"],
  ];

  async function route() {
    stopLive();
    if (!state.token) return showLogin();
    const hash = location.hash || "#/trainings";
    const found = VIEWS.find(([pattern]) => pattern.test(hash));
    if (!found) {
      location.hash = "#/trainings";
      return;
    }
    const [pattern, view, section] = found;
    for (const link of document.querySelectorAll("#nav a")) {
      if (link.dataset.section === section) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    main.setAttribute("aria-busy", "true");
    try {
      await view(hash.match(pattern));
      const heading = main.querySelector("h1");
      if (heading) {
        heading.setAttribute("tabindex", "-1");
        heading.focus();
      }
    } catch (error) {
      if (error.status !== 401) {
        main.replaceChildren(h("h1", {}, "Could not load this page"), h("p", {}, error.message));
        say(error.message, true);
      }
    } finally {
      main.removeAttribute("aria-busy");
    }
  }

  window.addEventListener("hashchange", route);

  // ------------------------------------------------------------------ trainings

  async function trainingRows() {
    // Trainings one runs or oversees, and those one acts or takes part in (a list one may not
    // read at all counts as empty: the other still shows).
    const optional = (path) => getJSON(path).catch((error) => {
      if (error.status === 401) throw error;
      return [];
    });
    const [run, mine] = await Promise.all([optional("api/trainings/"), optional("api/users/trainings/")]);
    const byId = new Map();
    for (const t of [...run, ...mine]) byId.set(t.id, t);
    const trainings = [...byId.values()].sort((a, b) => (a.created_at < b.created_at ? 1 : -1));
    return Promise.all(trainings.map(async (t) => {
      const [detail, models] = await Promise.all([getJSON(`api/trainings/${t.id}/`), getJSON(`api/trainings/${t.id}/models/`)]);
      return { training: detail, models };
    }));
  }

  function uploadedThisRound(training, models) {
    const uploaded = new Set(models.filter((m) => m.type === "LOCAL" && m.round === training.round).map((m) => String(m.owner)));
    const status = new Map((training.participant_status || []).map((s) => [String(s.id), s]));
    return training.participants.map((p) => {
      const s = status.get(String(p));
      return { id: String(p), uploaded: uploaded.has(String(p)), selected: s ? s.selected : true, status: s };
    });
  }

  // Liveness from the training detail (heartbeats, broker pongs); nothing for clients never heard from.
  function liveness(s) {
    if (!s || s.liveness === "unknown") return null;
    return h("span", { class: `liveness ${s.liveness}`, "data-liveness": s.liveness, title: s.last_seen ? `last seen ${when(s.last_seen)}` : "" }, ` · ${s.liveness}`);
  }

  function participantList(training, models) {
    const running = training.state === "O" && training.phase === "update";
    return h("ul", { class: "participants" }, uploadedThisRound(training, models).map((p) =>
      h("li", { "data-participant": p.id },
        running ? (p.selected ? mark(p.uploaded, "uploaded this round", "not uploaded this round") : h("span", { class: "muted" }, "– ", h("span", { class: "sr" }, "not asked this round"))) : null,
        who(p.id), liveness(p.status))));
  }

  function lastActivity(training, models) {
    const times = [training.last_update, ...models.map((m) => m.created_at)].filter(Boolean);
    return times.sort().slice(-1)[0];
  }

  async function trainingsView() {
    const rows = await trainingRows();
    main.replaceChildren(
      h("h1", {}, "Trainings"),
      table(`${rows.length} training${rows.length === 1 ? "" : "s"} you may read; ✓ / ✗ = uploaded an update this round or not (running trainings)`,
        ["Training", "State", "Round", "Participants", "Last activity", "Aggregation"],
        rows.map(({ training: t, models }) => {
          const glob = models.find((m) => m.type !== "LOCAL" && m.id === t.model);
          return [
            h("a", { href: `#/trainings/${t.id}` }, glob && glob.name ? `${glob.name} · ${shortId(t.id)}` : `Training ${shortId(t.id)}`),
            stateText(t), roundText(t), participantList(t, models), ago(lastActivity(t, models)), aggregationText(t),
          ];
        }), "No trainings yet: create one through the API (POST /api/trainings/)."));
  }

  // ------------------------------------------------------------------ one training

  async function trainingView(id) {
    const page = {
      id,
      facts: h("div", {}), participants: h("div", {}), charts: h("div", { class: "charts", id: "charts" }),
      history: h("div", {}), updates: h("div", {}),
      timeline: h("ol", { class: "timeline", id: "timeline", "aria-live": "polite", "aria-relevant": "additions" }),
      liveNote: h("p", { class: "live", id: "live-mode" }, "Connecting…"),
      training: null,
    };
    const title = h("h1", {}, `Training ${shortId(id)}`);
    main.replaceChildren(
      h("p", {}, h("a", { href: "#/trainings" }, "← All trainings")),
      title,
      h("div", { class: "cols" },
        h("section", { "aria-labelledby": "h-summary" }, h("h2", { id: "h-summary" }, "Summary"), page.facts,
          h("h2", { id: "h-participants" }, "Participants"), page.participants),
        h("section", { "aria-labelledby": "h-timeline" }, h("h2", { id: "h-timeline" }, "Round timeline"), page.liveNote, page.timeline)),
      h("section", { "aria-labelledby": "h-metrics" }, h("h2", { id: "h-metrics" }, "Metrics per round"), page.charts),
      h("section", { "aria-labelledby": "h-history" }, h("h2", { id: "h-history" }, "Model history"), page.history, page.updates));
    await refreshTraining(page, title);
    startLive(page, title);
  }

  async function refreshTraining(page, title) {
    const [t, models, series] = await Promise.all([
      getJSON(`api/trainings/${page.id}/`), getJSON(`api/trainings/${page.id}/models/`), getJSON(`api/trainings/${page.id}/metrics/`),
    ]);
    page.training = t;
    const glob = models.find((m) => m.type !== "LOCAL" && m.id === t.model) || null;
    if (glob && glob.name) title.textContent = `Training: ${glob.name}`;
    page.facts.replaceChildren(h("dl", { class: "facts" },
      h("dt", {}, "State"), h("dd", { id: "fact-state" }, stateText(t)),
      h("dt", {}, "Round"), h("dd", { id: "fact-round" }, roundText(t), h("span", { class: "muted" }, ` (global model round ${t.round ?? 0}; the plots and timeline count model rounds)`)),
      h("dt", {}, "Updates this round"), h("dd", { id: "fact-arrived" }, `${t.local_models_arrived} of ${t.local_models_expected}`),
      h("dt", {}, "Aggregation"), h("dd", {}, aggregationText(t)),
      h("dt", {}, "Actor"), h("dd", {}, who(t.actor)),
      h("dt", {}, "Last activity"), h("dd", {}, ago(lastActivity(t, models))),
      h("dt", {}, "Created"), h("dd", {}, when(t.created_at)),
      t.error_reason ? [h("dt", {}, "Error"), h("dd", {}, t.error_reason)] : null));
    page.participants.replaceChildren(participantList(t, models));
    drawCharts(page.charts, series);
    const rounds = glob && glob.rounds ? [...glob.rounds].sort((a, b) => b - a) : [];
    page.history.replaceChildren(table("Global model after each round (round 0: as uploaded)", ["Round", "Download"],
      rounds.map((r) => [String(r), h("button", { type: "button", onclick: () => download(`api/models/${t.model}/?round=${r}`, `model-${shortId(t.model)}-round-${r}.pt`) }, `Download round ${r}`)]),
      "No stored rounds you may read."));
    const locals = models.filter((m) => m.type === "LOCAL").sort((a, b) => b.round - a.round);
    page.updates.replaceChildren(h("h3", {}, "Participants' updates"), table("Updates you may read", ["Participant", "#Round", "#Samples", "Uploaded", "Download"],
      locals.map((m) => [who(m.owner), String(m.round), String(m.sample_size ?? "—"), when(m.created_at),
        h("button", { type: "button", onclick: () => download(`api/models/${m.id}/`, `update-${shortId(m.id)}-round-${m.round}.safetensors`) }, "Download")]),
      "No updates yet."));
  }

  // ------------------------------------------------------------------ charts

  const COLOURS = ["#0b4fa6", "#b35c00", "#11652b", "#7a1fa2", "#a4161a", "#00656e", "#5a4a00", "#3d4650"];

  function drawCharts(container, series) {
    for (const chart of state.charts) chart.destroy();
    state.charts = [];
    const groups = [];
    for (const [name, points] of Object.entries(series)) {
      for (const source of ["test", "update"]) {
        const mine = points.filter((p) => p.source === source);
        if (mine.length) groups.push({ name, source, points: mine });
      }
    }
    if (!groups.length) {
      container.replaceChildren(h("p", { class: "muted" }, "No numeric metrics reported yet."));
      return;
    }
    container.replaceChildren(...groups.map((g) => chartFigure(g)));
  }

  function chartFigure({ name, source, points }) {
    const rounds = [...new Set(points.map((p) => p.round))].sort((a, b) => a - b);
    const aggregate = new Map(points.filter((p) => p.reporter === null).map((p) => [p.round, p]));
    const reporters = [...new Set(points.filter((p) => p.reporter !== null).map((p) => String(p.reporter)))];
    const label = `${name} (${source === "test" ? "test metrics on the global model" : "sent with updates"})`;
    const weighted = [...aggregate.values()].some((p) => p.weighted);
    const figure = h("figure", {
      class: "chart", "data-metric": name, "data-source": source, "data-aggregate-points": aggregate.size,
      "data-participant-points": points.length - aggregate.size,
    }, h("figcaption", {}, label));
    const plot = h("div", { class: "plot", role: "img", "aria-label": `${label}: ${rounds.map((r) => `round ${r} ${fmt(aggregate.get(r)?.value)}`).join(", ")}` });
    figure.append(plot);
    const rows = rounds.map((r) => [String(r), fmt(aggregate.get(r)?.value),
      reporters.map((rep) => points.filter((p) => p.reporter !== null && String(p.reporter) === rep && p.round === r).map((p) => `${who(rep)} ${fmt(p.value)}`).join(", ")).filter(Boolean).join("; ")]);
    figure.append(h("details", {}, h("summary", {}, "Values as a table"),
      table(`${label}, ${weighted ? "mean weighted by sample size" : "mean"} per round`, ["Round", `#${weighted ? "Weighted mean" : "Mean"}`, "Participants"], rows)));
    const data = [rounds,
      rounds.map((r) => (aggregate.has(r) ? aggregate.get(r).value : null)),
      ...reporters.map((rep) => rounds.map((r) => {
        const p = points.find((q) => q.reporter !== null && String(q.reporter) === rep && q.round === r);
        return p ? p.value : null;
      }))];
    const seriesOptions = [{ label: "round" },
      { label: weighted ? "weighted mean" : "mean", stroke: COLOURS[0], width: 2.5, points: { show: true, size: 8, fill: COLOURS[0] } },
      ...reporters.map((rep, i) => ({ label: who(rep), stroke: COLOURS[(i + 1) % COLOURS.length], width: 0, paths: () => null, points: { show: true, size: 7, width: 2 } }))];
    requestAnimationFrame(() => {
      if (typeof uPlot !== "function" || !plot.isConnected) return;
      const width = Math.max(320, Math.min(plot.clientWidth || 560, 900));
      const chart = new uPlot({
        width, height: 240, series: seriesOptions,
        scales: { x: { time: false, range: (u, min, max) => (min === max ? [min - 1, max + 1] : [min, max]) } },
        axes: [{ label: "round", values: (u, ticks) => ticks.map((v) => (Number.isInteger(v) ? String(v) : "")) }, { label: name }],
        legend: { live: false },
      }, data, plot);
      state.charts.push(chart);
      figure.dataset.drawn = "true";
    });
    return figure;
  }

  function fmt(value) {
    if (value === null || value === undefined) return "—";
    return Math.abs(value) >= 1000 || Number.isInteger(value) ? String(value) : value.toPrecision(4).replace(/\.?0+$/, "");
  }

  // ------------------------------------------------------------------ live updates

  function stopLive() {
    if (state.live) state.live.abort();
    state.live = null;
  }

  function startLive(page, title) {
    const controller = new AbortController();
    state.live = controller;
    let refreshing = null;
    const refreshSoon = () => {
      if (refreshing) return;
      refreshing = setTimeout(async () => {
        refreshing = null;
        if (controller.signal.aborted) return;
        try {
          await refreshTraining(page, title);
        } catch (error) {
          if (!controller.signal.aborted) say(error.message, true);
        }
      }, 250);
    };
    const add = (at, kind, text) => {
      page.timeline.prepend(h("li", { "data-kind": kind }, when(at || new Date()), text));
    };
    streamEvents(page.id, controller.signal, (event) => {
      add(event.at, event.kind, describe(event));
      refreshSoon();
    }, (mode) => {
      page.liveNote.textContent = mode === "stream" ? "Live: events stream from the server." : `Live: checking every ${POLL_MS / 1000} s.`;
      page.liveNote.dataset.mode = mode;
    }).then((outcome) => {
      if (outcome === "unsupported" && !controller.signal.aborted) poll(page, controller.signal, add, refreshSoon);
    });
  }

  function describe(event) {
    const d = event.data || {};
    switch (event.kind) {
      case "round_started": return `Round ${d.round} started${d.registered != null && d.registered !== d.participants ? ` (${d.participants} of ${d.registered} clients asked)` : ""}`;
      case "participant_dropped": return `${d.participant || who(d.participant_id)} dropped from round ${d.round} (offline)`;
      case "update_received": return `Update from ${d.participant || who(d.participant_id)} for round ${d.round}${d.sample_size != null ? ` (${d.sample_size} samples)` : ""}`;
      case "aggregation_started": return `Aggregating round ${d.round}${d.updates != null ? ` (${d.updates} updates${d.method ? `, ${d.method}` : ""})` : ""}`;
      case "aggregation_finished": return `Round ${d.round} aggregated${d.duration_seconds != null ? ` in ${Number(d.duration_seconds).toFixed(2)} s` : ""}`;
      case "test_round_started": return `Test round for round ${d.round} started`;
      case "test_metrics_received": return `Test metrics from ${d.participant || who(d.participant_id)} on the model of round ${d.round}`;
      case "state_changed": return `State ${STATES[d.previous_state] || d.previous_state || "?"} → ${STATES[d.state] || d.state}`;
      case "gap": return "Some older events are no longer kept";
      default: {
        const details = Object.entries(d).filter(([, v]) => typeof v !== "object").map(([k, v]) => `${k} ${v}`).join(", ");
        return `${event.kind.replace(/_/g, " ")}${details ? `: ${details}` : ""}`;
      }
    }
  }

  // GET /api/trainings/{id}/events/ read with fetch() (the token goes in a header), parsed as
  // Server-Sent Events; reconnects after the last id it saw. Resolves "unsupported" when the
  // server has no such route (404/405), "stopped" when the page leaves.
  async function streamEvents(id, signal, onEvent, onMode) {
    let last = 0;
    let failures = 0;
    while (!signal.aborted) {
      let response;
      try {
        response = await fetch(new URL(`api/trainings/${id}/events/?last_event_id=${last}`, ROOT), {
          headers: { Authorization: `Bearer ${state.token}`, Accept: "text/event-stream" }, cache: "no-store", signal,
        });
      } catch (_) {
        if (signal.aborted) return "stopped";
        await sleep(Math.min(10000, 1000 * 2 ** failures++), signal);
        continue;
      }
      if (response.status === 404 || response.status === 405) return "unsupported";
      if (response.status === 401) {
        logout("Your session has ended: log in again.");
        return "stopped";
      }
      if (!response.ok || !response.body) {
        await sleep(Math.min(10000, 1000 * 2 ** failures++), signal);
        continue;
      }
      failures = 0;
      onMode("stream");
      try {
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value.replace(/\r\n?/g, "\n");
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const frame = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            const event = parseFrame(frame);
            if (!event) continue;
            if (event.id !== null) last = event.id;
            onEvent(event);
          }
        }
      } catch (_) {
        if (signal.aborted) return "stopped";
      }
      await sleep(1000, signal);
    }
    return "stopped";
  }

  function parseFrame(frame) {
    let kind = "message";
    let id = null;
    const data = [];
    for (const line of frame.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") kind = value;
      else if (field === "data") data.push(value);
      else if (field === "id" && /^\d+$/.test(value)) id = Number(value);
    }
    if (!data.length) return null;
    let body = {};
    try {
      body = JSON.parse(data.join("\n"));
    } catch (_) {
      body = { data: { text: data.join("\n") } };
    }
    return { id, kind: body.kind || kind, at: body.at || null, data: body.data || {} };
  }

  async function poll(page, signal, add, refreshSoon) {
    page.liveNote.textContent = `Live: checking every ${POLL_MS / 1000} s.`;
    page.liveNote.dataset.mode = "poll";
    let before = page.training;
    if (before) add(new Date(), "watching", `Watching from here: ${stateText(before)}, ${roundText(before)}`);
    while (!signal.aborted) {
      await sleep(POLL_MS, signal);
      if (signal.aborted) return;
      let now;
      try {
        now = await getJSON(`api/trainings/${page.id}/`);
      } catch (_) {
        continue;
      }
      if (before) {
        if (now.state !== before.state) add(now.last_update, "state_changed", `State ${STATES[before.state]} → ${STATES[now.state]}`);
        if (now.round !== before.round) add(now.last_update, "aggregation_finished", `Round ${before.round} aggregated; now round ${now.round}`);
        else if (now.local_models_arrived > before.local_models_arrived) {
          add(now.last_update, "update_received", `Update received: ${now.local_models_arrived} of ${now.local_models_expected} this round`);
        }
        if (now.phase !== before.phase && now.round === before.round) add(now.last_update, "phase_changed", `Phase ${before.phase} → ${now.phase}`);
      }
      const changed = !before || ["state", "round", "phase", "local_models_arrived", "last_update"].some((k) => now[k] !== before[k]);
      before = now;
      if (changed) refreshSoon();
    }
  }

  function sleep(ms, signal) {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      if (signal) signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
    });
  }

  // ------------------------------------------------------------------ models, topics, jobs

  async function modelsView() {
    const models = (await getJSON("api/models/")).filter((m) => m.type !== "LOCAL");
    main.replaceChildren(h("h1", {}, "Models"),
      table(`${models.length} model${models.length === 1 ? "" : "s"} you may read (participants' updates are listed with their training)`,
        ["Name", "Type", "#Round", "Owner", "Training", "#Size (bytes)", "Created"],
        models.map((m) => [m.name || shortId(m.id), m.type, String(m.round), who(m.owner),
          m.training ? h("a", { href: `#/trainings/${m.training}` }, `Training ${shortId(m.training)}`) : "—",
          String(m.weights_size), when(m.created_at)]),
        "No models yet: upload one with POST /api/models/."));
  }

  async function topicsView() {
    const topics = await getJSON("api/broker/topics/?responses=true&limit=1000");
    const availability = (a) => (a === true ? mark(true, "", "") : a === false ? mark(false, "", "") : h("span", { "aria-hidden": "true" }, "? "));
    main.replaceChildren(h("h1", {}, "Broker topics"),
      table(`${topics.length} topic${topics.length === 1 ? "" : "s"} you may see; availability from the last ping and pong`,
        ["Topic", "Availability", "Last ping", "Last pong", "#Consumers", "#Stored", "#Pending", "Public"],
        topics.map((t) => [t.is_response_for ? `${t.slug} (responses of ${t.is_response_for})` : t.slug,
          h("span", { "data-availability": t.availability === true ? "online" : t.availability === false ? "offline" : "unknown" },
            availability(t.availability), t.availability === true ? "online" : t.availability === false ? "offline" : "unknown"),
          when(t.last_ping), when(t.last_pong), String(t.connected_consumers), String(t.stored_count), String(t.pending_count), t.is_public ? "yes" : "no"]),
        "No topics you may see."));
  }

  async function jobsView() {
    const jobs = await getJSON("api/inference/jobs/?limit=200");
    main.replaceChildren(h("h1", {}, "Inference jobs"),
      table(`Your ${jobs.length} most recent inference job${jobs.length === 1 ? "" : "s"}`,
        ["Job", "Status", "Model", "Submitted", "Started", "Finished", "#Attempts", "Error"],
        jobs.map((j) => [shortId(j.id), j.status, j.model_id ? shortId(j.model_id) : "—", when(j.created_at), when(j.started_at),
          when(j.finished_at), String(j.attempts), j.error ? `${j.error.code}: ${j.error.detail}` : "—"]),
        "No inference jobs: submit one with POST /api/inference/jobs/."));
  }

  route();
})();
