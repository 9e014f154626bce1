// detforge label page: vanilla JS, no build step, no network beyond this server.
// Boxes are [x1, y1, x2, y2, class_id, score|null] in image pixels; score null = drawn or changed by a person.
"use strict";
(function () {
  const TOKEN = "__TOKEN__";
  const PAGE = 100;          // items per /api/items request
  const HANDLE = 6;          // half size of a resize handle, screen pixels
  const MIN_BOX = 2;         // a drawn box smaller than this (image pixels) is a click, not a box
  const HIDE_IOU = 0.7;      // a proposal this close to a box is already taken
  const PALETTE = ["#ff4d4d", "#4da6ff", "#4dff88", "#ffd24d", "#d24dff", "#4dfff0", "#ff9f4d", "#b3ff4d",
                   "#ff4dc4", "#9f9fff", "#ffffff", "#c08040"];
  const COLOUR_WORDS = { red: "#ff4d4d", blue: "#4da6ff", green: "#4dff88", yellow: "#ffd24d",
                         purple: "#d24dff", orange: "#ff9f4d", pink: "#ff4dc4", white: "#ffffff", brown: "#c08040" };
  const $ = (id) => document.getElementById(id);
  const canvas = $("canvas"), ctx = canvas.getContext("2d");
  const S = {
    job: null, classes: [], names: {}, colours: {}, cls: 0, pos: 0, item: null, boxes: [], selected: -1,
    image: null, view: { scale: 1, ox: 0, oy: 0 }, fitted: true, threshold: 0.5, showProps: true,
    drag: null, mouse: null, space: false, pages: new Map(), history: new Map(), saving: null, pending: null,
    loadSeq: 0,
  };

  function api(path) { return path + (path.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(TOKEN); }
  function toast(text) { const t = $("toast"); t.textContent = text; t.hidden = false;
    clearTimeout(toast.timer); toast.timer = setTimeout(() => { t.hidden = true; }, 5000); }
  async function getJSON(path) {
    const response = await fetch(api(path), { headers: { "X-Detforge-Token": TOKEN } });
    const data = await response.json();
    if (!response.ok) throw new Error(data.error || String(response.status));
    return data;
  }

  // ------------------------------------------------------------------ job, pages, items
  async function start() {
    const job = await getJSON("/api/job");
    S.job = job; S.classes = job.classes; S.threshold = job.threshold;
    for (const [cid, name] of job.classes) S.names[cid] = name;
    assignColours();
    S.cls = job.classes.length ? job.classes[0][0] : 0;
    $("job-name").textContent = job.job + (job.adjust ? " (adjusting " + job.attribute.replace(/^adjusted-/, "") + ")" : "");
    $("out-path").textContent = "saving to " + job.out + " as " + job.attribute;
    if (job.model) {
      $("threshold-box").hidden = false; $("btn-accept").hidden = false;
      $("threshold").min = job.floor; $("threshold").value = job.threshold; showThreshold();
    }
    $("goto").max = job.total;
    renderClasses(); showProgress(job.progress);
    await go(job.start);
  }

  function assignColours() {
    const used = new Set();
    for (const [, name] of S.classes) {
      const word = Object.keys(COLOUR_WORDS).find((w) => new RegExp("\\b" + w + "\\b", "i").test(name));
      if (word && !used.has(COLOUR_WORDS[word])) { S.colours[name] = COLOUR_WORDS[word]; used.add(COLOUR_WORDS[word]); }
    }
    let next = 0;
    for (const [, name] of S.classes) {
      if (S.colours[name]) continue;
      const free = PALETTE.filter((c) => !used.has(c));
      S.colours[name] = free.length ? free[0] : PALETTE[next++ % PALETTE.length];
      used.add(S.colours[name]);
    }
  }
  function colour(cid) { return S.colours[S.names[cid]] || "#ffffff"; }

  async function summaryAt(pos) {
    const page = Math.floor(pos / PAGE);
    if (!S.pages.has(page)) {
      const data = await getJSON(`/api/items?offset=${page * PAGE}&limit=${PAGE}`);
      S.pages.set(page, data.items);
    }
    return S.pages.get(page)[pos - page * PAGE];
  }
  function cacheSummary(summary) {
    const page = S.pages.get(Math.floor(summary.pos / PAGE));
    if (page) page[summary.pos % PAGE] = summary;
  }

  async function go(pos) {
    if (!S.job || pos < 0 || pos >= S.job.total) return;
    const seq = ++S.loadSeq;
    let item = null, image = null;
    try {
      const summary = await summaryAt(pos);
      item = await getJSON(`/api/item/${summary.i}`);
      image = new Image();
      image.src = api(`/api/image/${item.i}`);
      await image.decode();
    } catch (error) {
      if (seq !== S.loadSeq) return;
      // an image that cannot be read: nothing to edit here, but → and ← still move on
      S.pos = pos; S.item = null; S.boxes = []; S.selected = -1; S.image = null; S.drag = null;
      toast(`cannot open #${pos + 1}: ${error.message || "the image does not decode"}`);
      render(); $("position").textContent = `#${pos + 1} of ${S.job.total}`;
      $("current-name").textContent = "(cannot be read)"; renderStrip();
      return;
    }
    if (seq !== S.loadSeq) return; // a later navigation won
    S.pos = pos; S.item = item; S.boxes = item.boxes.map((b) => b.slice()); S.selected = -1; S.image = image;
    S.drag = null;
    fit(); render(); showItem(); renderStrip();
    prefetch(pos + 1);
  }
  // the next image into the browser's cache while this one is labeled (the server allows an hour)
  async function prefetch(pos) {
    if (pos >= S.job.total) return;
    try { const next = await summaryAt(pos); new Image().src = api(`/api/image/${next.i}`); } catch (e) { /* later */ }
  }

  // ------------------------------------------------------------------ saving
  function history() {
    const key = S.item.i;
    if (!S.history.has(key)) S.history.set(key, { undo: [], redo: [] });
    return S.history.get(key);
  }
  function commit(before) {
    const h = history();
    h.undo.push(before); h.redo = [];
    save();
  }
  function snapshot() { return S.boxes.map((b) => b.slice()); }
  function undo() { const h = history(); if (!h.undo.length) return;
    h.redo.push(snapshot()); S.boxes = h.undo.pop(); S.selected = -1; save(); }
  function redo() { const h = history(); if (!h.redo.length) return;
    h.undo.push(snapshot()); S.boxes = h.redo.pop(); S.selected = -1; save(); }

  // One request in flight; a change made meanwhile is sent after it (the latest state wins).
  function save(done = true) {
    render(); showItem();
    S.pending = { i: S.item.i, body: JSON.stringify({ boxes: S.boxes, done }) };
    S.item.boxes = snapshot(); S.item.done = S.item.done || done;
    if (!S.saving) flush();
  }
  async function flush() {
    while (S.pending) {
      const { i, body } = S.pending; S.pending = null;
      $("save-state").className = "saving"; $("save-state").textContent = "saving…";
      S.saving = fetch(api(`/api/item/${i}`), { method: "POST", body,
        headers: { "Content-Type": "application/json", "X-Detforge-Token": TOKEN } });
      try {
        const response = await S.saving;
        const data = await response.json();
        if (!response.ok) throw new Error(data.error || String(response.status));
        cacheSummary(data.item); showProgress(data.progress); renderStrip();
        $("save-state").className = "saved"; $("save-state").textContent = "saved";
      } catch (error) {
        $("save-state").className = "failed"; $("save-state").textContent = "NOT saved";
        toast("could not save: " + error.message);
      }
      S.saving = null;
    }
  }

  // ------------------------------------------------------------------ geometry
  function toScreen(x, y) { return [S.view.ox + x * S.view.scale, S.view.oy + y * S.view.scale]; }
  function toImage(sx, sy) { return [(sx - S.view.ox) / S.view.scale, (sy - S.view.oy) / S.view.scale]; }
  function clampX(x) { return Math.min(Math.max(x, 0), S.item.w); }
  function clampY(y) { return Math.min(Math.max(y, 0), S.item.h); }
  function iou(a, b) {
    const w = Math.min(a[2], b[2]) - Math.max(a[0], b[0]), h = Math.min(a[3], b[3]) - Math.max(a[1], b[1]);
    if (w <= 0 || h <= 0) return 0;
    const inter = w * h, area = (r) => (r[2] - r[0]) * (r[3] - r[1]);
    return inter / (area(a) + area(b) - inter);
  }
  function visibleProposals() {
    if (!S.item || !S.showProps) return [];
    return S.item.proposals.filter((p) => p[5] >= S.threshold && !S.boxes.some((b) => iou(b, p) >= HIDE_IOU));
  }
  function fit() {
    const W = canvas.clientWidth, H = canvas.clientHeight;
    if (!S.item) return;
    const scale = Math.min(W / S.item.w, H / S.item.h) * 0.96;
    S.view = { scale, ox: (W - S.item.w * scale) / 2, oy: (H - S.item.h * scale) / 2 }; S.fitted = true;
  }
  function zoomAt(factor, sx, sy) {
    const scale = Math.min(Math.max(S.view.scale * factor, 0.05), 64);
    const f = scale / S.view.scale;
    S.view = { scale, ox: sx - (sx - S.view.ox) * f, oy: sy - (sy - S.view.oy) * f }; S.fitted = false;
    render();
  }
  function handles(box) {
    const [x1, y1] = toScreen(box[0], box[1]), [x2, y2] = toScreen(box[2], box[3]);
    const mx = (x1 + x2) / 2, my = (y1 + y2) / 2;
    return { nw: [x1, y1], n: [mx, y1], ne: [x2, y1], e: [x2, my], se: [x2, y2], s: [mx, y2], sw: [x1, y2], w: [x1, my] };
  }
  function hit(sx, sy) {
    if (S.selected >= 0) {
      for (const [name, [hx, hy]] of Object.entries(handles(S.boxes[S.selected]))) {
        if (Math.abs(sx - hx) <= HANDLE + 2 && Math.abs(sy - hy) <= HANDLE + 2) return { kind: "handle", name };
      }
    }
    const [x, y] = toImage(sx, sy);
    let best = -1, bestArea = Infinity;
    S.boxes.forEach((b, k) => {
      const area = (b[2] - b[0]) * (b[3] - b[1]);
      if (x >= b[0] && x <= b[2] && y >= b[1] && y <= b[3] && area < bestArea) { best = k; bestArea = area; }
    });
    if (best >= 0) return { kind: "box", index: best };
    const props = visibleProposals().filter((p) => x >= p[0] && x <= p[2] && y >= p[1] && y <= p[3]);
    if (props.length) return { kind: "proposal", proposal: props[props.length - 1] };
    return { kind: "none" };
  }

  // ------------------------------------------------------------------ drawing
  function render() {
    const dpr = window.devicePixelRatio || 1, W = canvas.clientWidth, H = canvas.clientHeight;
    if (canvas.width !== Math.round(W * dpr) || canvas.height !== Math.round(H * dpr)) {
      canvas.width = Math.round(W * dpr); canvas.height = Math.round(H * dpr);
    }
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, W, H);
    if (!S.item || !S.image) return;
    const { scale, ox, oy } = S.view;
    ctx.imageSmoothingEnabled = scale < 3;
    ctx.drawImage(S.image, ox, oy, S.item.w * scale, S.item.h * scale);
    ctx.font = "12px system-ui, sans-serif"; ctx.lineJoin = "round";
    for (const p of visibleProposals()) drawBox(p, { dashed: true, label: `${S.names[p[4]]} ${p[5].toFixed(2)}?` });
    S.boxes.forEach((b, k) => drawBox(b, { selected: k === S.selected,
      label: S.names[b[4]] + (b[5] === null ? "" : ` ${b[5].toFixed(2)}`) }));
    if (S.drag && S.drag.kind === "draw" && S.drag.box) drawBox([...S.drag.box, S.cls, null], { selected: true, label: "" });
    if (S.mouse && !S.drag) {
      ctx.save(); ctx.strokeStyle = "rgba(255,255,255,0.55)"; ctx.lineWidth = 1; ctx.setLineDash([4, 4]);
      ctx.beginPath(); ctx.moveTo(0, S.mouse[1] + 0.5); ctx.lineTo(W, S.mouse[1] + 0.5);
      ctx.moveTo(S.mouse[0] + 0.5, 0); ctx.lineTo(S.mouse[0] + 0.5, H); ctx.stroke(); ctx.restore();
    }
    $("zoom-text").textContent = Math.round(scale * 100) + "%";
  }
  function drawBox(b, { dashed = false, selected = false, label = "" }) {
    const [x1, y1] = toScreen(b[0], b[1]), [x2, y2] = toScreen(b[2], b[3]);
    ctx.save();
    if (dashed) { ctx.setLineDash([6, 4]); ctx.globalAlpha = 0.9; }
    if (selected) { ctx.fillStyle = colour(b[4]) + "33"; ctx.fillRect(x1, y1, x2 - x1, y2 - y1); }
    // a dark rim first, so that a box stays visible on an object of its own colour
    ctx.strokeStyle = "rgba(0,0,0,0.75)"; ctx.lineWidth = selected ? 5 : 4;
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    ctx.strokeStyle = colour(b[4]); ctx.lineWidth = selected ? 3 : 2;
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    ctx.setLineDash([]);
    if (label) {
      ctx.fillStyle = colour(b[4]); ctx.strokeStyle = "#000"; ctx.lineWidth = 3;
      const ty = y1 > 16 ? y1 - 4 : y2 + 13;
      ctx.strokeText(label, x1 + 1, ty); ctx.fillText(label, x1 + 1, ty);
    }
    if (selected && !dashed) {
      ctx.fillStyle = "#fff"; ctx.strokeStyle = "#000"; ctx.lineWidth = 1;
      for (const [hx, hy] of Object.values(handles(b))) {
        ctx.fillRect(hx - HANDLE / 2 - 1, hy - HANDLE / 2 - 1, HANDLE + 2, HANDLE + 2);
        ctx.strokeRect(hx - HANDLE / 2 - 1, hy - HANDLE / 2 - 1, HANDLE + 2, HANDLE + 2);
      }
    }
    ctx.restore();
  }

  function renderClasses() {
    const list = $("classes"); list.innerHTML = "";
    S.classes.forEach(([cid, name], k) => {
      const li = document.createElement("li");
      li.dataset.cid = cid; li.className = cid === S.cls ? "current" : "";
      li.innerHTML = `<span class="key">${k < 9 ? k + 1 : ""}</span><span class="swatch"></span><span class="name"></span>`;
      li.querySelector(".swatch").style.background = colour(cid);
      li.querySelector(".name").textContent = name;
      li.addEventListener("click", () => chooseClass(cid));
      list.appendChild(li);
    });
  }
  function showProgress(p) {
    $("progress-text").textContent = `done ${p.done} / ${p.total}`;
    $("progress-bar").style.width = (p.total ? (100 * p.done) / p.total : 0) + "%";
    S.job.progress = p;
  }
  function showItem() {
    if (!S.item) return;
    $("position").textContent = `#${S.pos + 1} of ${S.job.total}`;
    $("current-name").textContent = S.item.name;
    $("current-status").textContent = S.item.done ? "done" : "not done";
    $("current-status").className = "status" + (S.item.done ? " done" : "");
    $("box-count").textContent = `${S.boxes.length} box${S.boxes.length === 1 ? "" : "es"}`;
    $("uncertainty").hidden = !S.job.model;
    $("uncertainty").textContent = `model: ${S.item.proposals.length} proposals, uncertainty ${S.item.uncertainty.toFixed(2)}`;
  }
  function showThreshold() { $("threshold-text").textContent = S.threshold.toFixed(2); }

  async function renderStrip() {
    const count = Math.max(1, Math.floor($("thumbs").clientWidth / 102));
    const first = Math.max(0, Math.min(S.pos - Math.floor(count / 2), S.job.total - count));
    const seq = S.loadSeq, tiles = [];
    for (let pos = first; pos < Math.min(first + count, S.job.total); pos++) tiles.push(await summaryAt(pos));
    if (seq !== S.loadSeq) return;
    const box = $("thumbs"); box.innerHTML = "";
    for (const t of tiles) {
      const div = document.createElement("div");
      div.className = "thumb" + (t.done ? " done" : "") + (t.pos === S.pos ? " current" : "");
      div.dataset.pos = t.pos; div.title = t.name;
      div.innerHTML = `<img alt="" loading="lazy"><span>${t.pos + 1}${t.done ? " ✓" : ""}</span>`;
      div.querySelector("img").src = api(`/api/image/${t.i}?size=thumb`);
      div.addEventListener("click", () => go(t.pos));
      box.appendChild(div);
    }
  }

  // ------------------------------------------------------------------ actions
  function chooseClass(cid) {
    S.cls = cid; renderClasses();
    if (S.selected >= 0 && S.boxes[S.selected][4] !== cid) {
      const before = snapshot();
      S.boxes[S.selected][4] = cid; S.boxes[S.selected][5] = null;
      commit(before);
    }
  }
  function deleteSelected() {
    if (S.selected < 0) return;
    const before = snapshot(); S.boxes.splice(S.selected, 1); S.selected = -1; commit(before);
  }
  function acceptAll() {
    const props = visibleProposals(); if (!props.length) return;
    const before = snapshot(); for (const p of props) S.boxes.push(p.slice()); commit(before);
  }
  const NUDGE = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
  function nudge([dx, dy]) {
    const b = S.boxes[S.selected], w = b[2] - b[0], h = b[3] - b[1];
    const nx = Math.min(Math.max(b[0] + dx, 0), S.item.w - w), ny = Math.min(Math.max(b[1] + dy, 0), S.item.h - h);
    if (nx === b[0] && ny === b[1]) return;
    const before = snapshot(); S.boxes[S.selected] = [nx, ny, nx + w, ny + h, b[4], null]; commit(before);
  }
  async function copyPrevious() {
    if (S.pos === 0) { toast("no previous image"); return; }
    const summary = await summaryAt(S.pos - 1);
    const previous = await getJSON(`/api/item/${summary.i}`);
    const boxes = previous.boxes.map((b) => [clampX(b[0]), clampY(b[1]), clampX(b[2]), clampY(b[3]), b[4], null])
      .filter((b) => b[2] - b[0] >= 1 && b[3] - b[1] >= 1);
    if (!boxes.length) { toast("the previous image has no boxes"); return; }
    const before = snapshot(); S.boxes.push(...boxes); commit(before);
  }
  async function markDone() {
    if (!S.item) return;
    save(true);
    const data = await getJSON(`/api/next?from=${S.pos + 1}`);
    const next = data.pos === null ? (await getJSON(`/api/next?from=0`)).pos : data.pos;
    if (next === null) { toast("every image is done"); showItem(); return; }
    await go(next);
  }

  // ------------------------------------------------------------------ mouse
  function local(event) { const r = canvas.getBoundingClientRect(); return [event.clientX - r.left, event.clientY - r.top]; }
  canvas.addEventListener("contextmenu", (e) => e.preventDefault());
  canvas.addEventListener("mousedown", (event) => {
    if (!S.item) return;
    const [sx, sy] = local(event);
    if (event.button === 2 || event.button === 1 || S.space) {
      S.drag = { kind: "pan", sx, sy, ox: S.view.ox, oy: S.view.oy }; canvas.className = "pan"; return;
    }
    if (event.button !== 0) return;
    const found = hit(sx, sy), [x, y] = toImage(sx, sy);
    if (found.kind === "handle") {
      S.drag = { kind: "resize", handle: found.name, before: snapshot(), moved: false };
    } else if (found.kind === "box") {
      S.selected = found.index;
      S.drag = { kind: "move", x, y, before: snapshot(), orig: S.boxes[found.index].slice(), moved: false };
      canvas.className = "move";
    } else if (found.kind === "proposal") {
      const before = snapshot();
      S.boxes.push(found.proposal.slice()); S.selected = S.boxes.length - 1; commit(before);
    } else {
      S.selected = -1;
      S.drag = { kind: "draw", x: clampX(x), y: clampY(y), box: null };
    }
    render(); showItem();
  });
  window.addEventListener("mousemove", (event) => {
    if (!S.item) return;
    const [sx, sy] = local(event), [x, y] = toImage(sx, sy);
    const inside = event.target === canvas;
    S.mouse = inside ? [sx, sy] : null;
    const d = S.drag;
    if (!d) { if (inside) { const h = hit(sx, sy); canvas.className = S.space ? "pan" : h.kind === "box" ? "move" : ""; }
      render(); return; }
    if (d.kind === "pan") {
      S.view.ox = d.ox + sx - d.sx; S.view.oy = d.oy + sy - d.sy; S.fitted = false;
    } else if (d.kind === "draw") {
      const cx = clampX(x), cy = clampY(y);
      d.box = [Math.min(d.x, cx), Math.min(d.y, cy), Math.max(d.x, cx), Math.max(d.y, cy)];
    } else if (d.kind === "move") {
      const o = d.orig, w = o[2] - o[0], h = o[3] - o[1];
      const nx = Math.min(Math.max(o[0] + x - d.x, 0), S.item.w - w), ny = Math.min(Math.max(o[1] + y - d.y, 0), S.item.h - h);
      if (nx !== o[0] || ny !== o[1]) {
        S.boxes[S.selected] = [nx, ny, nx + w, ny + h, o[4], null]; d.moved = true;
      }
    } else if (d.kind === "resize") {
      const b = S.boxes[S.selected].slice(), name = d.handle;
      if (name.includes("w")) b[0] = clampX(x);
      if (name.includes("e")) b[2] = clampX(x);
      if (name.startsWith("n")) b[1] = clampY(y);
      if (name.startsWith("s")) b[3] = clampY(y);
      if (b[0] > b[2]) { [b[0], b[2]] = [b[2], b[0]]; d.handle = d.handle.replace(/[we]/, (c) => (c === "w" ? "e" : "w")); }
      if (b[1] > b[3]) { [b[1], b[3]] = [b[3], b[1]]; d.handle = d.handle.replace(/^[ns]/, (c) => (c === "n" ? "s" : "n")); }
      b[5] = null; S.boxes[S.selected] = b; d.moved = true;
    }
    render();
  });
  window.addEventListener("mouseup", () => {
    const d = S.drag; S.drag = null; canvas.className = "";
    if (!d || !S.item) return;
    if (d.kind === "draw" && d.box && d.box[2] - d.box[0] >= MIN_BOX && d.box[3] - d.box[1] >= MIN_BOX) {
      const before = snapshot();
      S.boxes.push([...d.box, S.cls, null]); S.selected = S.boxes.length - 1; commit(before);
    } else if ((d.kind === "move" || d.kind === "resize") && d.moved) {
      const b = S.boxes[S.selected];
      if (b[2] - b[0] < 1 || b[3] - b[1] < 1) { S.boxes = d.before; S.selected = -1; render(); toast("a box needs at least one pixel"); return; }
      commit(d.before);
    }
    render(); showItem();
  });
  canvas.addEventListener("mouseleave", () => { S.mouse = null; render(); });
  canvas.addEventListener("wheel", (event) => {
    event.preventDefault();
    const [sx, sy] = local(event); zoomAt(event.deltaY < 0 ? 1.25 : 0.8, sx, sy);
  }, { passive: false });
  window.addEventListener("resize", () => { if (S.fitted) fit(); render(); renderStrip(); });

  // ------------------------------------------------------------------ keyboard
  document.addEventListener("keydown", (event) => {
    if (event.target.tagName === "INPUT" && event.target.type !== "range") {
      if (event.key === "Enter" && event.target.id === "goto") { go(+event.target.value - 1); event.target.blur(); }
      if (event.key === "Escape") event.target.blur();
      return;
    }
    if (!$("help").hidden) { if (event.key === "Escape" || event.key === "?") $("help").hidden = true; return; }
    const key = event.key, ctrl = event.ctrlKey || event.metaKey;
    if (ctrl && !S.item) return;
    if (ctrl && (key === "z" || key === "Z")) { event.shiftKey ? redo() : undo(); event.preventDefault(); return; }
    if (ctrl && (key === "y" || key === "Y")) { redo(); event.preventDefault(); return; }
    if (ctrl || event.altKey) return;
    if (!S.item && !["ArrowRight", "ArrowLeft", "PageDown", "PageUp", "?"].includes(key)) return;
    if (event.shiftKey && S.selected >= 0 && NUDGE[key]) { nudge(NUDGE[key]); event.preventDefault(); return; }
    if (/^[1-9]$/.test(key)) { const c = S.classes[+key - 1]; if (c) chooseClass(c[0]); return; }
    const W = canvas.clientWidth / 2, H = canvas.clientHeight / 2;
    switch (key) {
      case "ArrowRight": go(S.pos + 1); break;
      case "ArrowLeft": go(S.pos - 1); break;
      case "PageDown": go(Math.min(S.pos + 10, S.job.total - 1)); break;
      case "PageUp": go(Math.max(S.pos - 10, 0)); break;
      case "Enter": markDone(); break;
      case "Delete": case "Backspace": deleteSelected(); break;
      case "Escape": S.selected = -1; render(); break;
      case "Tab": if (S.boxes.length) { S.selected = (S.selected + 1) % S.boxes.length; render(); } break;
      case "c": copyPrevious(); break;
      case "a": acceptAll(); break;
      case "p": S.showProps = !S.showProps; render(); break;
      case "f": fit(); render(); break;
      case "+": case "=": zoomAt(1.25, W, H); break;
      case "-": zoomAt(0.8, W, H); break;
      case "?": $("help").hidden = false; break;
      case " ": S.space = true; canvas.className = "pan"; break;
      default: return;
    }
    event.preventDefault();
  });
  document.addEventListener("keyup", (event) => { if (event.key === " ") { S.space = false; canvas.className = ""; } });

  $("btn-prev").addEventListener("click", () => go(S.pos - 1));
  $("btn-next").addEventListener("click", () => go(S.pos + 1));
  const withItem = (action) => () => { if (S.item) action(); };
  $("btn-done").addEventListener("click", withItem(markDone));
  $("btn-copy").addEventListener("click", withItem(copyPrevious));
  $("btn-accept").addEventListener("click", withItem(acceptAll));
  $("btn-delete").addEventListener("click", withItem(deleteSelected));
  $("btn-undo").addEventListener("click", withItem(undo));
  $("btn-redo").addEventListener("click", withItem(redo));
  $("btn-fit").addEventListener("click", () => { fit(); render(); });
  $("strip-prev").addEventListener("click", () => go(Math.max(S.pos - 10, 0)));
  $("strip-next").addEventListener("click", () => go(Math.min(S.pos + 10, S.job.total - 1)));
  $("show-help").addEventListener("click", () => { $("help").hidden = false; });
  $("threshold").addEventListener("input", () => { S.threshold = +$("threshold").value; showThreshold(); render(); });
  for (const b of document.querySelectorAll("button")) b.addEventListener("mouseup", () => b.blur());

  // for tests and the curious: the state and the image -> page coordinate mapping
  window.detforgeLabel = {
    state: S,
    toPage(x, y) { const r = canvas.getBoundingClientRect(), [sx, sy] = toScreen(x, y); return [r.left + sx, r.top + sy]; },
    idle() { return !S.saving && !S.pending; },
  };
  start().catch((error) => { $("progress-text").textContent = "cannot load: " + error.message; });
})();
