"use strict";
(function () {
  const META = window.SAELAB_META, VOCAB = window.SAELAB_VOCAB || {};
  const $ = (id) => document.getElementById(id);
  if (!META) { $("detail").textContent = "data/meta.js did not load: keep index.html next to its data/ folder."; return; }
  const S = META.summary;
  const LAT = META.latents.map(([id, n, max, top]) => ({ id, n, max, top }));
  const BY_ID = new Map(LAT.map((l, i) => [l.id, l]));
  const RANK = new Map(LAT.map((l, i) => [l.id, i + 1]));  // density rank (the list arrives densest first)
  let current = LAT.slice(), searching = false, selected = null, shown = 0;

  // ---------------------------------------------------------------- helpers (all text goes in via text nodes)
  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v);
    }
    for (const c of kids) if (c !== null && c !== undefined && c !== false) e.append(c);
    return e;
  }
  function svg(tag, attrs, ...kids) {
    const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    for (const c of kids) e.append(c);
    return e;
  }
  const tok = (id) => (Object.prototype.hasOwnProperty.call(VOCAB, id) ? VOCAB[id] : "\u27e8" + id + "\u27e9");
  // In running text spaces stay spaces; line breaks and tabs get visible symbols.
  const visText = (s) => s.replace(/\r\n|\n|\r/g, "\u21b5").replace(/\t/g, "\u21e5");
  // An isolated token also shows its spaces (so " the" and "the" differ) and never renders empty.
  const visTok = (s) => visText(s).replace(/ /g, "\u2423") || "\u2205";
  const fmt = (v) => (v === 0 ? "0" : Math.abs(v) >= 1000 || Math.abs(v) < 0.01 ? v.toExponential(2) : v.toPrecision(3));
  const pct = (n) => { const d = 100 * n / S.n_scanned; return (d >= 0.1 ? d.toFixed(2) : d.toPrecision(2)) + "%"; };
  const pad = (k) => String(k).padStart(4, "0");

  function loadScript(src) {
    return new Promise((resolve, reject) => {
      const s = el("script", { src: src, charset: "utf-8" });
      s.onload = resolve;
      s.onerror = () => reject(new Error("could not load " + src));
      document.head.append(s);
    });
  }
  const shardPromises = {};
  function loadShard(k) {
    if (!shardPromises[k]) {
      shardPromises[k] = loadScript("data/latents_" + pad(k) + ".js").then(() => (window.SAELAB_SHARDS || {})[k]);
    }
    return shardPromises[k];
  }
  let searchIndex = null;
  function loadSearch() {
    if (!searchIndex) searchIndex = loadScript("data/search.js").then(() => window.SAELAB_SEARCH);
    return searchIndex;
  }

  // ---------------------------------------------------------------- header + list
  document.title = S.title + " \u2014 feature browser";
  $("title").textContent = S.title;
  $("summary").textContent = [S.model, S.hook, "d_sae " + S.d_sae, S.activation + (/topk/.test(S.activation) ? " k=" + S.k : ""),
    S.n_scanned.toLocaleString("en") + " tokens scanned", S.n_alive + " latents fire",
    S.n_shown + " shown"].filter(Boolean).join(" \u00b7 ");

  function renderList(items, info, reasons) {
    current = items;
    searching = !!reasons;
    const frag = document.createDocumentFragment();
    for (const l of items) {
      const a = el("a", { href: "#latent=" + l.id },
        el("span", { class: "lid" }, "#" + l.id), el("span", { class: "dens", title: l.n + " tokens" }, pct(l.n)),
        el("span", { class: "chip", title: "top-activating token" }, l.top >= 0 ? visTok(tok(l.top)) : "\u2205"));
      if (reasons && reasons.get(l.id)) a.append(el("span", { class: "why" }, reasons.get(l.id)));
      frag.append(el("li", { "data-id": String(l.id), class: l.id === selected ? "sel" : "" }, a));
    }
    $("latent-list").replaceChildren(frag);
    const infoKids = [el("span", { id: "list-count" }, info || (items.length + " latents"))];
    if (reasons) infoKids.push(el("button", { type: "button", onclick: () => { $("search").value = ""; setHash({}); } }, "clear"));
    $("list-info").replaceChildren(...infoKids);
  }
  function sortedList() {
    const by = $("sort").value, l = LAT.slice();
    if (by === "id") l.sort((a, b) => a.id - b.id);
    else if (by === "max") l.sort((a, b) => b.max - a.max || a.id - b.id);
    return l;  // "density": already densest first
  }
  function markSelected() {
    for (const li of $("latent-list").querySelectorAll("li.sel")) li.classList.remove("sel");
    const li = $("latent-list").querySelector('li[data-id="' + selected + '"]');
    if (li) { li.classList.add("sel"); li.scrollIntoView({ block: "nearest" }); }
  }

  // ---------------------------------------------------------------- detail pane
  let logY = false;
  function histogram(rec) {
    const W = 380, H = 110, padL = 4, padB = 16, nb = rec.hist.length, bw = (W - padL) / nb;
    const top = Math.max(1, ...rec.hist), y = (c) => (logY ? Math.log1p(c) / Math.log1p(top) : c / top);
    const g = svg("svg", { class: "hist", width: W, height: H + 4, viewBox: "0 0 " + W + " " + (H + 4), role: "img",
      "aria-label": "activation histogram" });
    rec.hist.forEach((c, b) => {
      const h = c ? Math.max(1, (H - padB) * y(c)) : 0;
      const lo = rec.max * b / nb, hi = rec.max * (b + 1) / nb;
      g.append(svg("rect", { class: "bar", x: padL + b * bw + 0.5, y: H - padB - h, width: Math.max(1, bw - 1), height: h },
        svg("title", {}, c + " tokens with activation in [" + fmt(lo) + ", " + fmt(hi) + ")")));
    });
    g.append(svg("line", { x1: padL, x2: W, y1: H - padB + 0.5, y2: H - padB + 0.5, stroke: "#9aa4af" }));
    g.append(svg("text", { x: padL, y: H }, "0"));
    g.append(svg("text", { x: W, y: H, "text-anchor": "end" }, fmt(rec.max)));
    g.append(svg("text", { x: W / 2, y: H, "text-anchor": "middle" }, "activation (max count " + top + (logY ? ", log scale)" : ")")));
    const box = el("input", { type: "checkbox", id: "log-y" });
    box.checked = logY;
    box.addEventListener("change", () => { logY = box.checked; wrap.replaceWith(histogram(rec)); });
    const wrap = el("div", { class: "histwrap" }, g, el("label", { class: "muted" }, box, " log-scale counts"));
    return wrap;
  }
  function chips(list, cls) {
    return el("div", { class: "chips" }, ...list.map(([id, v]) =>
      el("span", { class: "chip " + cls, title: JSON.stringify(tok(id)) + " logit " + fmt(v) }, visTok(tok(id)), el("small", {}, fmt(v)))));
  }
  function context(rec, c) {
    const text = el("span", { class: "text" });
    c.t.forEach((id, i) => {
      const a = c.a[i], s = tok(id), alpha = Math.max(0, Math.min(1, a / rec.max));
      const span = el("span", { class: "tok" + (i === c.c ? " hi" : "") + (/^\s+$/.test(s) ? " ws" : ""),
        title: JSON.stringify(s) + "  act " + fmt(a) + (i === c.c ? "  (top activation)" : "") },
        visText(s) || "\u2205");
      if (a > 0) span.style.backgroundColor = "rgba(var(--hi), " + (0.12 + 0.75 * alpha).toFixed(3) + ")";
      text.append(span);
    });
    return el("div", { class: "ctx" }, el("span", { class: "val" }, fmt(c.a[c.c])), text,
      el("span", { class: "src", title: (c.src || "doc " + c.doc) + ", position " + c.pos + ", row " + c.row },
        (c.src || "doc " + c.doc) + " @" + c.pos));
  }
  function renderDetail(rec) {
    const l = BY_ID.get(rec.id);
    const kids = [el("h2", { id: "latent-title" }, "Latent " + rec.id)];
    if (rec.expl) {
      const ex = el("div", { class: "expl", id: "explanation" }, rec.expl);
      if (S.autointerp_judge && "expl_score" in rec) {
        ex.append(el("div", { class: "muted", id: "expl-score", title: "auto-interp detection accuracy of this explanation" },
          "auto-interp score " + (rec.expl_score === null ? "\u2013 (verdict unparseable)" : rec.expl_score.toFixed(2)) +
          " \u00b7 judge " + S.autointerp_judge));
      }
      kids.push(ex);
    }
    kids.push(el("div", { class: "stats" },
      el("span", {}, "density ", el("b", { id: "density" }, pct(rec.n)), " (" + rec.n.toLocaleString("en") + " / " +
        S.n_scanned.toLocaleString("en") + " tokens)"),
      el("span", {}, "max activation ", el("b", {}, fmt(rec.max))),
      el("span", {}, "density rank ", el("b", {}, "#" + RANK.get(rec.id) + " / " + LAT.length))));
    const side = [el("section", { class: "box" }, el("h3", {}, "Activation histogram (non-zero activations)"), histogram(rec))];
    const nb = el("ol", { class: "nbrs", id: "neighbours" }, ...rec.nb.map(([j, cos]) => el("li", {},
      BY_ID.has(j) ? el("a", { href: "#latent=" + j, "data-id": String(j) }, "#" + j) : el("span", { title: "not in this browser (dead or not shown)" }, "#" + j),
      " cos " + cos.toFixed(3), BY_ID.has(j) && BY_ID.get(j).top >= 0 ? el("span", { class: "chip", style: "margin-left:6px" }, visTok(tok(BY_ID.get(j).top))) : null)));
    side.push(el("section", { class: "box" }, el("h3", {}, "Nearest decoder neighbours"), nb));
    kids.push(el("div", { class: "row" }, ...side));
    if (rec.lp) {
      kids.push(el("section", { class: "box", id: "logit-lens" }, el("h3", { title: S.logit_lens }, "Logit lens: promoted tokens"),
        chips(rec.lp, "pos"), el("h3", {}, "Logit lens: suppressed tokens"), chips(rec.ln, "neg")));
    }
    kids.push(el("section", { class: "box" }, el("h3", {}, "Top-activating contexts (" + rec.ctx.length + ")"),
      el("div", { class: "ctxs", id: "contexts" }, ...rec.ctx.map((c) => context(rec, c)))));
    $("detail").replaceChildren(...kids);
    $("detail").scrollTop = 0;
  }
  async function show(id) {
    const ticket = ++shown;
    selected = id;
    markSelected();
    if (!BY_ID.has(id)) {
      const why = !(id >= 0 && id < S.d_sae) ? "is out of range (d_sae = " + S.d_sae + ")"
        : "never fired in the " + S.n_scanned.toLocaleString("en") + " scanned tokens" + (S.n_shown < S.n_alive ? " or is not among the " + S.n_shown + " densest shown" : "");
      $("detail").replaceChildren(el("h2", {}, "Latent " + id), el("p", { class: "muted", id: "not-found" }, "Latent " + id + " " + why + "."));
      return;
    }
    $("detail").replaceChildren(el("p", { class: "muted" }, "Loading latent " + id + "\u2026"));
    try {
      const shard = await loadShard(Math.floor(id / S.shard_size));
      if (ticket === shown) renderDetail(shard[String(id)]);
    } catch (e) {
      if (ticket === shown) $("detail").replaceChildren(el("p", { class: "err" }, String(e)));
    }
  }

  // ---------------------------------------------------------------- search (latent id, or token substring)
  async function search(q) {
    q = q.trim();
    if (!q) { renderList(sortedList()); return; }
    const m = /^#?(\d+)$/.exec(q);
    if (m) { setHash({ latent: m[1] }); return; }
    $("list-info").replaceChildren(el("span", {}, "searching\u2026"));
    const idx = await loadSearch(), needle = q.toLowerCase();
    // exact token (ignoring case and surrounding spaces) >> token starting with the query >> token containing it
    const score = (id, w) => {
      const s = tok(id).toLowerCase(), t = s.trim();
      return t === needle ? 10 * w : t.startsWith(needle) ? 3 * w : s.includes(needle) ? w : 0;
    };
    const hits = [], reasons = new Map();
    for (const [id, acts, lens, expl] of idx) {
      const a = acts.filter((t) => score(t, 1)), p = lens.filter((t) => score(t, 1));
      const e = expl && expl.toLowerCase().includes(needle);
      const sc = acts.reduce((s, t) => s + score(t, 4), 0) + lens.reduce((s, t) => s + score(t, 1), 0) + (e ? 3 : 0);
      if (!sc) continue;
      hits.push([sc, BY_ID.get(id)]);
      reasons.set(id, [a.length ? "fires on " + a.map((t) => visTok(tok(t))).join(" ") : "",
        p.length ? "promotes " + p.map((t) => visTok(tok(t))).join(" ") : "", e ? "explanation" : ""].filter(Boolean).join(" \u00b7 "));
    }
    hits.sort((x, y) => y[0] - x[0] || y[1].n - x[1].n);
    renderList(hits.map((h) => h[1]), hits.length + " latents match \u201c" + q + "\u201d", reasons);
    if (hits.length && !BY_ID.has(selected)) show(hits[0][1].id);
  }

  // ---------------------------------------------------------------- routing: #latent=12, #search=word
  function setHash(o) { location.hash = new URLSearchParams(o).toString(); }
  function route() {
    const p = new URLSearchParams(location.hash.slice(1));
    if (p.has("search")) {
      $("search").value = p.get("search");
      search(p.get("search"));
    } else if (searching && !$("search").value.trim()) {
      renderList(sortedList());
    }
    if (p.has("latent")) show(parseInt(p.get("latent"), 10));
    else if (selected === null && LAT.length && !p.has("search")) show(current[0].id);
    else if (!LAT.length) $("detail").replaceChildren(el("p", { class: "muted", id: "not-found" },
      "No latent fired in the " + S.n_scanned.toLocaleString("en") + " scanned tokens."));
  }
  let timer = null;
  $("search").addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => { const q = $("search").value.trim(); if (!/^#?\d+$/.test(q)) search(q); }, 250);
  });
  $("search").addEventListener("keydown", (ev) => {
    if (ev.key !== "Enter") return;
    clearTimeout(timer);
    const q = $("search").value.trim();
    if (/^#?\d+$/.test(q)) setHash({ latent: q.replace("#", "") }); else setHash(q ? { search: q } : {});
  });
  $("sort").addEventListener("change", () => { if (!$("search").value.trim()) renderList(sortedList()); });
  document.addEventListener("keydown", (ev) => {  // j/k or arrows step through the list shown
    if (ev.target === $("search") || !["ArrowDown", "ArrowUp", "j", "k"].includes(ev.key) || !current.length) return;
    const i = current.findIndex((l) => l.id === selected), step = ev.key === "ArrowDown" || ev.key === "j" ? 1 : -1;
    const next = current[Math.max(0, Math.min(current.length - 1, i + step))];
    if (next) { ev.preventDefault(); setHash({ latent: next.id }); }
  });
  window.addEventListener("hashchange", route);
  renderList(sortedList());
  route();
})();
