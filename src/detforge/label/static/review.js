// detforge review page: vanilla JS, no build step, no network beyond this server.
"use strict";
(function () {
  const TOKEN = "__TOKEN__";
  const PAGE = 120;
  const ZOOMS = [0, 2, 4]; // 0 = fit
  const PALETTE = ["#ff4d4d", "#4da6ff", "#4dff88", "#ffd24d", "#d24dff", "#4dfff0", "#ff9f4d", "#b3ff4d",
                   "#ff4dc4", "#9f9fff", "#ffffff", "#c08040"];
  const COLOUR_WORDS = { red: "#ff4d4d", blue: "#4da6ff", green: "#4dff88", yellow: "#ffd24d",
                         purple: "#d24dff", orange: "#ff9f4d", pink: "#ff4dc4", white: "#ffffff", brown: "#c08040" };
  const $ = (id) => document.getElementById(id);
  const S = { items: [], decisions: {}, progress: {}, list: [], cursor: 0, view: "grid", zoom: 0,
              colours: {}, predictions: false, showPred: true };

  function api(path) { return path + (path.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(TOKEN); }
  function esc(text) { return String(text).replace(/[&<>"']/g, (c) => "&#" + c.charCodeAt(0) + ";"); }
  function toast(text) { const t = $("toast"); t.textContent = text; t.hidden = false;
    clearTimeout(toast.timer); toast.timer = setTimeout(() => { t.hidden = true; }, 4000); }
  function decisionOf(item) { const d = S.decisions[item.id]; return d ? d.decision : ""; }

  async function load() {
    const response = await fetch(api("/api/items"), { headers: { "X-Detforge-Token": TOKEN } });
    if (!response.ok) { $("progress-text").textContent = "cannot load: " + response.status; return; }
    const data = await response.json();
    S.items = data.items; S.decisions = data.decisions; S.progress = data.progress;
    S.predictions = data.predictions;
    $("discard-path").textContent = data.discard;
    $("export").href = api("/api/discard");
    const classes = new Set(), jobs = new Set();
    for (const item of S.items) {
      jobs.add(item.job);
      for (const b of item.boxes) classes.add(b[4]);
      for (const p of item.pred || []) classes.add(p[0]);
    }
    // a class named after a colour ("blue box") gets that colour when no other class took it yet
    const used = new Set();
    for (const name of [...classes].sort()) {
      const word = Object.keys(COLOUR_WORDS).find((w) => new RegExp("\\b" + w + "\\b", "i").test(name));
      if (word && !used.has(COLOUR_WORDS[word])) { S.colours[name] = COLOUR_WORDS[word]; used.add(S.colours[name]); }
    }
    let next = 0;
    for (const name of [...classes].sort()) {
      if (S.colours[name]) continue;
      const free = PALETTE.filter((c) => !used.has(c));
      S.colours[name] = free.length ? free[0] : PALETTE[next++ % PALETTE.length];
      used.add(S.colours[name]);
    }
    for (const job of [...jobs].sort()) $("f-job").add(new Option(job, job));
    for (const name of [...classes].sort()) $("f-class").add(new Option(name, name));
    $("pred-filters").hidden = !S.predictions;
    if (S.predictions) $("f-sort").value = "suspicion";
    restoreFilters();
    applyFilters();
    showProgress();
  }

  // ------------------------------------------------------------------ filters
  const FILTER_IDS = ["f-job", "f-class", "f-status", "f-empty", "f-min", "f-max", "f-tiny", "f-edge",
                      "f-disagree", "f-sort"];
  function saveFilters() {
    const values = {};
    for (const id of FILTER_IDS) { const el = $(id); values[id] = el.type === "checkbox" ? el.checked : el.value; }
    location.hash = encodeURIComponent(JSON.stringify(values));
  }
  function restoreFilters() {
    try {
      const values = JSON.parse(decodeURIComponent(location.hash.slice(1)) || "{}");
      for (const [id, v] of Object.entries(values)) {
        const el = $(id); if (!el) continue;
        if (el.type === "checkbox") el.checked = !!v; else el.value = v;
      }
    } catch (e) { /* a hand-edited hash: keep the defaults */ }
  }
  function applyFilters() {
    const job = $("f-job").value, cls = $("f-class").value, status = $("f-status").value;
    const empty = $("f-empty").value, tiny = $("f-tiny").checked, edge = $("f-edge").checked;
    const min = $("f-min").value === "" ? -1 : +$("f-min").value;
    const max = $("f-max").value === "" ? Infinity : +$("f-max").value;
    const dis = S.predictions ? $("f-disagree").value : "";
    const currentId = S.list.length ? S.list[S.cursor].i : -1;
    S.list = S.items.filter((it) => {
      const n = it.boxes.length, d = decisionOf(it);
      if (job && it.job !== job) return false;
      if (cls && !it.boxes.some((b) => b[4] === cls) && !(it.pred || []).some((p) => p[0] === cls)) return false;
      if (status === "unreviewed" && d) return false;
      if ((status === "reject" || status === "keep") && d !== status) return false;
      if (empty === "empty" && n) return false;
      if (empty === "nonempty" && !n) return false;
      if (n < min || n > max) return false;
      if (tiny && !it.tiny) return false;
      if (edge && !it.edge) return false;
      if (dis === "any" && !(it.missed || it.extra || it.lowiou)) return false;
      if (dis && dis !== "any" && !it[dis]) return false;
      return true;
    });
    const sort = $("f-sort").value;
    if (sort === "suspicion") S.list.sort((a, b) => (b.suspicion - a.suspicion) || (a.i - b.i));
    if (sort === "boxes") S.list.sort((a, b) => (b.boxes.length - a.boxes.length) || (a.i - b.i));
    const keep = S.list.findIndex((it) => it.i === currentId);
    S.cursor = keep >= 0 ? keep : 0;
    $("match-count").textContent = S.list.length + " of " + S.items.length + " images match";
    render();
  }

  // ------------------------------------------------------------------ drawing
  function boxesSvg(item, { labels, scale }) {
    const parts = [];
    const font = 13 / scale, stroke = 2;
    const drawPred = S.predictions && S.showPred && labels;
    for (const p of drawPred ? item.pred || [] : []) {
      const [name, score, x1, y1, x2, y2] = p;
      parts.push(`<rect x="${x1}" y="${y1}" width="${x2 - x1}" height="${y2 - y1}" fill="none"
        stroke="${S.colours[name] || "#fff"}" stroke-width="${stroke}" stroke-dasharray="6 4"
        vector-effect="non-scaling-stroke" opacity="0.8"/>`);
      parts.push(`<text x="${x1 + 2 / scale}" y="${y2 - 3 / scale}" font-size="${font}" fill="${S.colours[name]}"
        stroke="#000" stroke-width="${3 / scale}" paint-order="stroke">${esc(name)} ${score.toFixed(2)}</text>`);
    }
    for (const b of item.boxes) {
      const [x1, y1, x2, y2, name] = b, colour = S.colours[name] || "#fff";
      parts.push(`<rect x="${x1}" y="${y1}" width="${x2 - x1}" height="${y2 - y1}" fill="none"
        stroke="${colour}" stroke-width="${stroke}" vector-effect="non-scaling-stroke"/>`);
      if (labels) {
        const ty = y1 - 4 / scale > font ? y1 - 4 / scale : y1 + font + 2 / scale;
        parts.push(`<text x="${x1}" y="${ty}" font-size="${font}" font-weight="bold" fill="${colour}"
          stroke="#000" stroke-width="${3 / scale}" paint-order="stroke">${esc(name)}</text>`);
      }
    }
    return parts.join("");
  }

  function render() { if (S.view === "grid") renderGrid(); else renderSingle(); }

  function renderGrid() {
    $("grid-view").hidden = false; $("single-view").hidden = true;
    const pages = Math.max(1, Math.ceil(S.list.length / PAGE)), page = Math.floor(S.cursor / PAGE);
    $("page-text").textContent = `page ${page + 1} / ${pages}`;
    const html = [];
    S.list.slice(page * PAGE, (page + 1) * PAGE).forEach((it, k) => {
      const pos = page * PAGE + k, d = decisionOf(it);
      const badges = (it.boxes.length ? "" : '<span class="badge">empty</span>') +
        (it.tiny ? '<span class="badge">tiny</span>' : "") + (it.edge ? '<span class="badge">edge</span>' : "") +
        (it.missed ? `<span class="badge">missed ${it.missed}</span>` : "") +
        (it.extra ? `<span class="badge">extra ${it.extra}</span>` : "") +
        (it.lowiou ? `<span class="badge">low IoU ${it.lowiou}</span>` : "");
      html.push(`<div class="tile ${d} ${pos === S.cursor ? "cursor" : ""}" data-pos="${pos}" data-id="${esc(it.id)}">
        <div class="thumb"><img loading="lazy" src="${api("/api/image/" + it.i + "?size=thumb")}" alt="">
        <svg viewBox="0 0 ${it.w} ${it.h}" preserveAspectRatio="xMidYMid meet">${boxesSvg(it, { labels: false, scale: 1 })}</svg></div>
        <div class="caption" title="${esc(it.name)}">${esc(it.id)}</div>
        <div class="badges">${it.boxes.length} box${it.boxes.length === 1 ? "" : "es"}${badges}</div></div>`);
    });
    $("grid").innerHTML = html.join("");
    const cur = $("grid").querySelector(".tile.cursor");
    if (cur) cur.scrollIntoView({ block: "nearest" });
  }

  function renderSingle() {
    $("grid-view").hidden = true; $("single-view").hidden = false;
    const it = S.list[S.cursor];
    if (!it) { $("current-id").textContent = "(no image matches the filters)"; $("details").innerHTML = "";
      $("photo").removeAttribute("src"); $("overlay").innerHTML = ""; return; }
    const d = S.decisions[it.id];
    $("position").textContent = `${S.cursor + 1} / ${S.list.length}`;
    $("current-id").textContent = it.id;
    $("current-status").className = "status " + (d ? d.decision : "");
    $("current-status").textContent = d ? (d.decision === "reject" ? "REJECTED" : "kept") +
      (d.reason ? " — " + d.reason : "") : "not reviewed";
    $("reason").value = d && d.reason ? d.reason : "";
    const stage = $("stage");
    const fit = Math.min((stage.clientWidth - 8) / it.w, (stage.clientHeight - 8) / it.h, 4);
    const scale = S.zoom ? Math.max(fit, 0.01) * S.zoom : Math.max(fit, 0.01);
    $("zoom-text").textContent = S.zoom ? S.zoom + "×" : "fit";
    const wrap = $("canvas-wrap");
    wrap.style.width = it.w * scale + "px"; wrap.style.height = it.h * scale + "px";
    const photo = $("photo");
    photo.style.width = it.w * scale + "px"; photo.style.height = it.h * scale + "px";
    const src = api("/api/image/" + it.i);
    if (photo.getAttribute("src") !== src) photo.src = src;
    const svg = $("overlay");
    svg.setAttribute("viewBox", `0 0 ${it.w} ${it.h}`);
    svg.innerHTML = boxesSvg(it, { labels: true, scale });
    const counts = {};
    for (const b of it.boxes) counts[b[4]] = (counts[b[4]] || 0) + 1;
    const classes = Object.entries(counts).map(([n, c]) =>
      `<span style="color:${S.colours[n]}">■</span> ${esc(n)} × ${c}`).join(", ") || "no boxes";
    let text = `<b>${esc(it.name)}</b> · job ${esc(it.job)} · ${it.w}×${it.h} · ${classes}`;
    if (it.tiny) text += ` · ${it.tiny} tiny`;
    if (it.edge) text += ` · ${it.edge} at the edge`;
    if (it.pred) text += ` · model: ${it.pred.length} boxes, ${it.missed} missed, ${it.extra} extra, ` +
      `${it.lowiou} low IoU (dashed = prediction)`;
    $("details").innerHTML = text;
    // warm the cache for the next image so paging feels instant
    const next = S.list[S.cursor + 1];
    if (next) { const pre = new Image(); pre.src = api("/api/image/" + next.i); }
  }

  function showProgress() {
    const p = S.progress;
    $("progress-text").textContent = `reviewed ${p.reviewed} / ${p.total} · rejected ${p.rejected}`;
    $("progress-bar").style.width = (p.total ? 100 * p.reviewed / p.total : 0) + "%";
  }

  // ------------------------------------------------------------------ actions
  function move(delta) {
    if (!S.list.length) return;
    S.cursor = Math.min(S.list.length - 1, Math.max(0, S.cursor + delta));
    render();
  }
  function gridColumns() {
    const tiles = $("grid").querySelectorAll(".tile");
    if (tiles.length < 2) return 1;
    const top = tiles[0].offsetTop; let n = 0;
    for (const t of tiles) { if (t.offsetTop !== top) break; n++; }
    return Math.max(1, n);
  }
  async function decide(decision) {
    const it = S.list[S.cursor];
    if (!it) return;
    const reason = decision === "reject" ? $("reason").value.trim() : "";
    try {
      const response = await fetch(api("/api/decide"), {
        method: "POST", headers: { "Content-Type": "application/json", "X-Detforge-Token": TOKEN },
        body: JSON.stringify({ id: it.id, decision, reason }) });
      const data = await response.json();
      if (!response.ok) { toast("not saved: " + (data.error || response.status)); return; }
      if (decision === "clear") delete S.decisions[it.id]; else S.decisions[it.id] = data.decisions[it.id];
      S.progress = data.progress;
      showProgress();
    } catch (e) { toast("not saved: the server does not answer"); return; }
    $("reason").blur();
    if (decision !== "clear" && S.view === "single" && S.cursor < S.list.length - 1) S.cursor++;
    render();
  }
  function toggleView() { S.view = S.view === "grid" ? "single" : "grid"; render(); }

  document.addEventListener("keydown", (ev) => {
    const tag = (ev.target.tagName || "").toLowerCase();
    if (ev.target.id === "reason") {
      if (ev.key === "Enter") { ev.preventDefault(); decide("reject"); }
      if (ev.key === "Escape") ev.target.blur();
      return;
    }
    if (tag === "input" || tag === "select" || tag === "textarea") return;
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (!$("help").hidden) { if (ev.key === "Escape" || ev.key === "?") $("help").hidden = true; return; }
    const grid = S.view === "grid";
    switch (ev.key) {
      case "ArrowRight": case "j": move(1); break;
      case "ArrowLeft": case "k": move(-1); break;
      case "ArrowDown": if (grid) move(gridColumns()); else return; break;
      case "ArrowUp": if (grid) move(-gridColumns()); else return; break;
      case "r": decide("reject"); break;
      case "a": decide("keep"); break;
      case "u": decide("clear"); break;
      case "e": if (grid) toggleView(); $("reason").focus(); break;
      case "z": S.zoom = ZOOMS[(ZOOMS.indexOf(S.zoom) + 1) % ZOOMS.length]; if (!grid) render(); break;
      case "g": toggleView(); break;
      case "Enter": if (grid) toggleView(); else return; break;
      case "Escape": if (!grid) toggleView(); else return; break;
      case "p": S.showPred = !S.showPred; $("f-showpred").checked = S.showPred; render(); break;
      case "?": $("help").hidden = false; break;
      default: return;
    }
    ev.preventDefault();
  });

  $("grid").addEventListener("click", (ev) => {
    const tile = ev.target.closest(".tile"); if (!tile) return;
    S.cursor = +tile.dataset.pos;
    if (ev.detail >= 2) toggleView(); else render();
  });
  for (const id of FILTER_IDS) $(id).addEventListener("change", () => { saveFilters(); applyFilters(); });
  $("f-showpred").addEventListener("change", () => { S.showPred = $("f-showpred").checked; render(); });
  $("toggle-view").addEventListener("click", toggleView);
  $("show-help").addEventListener("click", () => { $("help").hidden = false; });
  $("help").addEventListener("click", () => { $("help").hidden = true; });
  $("btn-reject").addEventListener("click", () => decide("reject"));
  $("btn-keep").addEventListener("click", () => decide("keep"));
  $("btn-clear").addEventListener("click", () => decide("clear"));
  $("btn-zoom").addEventListener("click", () => { S.zoom = ZOOMS[(ZOOMS.indexOf(S.zoom) + 1) % ZOOMS.length]; render(); });
  $("prev-page").addEventListener("click", () => move(-PAGE));
  $("next-page").addEventListener("click", () => move(PAGE));
  window.addEventListener("resize", () => { if (S.view === "single") render(); });
  window.__review = S; // for tests and the curious
  load();
})();
