"""The static feature browser of `dictsweep inspect`: opens from disk (file://) with no server.

`index.html` holds the page and its script; `data.js` sets the latent list (frequency, mean and max
activation, top tokens) and `latents/NNNN.js` files hold each block of CHUNK_LATENTS latents'
details (histogram, contexts, neighbours, matches, token effects), loaded by a script tag when a
latent is opened, so a 16k-latent dictionary opens at once. Every JavaScript error is shown in
`#errors` (and so in the page's DOM, which the browser test reads). The address can open a view:
`index.html#latent=12`, `#search=object`, `#sort=max` (latent, frequency, mean, max, tokens).
"""

from __future__ import annotations

import json
import os

from dictsweep.analysis.datafile import LatentTables
from dictsweep.analysis.stats import hist_edges

CHUNK_LATENTS = 256
TOP_TOKENS = 8  # distinct top-context tokens listed (and searched) per latent


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else float(f"{value:.{digits}g}")


def _js(name: str, value) -> str:
    # "</" cannot end the script early inside a JSON string
    return f"{name}({json.dumps(value, separators=(',', ':')).replace('</', '<' + chr(92) + '/')});\n"


def top_tokens(record: dict) -> str:
    """The distinct tokens at the centre of a latent's top contexts, most active first."""
    seen: list[str] = []
    for context in record["contexts"]:
        token = context["tokens"][context["center"]]
        if context["kind"] == "top" and token not in seen:
            seen.append(token)
    return " ".join(seen[:TOP_TOKENS])


def write_browser(folder: str, records: LatentTables, meta: dict) -> str:
    """Write index.html, data.js and latents/*.js into `folder`; returns the entry page's path."""
    os.makedirs(os.path.join(folder, "latents"), exist_ok=True)
    summary = [
        [r["latent"], _round(r["frequency"]), _round(r["mean_act"]), _round(r["max_act"]), top_tokens(r)]
        for r in records
    ]
    with open(os.path.join(folder, "data.js"), "w") as file:
        file.write(
            _js(
                "dictsweepData",
                {
                    "meta": meta,
                    "edges": [_round(e, 3) for e in hist_edges()],
                    "chunk": CHUNK_LATENTS,
                    "latents": summary,
                },
            )
        )
    for start in range(0, len(records), CHUNK_LATENTS):
        details = [detail(r) for r in records[start : start + CHUNK_LATENTS]]
        with open(os.path.join(folder, "latents", f"{start // CHUNK_LATENTS:04d}.js"), "w") as file:
            file.write(_js("dictsweepChunk", {"start": start, "latents": details}))
    path = os.path.join(folder, "index.html")
    with open(path, "w") as file:
        file.write(PAGE.replace("__TITLE__", f"{meta['dictionary']}: feature browser"))
    return path


def detail(record: dict) -> dict:
    """What the latent view shows, with short keys and rounded numbers."""
    return {
        "h": record["hist"],
        "c": [
            {
                "k": c["kind"],
                "a": _round(c["act"]),
                "t": c["tokens"],
                "v": [_round(v, 3) for v in c["token_acts"]],
                "i": c["center"],
            }
            for c in record["contexts"]
        ],
        "top": [_round(v) for v in record["top_acts"]],
        "n": [[n["latent"], _round(n["cosine"], 3)] for n in record["neighbours"]],
        "m": [[m["dictionary"], m["latent"], _round(m["cosine"], 3)] for m in record["matches"]],
        "p": [[t["token"], _round(t["logit"], 3)] for t in record["promoted"]],
        "s": [[t["token"], _round(t["logit"], 3)] for t in record["suppressed"]],
    }


def write_overview(out: str, tables: dict[str, LatentTables], notes: list[str]) -> str:
    """`out/index.html`: a link to each dictionary's browser, with its size and live latents."""
    import html

    rows = []
    for name, records in sorted(tables.items()):
        alive = sum(1 for r in records if r["fire_count"] > 0)
        rows.append(
            f'<tr><td><a href="{html.escape(name)}/index.html">{html.escape(name)}</a></td>'
            f"<td>{len(records)}</td><td>{alive}</td></tr>"
        )
    notes_html = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
    path = os.path.join(out, "index.html")
    with open(path, "w") as file:
        file.write(f"""<!doctype html><html><head><meta charset="utf-8"><title>dictsweep inspect</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em}}td,th{{padding:4px 12px;text-align:left}}</style></head>
<body><h1>Dictionaries</h1><table><tr><th>dictionary</th><th>latents</th><th>fired</th></tr>{"".join(rows)}</table>
<ul>{notes_html}</ul></body></html>""")
    return path


PAGE = r"""<!doctype html>
<html><head><meta charset="utf-8"><title>__TITLE__</title>
<script>
window.dictsweepErrors = [];
function dictsweepError(text) {
  window.dictsweepErrors.push(text);
  var box = document.getElementById('errors');
  if (box) { box.textContent = window.dictsweepErrors.join('\n'); box.style.display = 'block'; }
}
window.onerror = function (message, source, line, column) { dictsweepError(message + ' (' + source + ':' + line + ':' + column + ')'); };
window.addEventListener('unhandledrejection', function (event) { dictsweepError('unhandled rejection: ' + event.reason); });
var DATA = null, CHUNKS = {}, REQUESTED = {};
function dictsweepData(data) { DATA = data; }
function dictsweepChunk(chunk) { CHUNKS[chunk.start / DATA.chunk] = chunk; }
</script>
<style>
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d2330; background: #f6f7f9; }
header { background: #243047; color: #fff; padding: 12px 24px; display: flex; gap: 24px; align-items: baseline; flex-wrap: wrap; }
header h1 { font-size: 18px; margin: 0; } header a { color: #cfe0ff; } header .meta { color: #b8c2d6; font-size: 13px; }
main { padding: 16px 24px; }
#errors { display: none; background: #ffe3e3; color: #8a1111; padding: 8px; white-space: pre-wrap; }
.notes { color: #7a5a00; background: #fff6d8; padding: 6px 10px; border-radius: 4px; margin: 0 0 12px; }
input[type=search] { font-size: 14px; padding: 6px 10px; width: 320px; border: 1px solid #b8c0cc; border-radius: 4px; }
table.list { border-collapse: collapse; width: 100%; background: #fff; margin-top: 10px; }
table.list th { text-align: left; background: #e8ecf2; padding: 6px 10px; cursor: pointer; user-select: none; white-space: nowrap; }
table.list th.sorted::after { content: ' \25BE'; } table.list th.sorted.up::after { content: ' \25B4'; }
table.list td { padding: 4px 10px; border-top: 1px solid #edf0f4; } table.list tr:hover td { background: #f1f5fb; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } .tokens { font-family: ui-monospace, monospace; color: #44506a; }
.bar { display: inline-block; height: 8px; background: #4f7cd9; vertical-align: middle; margin-right: 6px; }
.panel { background: #fff; border-radius: 6px; padding: 12px 16px; margin-bottom: 14px; box-shadow: 0 1px 2px rgba(0,0,0,.06); }
.panel h2 { font-size: 15px; margin: 0 0 8px; } .panel h2 + ul + h2, .panel h2 ~ .ctx + h2 { margin-top: 14px; } .stats span { margin-right: 22px; } .stats b { font-variant-numeric: tabular-nums; }
.grid { display: grid; grid-template-columns: minmax(0, 2fr) minmax(0, 1fr); gap: 14px; }
.ctx { font-family: ui-monospace, monospace; font-size: 13px; padding: 3px 0; border-bottom: 1px dotted #e3e7ee; white-space: pre-wrap; }
.ctx .act { display: inline-block; width: 64px; color: #6a7488; text-align: right; margin-right: 10px; font-size: 12px; }
.ctx .tok { border-radius: 2px; } .ctx .center { outline: 1px solid #c2410c; font-weight: 600; }
.kind { font-size: 11px; color: #8993a6; width: 34px; display: inline-block; }
ul.plain { list-style: none; padding: 0; margin: 0; } ul.plain li { padding: 2px 0; font-variant-numeric: tabular-nums; }
.evaluation { background: #eef3fb; padding: 6px 10px; border-radius: 4px; margin: 0 0 12px; font-variant-numeric: tabular-nums; }
.muted { color: #8993a6; } a { color: #2457c5; text-decoration: none; } a:hover { text-decoration: underline; }
</style></head>
<body>
<header><h1 id="title"></h1><span class="meta" id="meta"></span><a href="#">all latents</a></header>
<main>
<pre id="errors"></pre>
<div id="notes"></div>
<div id="evaluation"></div>
<div id="view"></div>
</main>
<script src="data.js"></script>
<script>
(function () {
  var view = document.getElementById('view');
  var state = {sort: 'frequency', up: false, query: ''};
  var COLUMNS = [['latent', 'latent', 0], ['frequency', 'frequency', 1], ['mean', 'mean act', 2], ['max', 'max act', 3], ['tokens', 'top tokens', 4]];
  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    for (var key in (attrs || {})) { if (key === 'text') node.textContent = attrs[key]; else node.setAttribute(key, attrs[key]); }
    (children || []).forEach(function (child) { if (child) node.appendChild(child); });
    return node;
  }
  function fmt(value, digits) { return value === null || value === undefined ? '-' : Number(value).toPrecision(digits || 3); }
  function pct(value) { return value === null ? '-' : (100 * value).toPrecision(3) + '%'; }
  function shown(token) {
    if (token.indexOf('##') === 0) return token.slice(2);
    if (token[0] === '\u0120' || token[0] === '\u2581') return ' ' + token.slice(1);
    return ' ' + token;
  }
  function renderList() {
    var query = state.query.trim().toLowerCase(), column = COLUMNS.filter(function (c) { return c[0] === state.sort; })[0][2];
    var rows = DATA.latents.filter(function (l) { return !query || l[4].toLowerCase().split(' ').some(function (t) { return t.replace(/^##/, '').indexOf(query) >= 0; }); });
    rows.sort(function (a, b) { var x = a[column], y = b[column]; var order = x < y ? -1 : x > y ? 1 : a[0] - b[0]; return state.up ? order : -order; });
    var maxFreq = Math.max.apply(null, DATA.latents.map(function (l) { return l[1] || 0; }).concat([1e-12]));
    var search = el('input', {type: 'search', placeholder: 'search a token (e.g. the)', value: state.query, id: 'search'});
    search.addEventListener('input', function () { state.query = search.value; renderList(); var again = document.getElementById('search'); again.focus(); again.setSelectionRange(again.value.length, again.value.length); });
    var head = el('tr', {}, COLUMNS.map(function (c) {
      var th = el('th', {text: c[1], 'data-sort': c[0], 'class': c[0] === state.sort ? 'sorted' + (state.up ? ' up' : '') : ''});
      th.addEventListener('click', function () { if (state.sort === c[0]) state.up = !state.up; else { state.sort = c[0]; state.up = c[0] === 'latent' || c[0] === 'tokens'; } renderList(); });
      return th;
    }));
    var limit = 500, body = rows.slice(0, limit).map(function (l) {
      return el('tr', {'class': 'latent-row'}, [
        el('td', {'class': 'num'}, [el('a', {href: '#latent=' + l[0], text: String(l[0])})]),
        el('td', {'class': 'num'}, [el('span', {'class': 'bar', style: 'width:' + Math.round(60 * (l[1] || 0) / maxFreq) + 'px'}), document.createTextNode(pct(l[1]))]),
        el('td', {'class': 'num', text: fmt(l[2])}), el('td', {'class': 'num', text: fmt(l[3])}),
        el('td', {'class': 'tokens', text: l[4]})]);
    });
    var count = el('span', {'class': 'muted', text: '  ' + rows.length + ' of ' + DATA.latents.length + ' latents' + (rows.length > limit ? ' (first ' + limit + ' shown)' : '')});
    view.replaceChildren(el('div', {}, [search, count]), el('table', {'class': 'list', id: 'latents'}, [el('thead', {}, [head]), el('tbody', {}, body)]));
    document.body.setAttribute('data-view', 'list');
    document.body.setAttribute('data-rows', String(body.length));
  }
  function histogram(counts) {
    var first = counts.findIndex(function (c) { return c > 0; }), last = counts.length - 1 - counts.slice().reverse().findIndex(function (c) { return c > 0; });
    if (first < 0) return el('p', {'class': 'muted', text: 'never fired in the rows read'});
    var bins = counts.slice(first, last + 1), width = 560, height = 120, barWidth = width / bins.length, top = Math.max.apply(null, bins);
    var svgNS = 'http://www.w3.org/2000/svg', svg = document.createElementNS(svgNS, 'svg');
    svg.setAttribute('viewBox', '0 0 ' + width + ' ' + (height + 18)); svg.setAttribute('width', '100%'); svg.setAttribute('id', 'histogram');
    bins.forEach(function (count, i) {
      var h = count ? Math.max(1, height * count / top) : 0, rect = document.createElementNS(svgNS, 'rect');
      rect.setAttribute('x', i * barWidth + 1); rect.setAttribute('y', height - h); rect.setAttribute('width', Math.max(1, barWidth - 2)); rect.setAttribute('height', h);
      rect.setAttribute('fill', '#4f7cd9');
      var title = document.createElementNS(svgNS, 'title'); title.textContent = DATA.edges[first + i] + ' to ' + DATA.edges[first + i + 1] + ': ' + count; rect.appendChild(title);
      svg.appendChild(rect);
    });
    [[0, DATA.edges[first], 'start'], [width, DATA.edges[last + 1], 'end']].forEach(function (label) {
      var text = document.createElementNS(svgNS, 'text'); text.setAttribute('x', label[0]); text.setAttribute('y', height + 14); text.setAttribute('font-size', '11'); text.setAttribute('text-anchor', label[2]); text.setAttribute('fill', '#6a7488'); text.textContent = String(label[1]); svg.appendChild(text);
    });
    return el('div', {}, [svg, el('div', {'class': 'muted', text: 'activation (log scale) of the rows it fired on'})]);
  }
  function context(c, maxAct) {
    var line = el('div', {'class': 'ctx'}, [el('span', {'class': 'kind', text: c.k === 'top' ? '' : c.k}), el('span', {'class': 'act', text: fmt(c.a)})]);
    c.t.forEach(function (token, i) {
      var act = c.v[i], alpha = act === null ? 0 : Math.max(0, Math.min(1, act / (maxAct || 1)));
      var text = shown(token);
      if (text[0] === ' ') { line.appendChild(document.createTextNode(' ')); text = text.slice(1); }  // the space stays unhighlighted
      var span = el('span', {'class': 'tok' + (i === c.i ? ' center' : ''), title: token + ': ' + (act === null ? 'unknown' : fmt(act)), text: text});
      if (alpha > 0) span.style.background = 'rgba(234, 88, 12, ' + (0.12 + 0.78 * alpha).toFixed(3) + ')';
      line.appendChild(span);
    });
    return line;
  }
  function list(items, render) { return el('ul', {'class': 'plain'}, items.map(function (item) { return el('li', {}, render(item)); })); }
  function renderLatent(id) {
    var chunkIndex = Math.floor(id / DATA.chunk), summary = DATA.latents[id];
    if (!summary) { view.replaceChildren(el('p', {text: 'no latent ' + id})); return; }
    if (!CHUNKS[chunkIndex]) {
      if (REQUESTED[chunkIndex]) { dictsweepError('latents/' + String(chunkIndex).padStart(4, '0') + '.js loaded but defined no latents'); return; }
      REQUESTED[chunkIndex] = true;
      var script = document.createElement('script');
      script.src = 'latents/' + String(chunkIndex).padStart(4, '0') + '.js';
      script.onload = function () { renderLatent(id); };
      script.onerror = function () { dictsweepError('could not load ' + script.src); };
      document.body.appendChild(script);
      view.replaceChildren(el('p', {'class': 'muted', text: 'loading latent ' + id + '...'}));
      return;
    }
    var d = CHUNKS[chunkIndex].latents[id - CHUNKS[chunkIndex].start];
    var stats = el('div', {'class': 'stats'}, [['frequency', pct(summary[1])], ['mean act (firing)', fmt(summary[2])], ['max act', fmt(summary[3])]].map(function (s) { return el('span', {}, [document.createTextNode(s[0] + ' '), el('b', {text: s[1]})]); }));
    var tops = d.c.filter(function (c) { return c.k === 'top'; }), lower = d.c.filter(function (c) { return c.k !== 'top'; });
    var contexts = el('div', {'class': 'panel', id: 'contexts'}, [el('h2', {text: 'Top activations'})].concat(
      tops.length ? tops.map(function (c) { return context(c, summary[3]); }) : [el('p', {'class': 'muted', text: d.top.length ? 'top activations: ' + d.top.map(function (v) { return fmt(v); }).join(', ') + ' (no contexts: see the notes)' : 'never fired'})],
      lower.length ? [el('h2', {text: 'Across its activation distribution (quantile of its firing rows)'})].concat(lower.map(function (c) { return context(c, summary[3]); })) : []));
    var side = el('div', {}, [
      el('div', {'class': 'panel'}, [el('h2', {text: 'Histogram'}), histogram(d.h)]),
      el('div', {'class': 'panel', id: 'neighbours'}, [el('h2', {text: 'Nearest decoder directions'}), list(d.n, function (n) { return [el('a', {href: '#latent=' + n[0], text: 'latent ' + n[0]}), document.createTextNode('  cos ' + fmt(n[1]))]; })]),
      d.m.length ? el('div', {'class': 'panel'}, [el('h2', {text: 'In the other dictionary sizes'}), list(d.m, function (m) { return [el('a', {href: '../' + encodeURIComponent(m[0]) + '/index.html#latent=' + m[1], text: m[0] + ' / ' + m[1]}), document.createTextNode('  cos ' + fmt(m[2]))]; })]) : null,
      d.p.length ? el('div', {'class': 'panel'}, [el('h2', {text: 'Promotes (output embedding)'}), list(d.p, function (t) { return [el('span', {'class': 'tokens', text: t[0]}), document.createTextNode('  ' + fmt(t[1]))]; }),
                                                  el('h2', {text: 'Suppresses'}), list(d.s, function (t) { return [el('span', {'class': 'tokens', text: t[0]}), document.createTextNode('  ' + fmt(t[1]))]; })]) : null]);
    view.replaceChildren(el('div', {'class': 'panel'}, [el('h2', {text: 'Latent ' + id}), stats]), el('div', {'class': 'grid'}, [contexts, side]));
    document.body.setAttribute('data-view', 'latent');
    document.body.setAttribute('data-latent', String(id));
    document.body.setAttribute('data-contexts', String(d.c.length));
  }
  function route() {
    var match = /latent=(\d+)/.exec(location.hash), search = /search=([^&]*)/.exec(location.hash), sort = /sort=(\w+)/.exec(location.hash);
    if (search) state.query = decodeURIComponent(search[1]);
    if (sort && COLUMNS.some(function (c) { return c[0] === sort[1]; })) { state.sort = sort[1]; state.up = sort[1] === 'latent' || sort[1] === 'tokens'; }
    if (match) renderLatent(Number(match[1])); else renderList();
    window.scrollTo(0, 0);
  }
  if (!DATA) { dictsweepError('data.js did not load'); return; }
  var meta = DATA.meta;
  document.getElementById('title').textContent = meta.dictionary;
  document.getElementById('meta').textContent = meta.architecture + ', ' + meta.n_latents + ' latents, d_in ' + meta.d_in + (meta.target_hook ? ', d_out ' + meta.d_out : '') + ' | ' + meta.rows + ' rows of ' + meta.dataset + (meta.hook ? ' (' + meta.hook + (meta.target_hook ? ' \u2192 ' + meta.target_hook : '') + ')' : '');
  if (meta.notes.length) document.getElementById('notes').replaceChildren.apply(document.getElementById('notes'), meta.notes.map(function (note) { return el('p', {'class': 'notes', text: note}); }));
  if (meta.evaluation && meta.evaluation.length) document.getElementById('evaluation').replaceChildren(el('p', {'class': 'evaluation', text: 'evaluation (SAEBench definitions): ' + meta.evaluation.map(function (row) { return row[0] + ' ' + fmt(row[1]); }).join(' | ')}));
  window.addEventListener('hashchange', route);
  route();
})();
</script>
</body></html>
"""
