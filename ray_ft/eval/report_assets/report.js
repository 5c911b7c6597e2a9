// The question browser of eval/report.html: filters, search and pages over the embedded data.
// The state lives in the URL's hash (#mode=gold&outcome=beats&q=...), so a view can be shared
// and reopened. Only the current page's cards are in the DOM: thousands of questions stay fast.
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("report-data").textContent);
  const PAGE = 25;
  const $ = (id) => document.getElementById(id);
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
  const fmt = (v) => (v === null || v === undefined ? "—" : Number.isInteger(v) ? String(v) : v.toFixed(3));

  const defaults = {mode: D.modes[0], a: D.models.includes("finetuned") ? "finetuned" : D.models[D.models.length - 1],
                    b: D.models.includes("base") ? "base" : D.models[0], metric: D.metrics[0], outcome: "all",
                    right: "0.5", min: "", max: "", q: "", page: "1"};
  let state = Object.assign({}, defaults);

  function readHash() {
    const h = new URLSearchParams(location.hash.slice(1));
    state = Object.assign({}, defaults);
    for (const k of Object.keys(defaults)) if (h.has(k)) state[k] = h.get(k);
  }
  function writeHash() {
    const h = new URLSearchParams();
    for (const [k, v] of Object.entries(state)) if (v !== defaults[k]) h.set(k, v);
    history.replaceState(null, "", "#" + h.toString());
  }

  function fillSelect(id, values, labels) {
    $(id).innerHTML = values.map((v, i) => `<option value="${esc(v)}">${esc(labels ? labels[i] : v)}</option>`).join("");
  }
  function syncControls() {
    for (const k of ["mode", "a", "b", "metric", "outcome", "right", "min", "max", "q"]) $("f-" + k).value = state[k];
  }

  function score(item, model) {
    const ans = (item.by[state.mode] || {})[model];
    return ans ? ans.s[state.metric] : undefined;
  }
  function haystack(item) {
    const answers = Object.values(item.by[state.mode] || {}).map((a) => a.a);
    return [item.q, ...item.refs, D.texts[item.p] || "", ...answers].join("\n").toLowerCase();
  }
  function keep(item) {
    if (!item.by[state.mode]) return false;
    const sa = score(item, state.a), sb = score(item, state.b), right = parseFloat(state.right);
    switch (state.outcome) {
      case "beats": if (!(sa > sb)) return false; break;
      case "loses": if (!(sa < sb)) return false; break;
      case "both_wrong": if (!(sa < right && sb < right)) return false; break;
      case "both_right": if (!(sa >= right && sb >= right)) return false; break;
    }
    if (state.min !== "" && !(sa >= parseFloat(state.min))) return false;
    if (state.max !== "" && !(sa <= parseFloat(state.max))) return false;
    if (state.q && !haystack(item).includes(state.q.toLowerCase())) return false;
    return true;
  }

  // Character spans of the passage to mark: the references, then each model's answer.
  function highlight(text, needles) {
    const marks = new Array(text.length).fill(null);
    needles.forEach((n, rank) => {
      if (!n.text || n.text.length < 2) return;
      for (let at = text.indexOf(n.text); at >= 0; at = text.indexOf(n.text, at + 1)) {
        for (let i = at; i < at + n.text.length; i++) {
          marks[i] = marks[i] || {cls: [], who: []};
          if (!marks[i].cls.includes(n.cls)) { marks[i].cls.push(n.cls); marks[i].who.push(n.who); }
        }
      }
    });
    let out = "", i = 0;
    while (i < text.length) {
      let j = i + 1;
      const key = marks[i] ? marks[i].cls.join(" ") : "";
      while (j < text.length && (marks[j] ? marks[j].cls.join(" ") : "") === key) j++;
      const chunk = esc(text.slice(i, j));
      out += key ? `<mark class="${key}" title="${esc(marks[i].who.join(", "))}">${chunk}</mark>` : chunk;
      i = j;
    }
    return out;
  }

  // The metrics the mode's answers have (no retrieval columns in gold mode), for the cards.
  let shownMetrics = D.metrics;
  function metricsOf(mode) {
    return D.metrics.filter((c) => D.questions.some((q) => q.by[mode] && Object.values(q.by[mode]).some((a) => c in a.s)));
  }

  function card(item) {
    const by = item.by[state.mode];
    const needles = item.refs.map((r) => ({text: r, cls: "ref", who: "reference"}));
    D.models.forEach((m, k) => { if (by[m]) needles.push({text: by[m].a.trim(), cls: "m" + (k % 6), who: m}); });
    const rows = D.models.filter((m) => by[m]).map((m, k) => {
      const a = by[m];
      const cells = shownMetrics.map((c) => `<td class="num">${fmt(a.s[c])}</td>`).join("");
      return `<tr><th><span class="dot m${D.models.indexOf(m) % 6}"></span>${esc(m)}</th>` +
             `<td class="answer">${esc(a.a) || "<em>(empty)</em>"}${a.err ? ` <span class="err">${esc(a.err)}</span>` : ""}</td>${cells}</tr>`;
    }).join("");
    const retrieved = (item.r[state.mode] || []).map(([t, s, id, gold], k) =>
      `<li${gold ? ' class="gold"' : ""}><span class="rank">#${k + 1}</span> <span class="score">score ${fmt(s)}</span>` +
      `${id ? ` <span class="nid">${esc(id)}</span>` : ""}${gold ? ' <span class="tag">gold passage</span>' : ""}` +
      `<div>${highlight(D.texts[t], needles)}</div></li>`).join("");
    return `<article class="q" data-id="${esc(item.id)}"><h3>${esc(item.q)}</h3>` +
      `<p class="refs">reference: ${[...new Set(item.refs)].map((r) => `<mark class="ref">${esc(r)}</mark>`).join(" / ")}</p>` +
      `<table class="answers"><thead><tr><th>model</th><th>answer (${esc(state.mode)})</th>` +
      shownMetrics.map((c) => `<th class="num">${esc(D.metric_names[c] || c)}</th>`).join("") + `</tr></thead><tbody>${rows}</tbody></table>` +
      `<details${state.mode === "gold" ? " open" : ""}><summary>passage</summary><div class="passage">${highlight(D.texts[item.p] || "", needles)}</div></details>` +
      (retrieved ? `<details open><summary>retrieved passages</summary><ol class="retrieved">${retrieved}</ol></details>` : "") +
      `<p class="qid">${esc(item.id)}</p></article>`;
  }

  function render() {
    shownMetrics = metricsOf(state.mode);
    const hits = D.questions.filter(keep);
    const pages = Math.max(1, Math.ceil(hits.length / PAGE));
    const page = Math.min(Math.max(1, parseInt(state.page, 10) || 1), pages);
    $("count").textContent = `${hits.length} of ${D.questions.length} questions · page ${page} of ${pages}`;
    $("questions").innerHTML = hits.slice((page - 1) * PAGE, page * PAGE).map(card).join("");
    $("prev").disabled = page <= 1;
    $("next").disabled = page >= pages;
    state.page = String(page);
    writeHash();
  }

  fillSelect("f-mode", D.modes);
  fillSelect("f-a", D.models);
  fillSelect("f-b", D.models);
  fillSelect("f-metric", D.metrics, D.metrics.map((c) => D.metric_names[c] || c));
  readHash();
  syncControls();
  for (const k of ["mode", "a", "b", "metric", "outcome", "right", "min", "max", "q"]) {
    $("f-" + k).addEventListener("input", () => { state[k] = $("f-" + k).value; state.page = "1"; render(); });
  }
  $("prev").addEventListener("click", () => { state.page = String(parseInt(state.page, 10) - 1); render(); });
  $("next").addEventListener("click", () => { state.page = String(parseInt(state.page, 10) + 1); render(); });
  window.addEventListener("hashchange", () => { readHash(); syncControls(); render(); });
  render();
  document.body.dataset.ready = "1";
})();
