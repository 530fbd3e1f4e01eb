"""The local dashboard: one self-contained HTML page that puts runs side by side.

    python -m genlab.dashboard dir=<dir> [out=FILE] [max_points=300]

<dir> is a sweep directory (logs/train/multiruns/<time>), a single run, or any folder of
runs. The page (default ``<dir>/dashboard.html``) needs no server and nothing from the
network: data, sample grids (PNG as data URIs), styles and scripts are all inside it. It has

- a sortable table of the runs (click a header) with status, family, training images/s,
  wall time, parameters and every validation metric, failed runs with their errors; runs that
  differ only in their seed (``genlab.groups``) are one row of ``mean ± std`` with their seeds,
  and a run that reports its own spread (``val/X_std``) shows it as ``X ± std``;
- how far the metrics agree: Kendall τ between the rows' rankings by each pair of metrics;
- a trade-off plot: any two columns against each other (e.g. digit Fréchet distance vs
  training images/s or sampling images/s), one point per run;
- metric curves from each run's metrics.csv against steps or against training time
  (``time/train_s``, logged by the WallClock callback), a seed group's as its mean with a
  ± std band;
- quality against the number of network evaluations, from each run's ``nfe.csv`` (written by
  ``python -m genlab.evaluate run_dir=<run> "nfe=[...]"``): one line per run and solver;
- each run's newest sample grid (and reconstructions where there are some), side by side;
- the configuration keys whose values differ between the runs.

Whatever a run directory holds (its name, config values, metric names, errors, overrides) is
shown as text, never markup: html.escape in the HTML written here, ``<``/``>``/``&`` as
``\\u003c``... in the embedded JSON, and textContent / createElement in the page's script.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import math
from pathlib import Path

import hydra
from omegaconf import DictConfig

from genlab import groups, nfe
from genlab.runs import (
    config_differences,
    find_runs,
    latest_images,
    load_run,
    lower_is_better,
    metric_columns,
    read_curves,
)
from genlab.utils import CONF_DIR, UsageError, compose, reported

COLUMNS = [  # (key, header) of the run fields shown before the metrics
    ("name", "run"),
    ("status", "status"),
    ("family", "family"),
    ("data", "data"),
    ("parameters", "params"),
    ("global_step", "steps"),
    ("train_images_per_s", "train img/s"),
    ("wall_time_s", "wall s"),
]
IMAGE_KINDS = ("step", "recon")  # sample grids, reconstructions
INTEGERS = ("parameters", "global_step")  # shown as integers when equal across a seed group


def _thin(points: list, n: int) -> list:
    """At most n points, evenly spaced, the last one kept."""
    if len(points) <= n:
        return points
    idx = sorted({round(i * (len(points) - 1) / (n - 1)) for i in range(n)})
    return [points[i] for i in idx]


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def nfe_lines(run: Path) -> list[dict]:
    """A run's ``nfe.csv`` as lines: [{"name": solver (spacing) ..., "points": {metric:
    [[counted NFE, value], ...]}}], non-finite values left out (JSON has none)."""
    lines = []
    for label, rows in nfe.series(nfe.read_table(run / nfe.TABLE)).items():
        points: dict[str, list] = {}
        for r in rows:
            x = float(r["nfe"] or r["nfe_requested"])
            for key, value in r.items():
                if key.startswith("val/") and value and math.isfinite(float(value)):
                    points.setdefault(key, []).append([x, float(value)])
        lines.append({"name": label, "points": {k: sorted(v) for k, v in points.items()}})
    return lines


def collect(root: str | Path, max_points: int = 300) -> dict:
    """Everything the page shows, as one JSON-able dict."""
    root = Path(root)
    paths = find_runs(root)
    if not paths:
        raise FileNotFoundError(
            f"no runs under {root}: expected run directories with summary.json or "
            ".hydra/config.yaml (python -m genlab writes them)"
        )
    runs = [load_run(p, root) for p in paths]
    metrics = metric_columns(runs)
    diff_keys = config_differences(runs)
    seed_groups = [g for g in groups.summarize(runs) if len(g["runs"]) > 1]
    member = {name: i for i, g in enumerate(seed_groups) for name in g["runs"]}
    for run, path in zip(runs, paths):
        run["curves"] = {
            k: _thin(v, max_points) for k, v in read_curves(path).items() if not k.startswith("lr-")
        }
        run["images"] = {
            kind: {"file": str(p.relative_to(path)), "src": _data_uri(p)}
            for kind, p in latest_images(path).items()
            if kind in IMAGE_KINDS
        }
        run["config_diff"] = {k: run["config"].get(k, "—") for k in diff_keys}
        run["nfe"] = nfe_lines(path)
        run["group"] = member.get(run["name"])
        del run["config"]
    for g in seed_groups:
        curves = [r["curves"] for r in runs if r["group"] is not None and r["name"] in g["runs"]]
        keys = {k for c in curves for k in c}
        g["curves"] = {k: mean_curve([c.get(k, []) for c in curves]) for k in sorted(keys)}
    shown = groups.value_metrics(metrics)
    nfe_keys = {k for r in runs for line in r["nfe"] for k in line["points"]}
    return {
        "root": str(root.resolve()),
        "generated": dt.datetime.now().isoformat(timespec="seconds"),
        "runs": runs,
        "metrics": metrics,
        "shown_metrics": shown,  # the table's: spread columns are folded into ``X ± std``
        "spread_of": {m: groups.spread_key(m, metrics) for m in shown},
        "groups": seed_groups,
        "agreement": agreement(runs, seed_groups),
        "lower_is_better": {m: lower_is_better(m) for m in metrics},
        "diff_keys": diff_keys,
        "nfe_metrics": [m for m in metrics if m in nfe_keys] + sorted(nfe_keys - set(metrics)),
    }


def mean_curve(curves: list[list]) -> list[list]:
    """The members' curves of one metric, [(step, seconds or None, value), ...] each, as
    [[step, mean seconds or None, mean, std (ddof=1)], ...] at the steps two or more have."""
    at: dict[int, list] = {}
    for curve in curves:
        for step, seconds, value in curve:
            at.setdefault(step, []).append((seconds, value))
    out = []
    for step in sorted(at):
        if len(at[step]) >= 2:
            s = groups.stats([v for _, v in at[step]])
            times = [t for t, _ in at[step] if t is not None]
            out.append([step, sum(times) / len(times) if times else None, s["mean"], s["std"]])
    return out


def rows(data: dict) -> list[dict]:
    """The table's rows: a seed group's in place of its runs (where its first run is), every
    other run as it is. {"name", "group" (index or None), "run" (the run's record)}."""
    out, seen = [], set()
    for run in data["runs"]:
        g = run.get("group")
        if g is None:
            out.append({"name": run["name"], "group": None, "run": run})
        elif g not in seen:
            seen.add(g)
            out.append({"name": data["groups"][g]["name"], "group": g, "run": None})
    return out


def agreement(runs: list[dict], seed_groups: list[dict]) -> dict:
    """Kendall τ between the metrics' rankings of the table's completed rows (a seed group
    ranked by its means)."""
    in_group = {n for g in seed_groups for n in g["runs"]}
    ranked = [r for r in runs if r["status"] == "completed" and r["name"] not in in_group]
    ranked += [{"metrics": {m: s["mean"] for m, s in g["metrics"].items()}}
               for g in seed_groups if g["status"] == "completed"]  # fmt: skip
    result = groups.metric_agreement(ranked)
    tau = [[None if math.isnan(t) else round(float(t), 4) for t in row] for row in result.tau]
    return {"metrics": result.metrics, "tau": tau, "rows": len(ranked)}


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def _sort_value(value) -> str:
    return "" if value is None else html.escape(str(value), quote=True)


def _cells(data: dict, row: dict) -> dict:
    """{column: (sort value, stats dict or plain value)} of one table row."""
    keys = [k for k, _ in COLUMNS] + data["shown_metrics"]
    if row["group"] is None:  # a run as it was, its own spread folded in where it has one
        run, out = row["run"], {}
        for key in keys:
            if not key.startswith("val/"):
                out[key] = (run.get(key), run.get(key))
            else:
                value = run["metrics"].get(key)
                s = groups.stats([value], run["metrics"].get(data["spread_of"].get(key)))
                out[key] = (value, s if value is not None and s["std"] is not None else value)
        return out
    g, out = data["groups"][row["group"]], {}
    for key in keys:
        s = g["fields"].get(key) if not key.startswith("val/") else g["metrics"].get(key)
        if key not in g["fields"] and not key.startswith("val/"):  # name, status, family ...
            out[key] = (g.get(key), g.get(key))
        elif s is None or s["mean"] is None:
            out[key] = (None, None)
        elif s["std"] is None or (s["std"] == 0 and key in g["fields"]):  # one value, or a
            # field equal across the seeds (parameters, steps): shown as is
            mean = s["mean"]
            out[key] = (mean, int(mean) if float(mean).is_integer() and key in INTEGERS else mean)
        else:
            out[key] = (s["mean"], s)
    return out


def render_table(data: dict) -> str:
    """The runs table as static HTML (sorted by the page's script on click): one row per run,
    one per seed group (``mean ± std``, with its seeds)."""
    shown = data["shown_metrics"]
    heads = [h for _, h in COLUMNS] + [m.removeprefix("val/") for m in shown]
    keys = [k for k, _ in COLUMNS] + shown
    table = [(row, _cells(data, row)) for row in rows(data)]
    best = {}
    for m in shown:
        vals = [cells[m][0] for _, cells in table if cells[m][0] is not None]
        if len(set(vals)) > 1:
            best[m] = min(vals) if data["lower_is_better"][m] else max(vals)
    out = ['<div class="scroll"><table id="runs"><thead><tr>']
    for key, head in zip(keys, heads):
        arrow = " ↓" if data["lower_is_better"].get(key) else (" ↑" if key in best else "")
        out.append(f'<th data-key="{html.escape(key)}" title="{html.escape(key)}">'
                   f"{html.escape(head)}{arrow}</th>")  # fmt: skip
    out.append("</tr></thead><tbody>")
    for row, cells in table:
        run = row["run"] or data["groups"][row["group"]]
        status = run["status"]
        title = f' title="{html.escape(run["error"])}"' if run.get("error") else ""
        if row["group"] is None:
            out.append(
                f'<tr class="run {html.escape(status)}" data-run="{html.escape(run["name"])}">'
            )
        else:
            seeds = ", ".join(map(str, run["seeds"]))
            state = status if " " not in status else "partial"  # "2/3 completed"
            out.append(f'<tr class="group {html.escape(state)}" '
                       f'data-group="{html.escape(run["name"])}" '
                       f'data-members="{html.escape(" ".join(run["runs"]))}">')  # fmt: skip
        for key in keys:
            sort, value = cells[key]
            cls = "best" if key in best and sort == best[key] else ""
            if isinstance(value, dict):  # mean ± std
                cls += " pm"
                n = f"over {value['n']} seeds" if value["spread"] == "seeds" else "the run's own"
                text = html.escape(groups.pm(value))
                cell = f'<span title="mean ± std ({html.escape(n)})">{text}</span>'
            else:
                cell = html.escape(_fmt(value))
            if key == "status":
                cell = f'<span class="badge"{title}>{cell}</span>'
            if key == "name" and row["group"] is not None:
                cell += f' <span class="seeds">seeds {html.escape(seeds)}</span>'
            cls = f' class="{cls.strip()}"' if cls.strip() else ""
            out.append(f'<td data-v="{_sort_value(sort)}"{cls}>{cell}</td>')
        out.append("</tr>")
    out.append("</tbody></table></div>")
    errors = [r for r in data["runs"] if r.get("error")]
    if errors:
        out.append('<ul class="errors">')
        for r in errors:
            out.append(f"<li><b>{html.escape(r['name'])}</b>: {html.escape(r['error'])}</li>")
        out.append("</ul>")
    return "".join(out)


def render_agreement(data: dict) -> str:
    """The Kendall τ table of the metrics at least 3 rows have (nothing with fewer than two)."""
    result = data["agreement"]
    names = [m.removeprefix("val/") for m in result["metrics"]]
    if len(names) < 2:
        return ""
    out = [
        f"""<h2>Do the metrics agree?</h2>
<div class="meta">Kendall τ between the rankings of the table's {result["rows"]} completed rows
(a seed group by its means) by each pair of metrics, each ranked best first: +1 the same
order, −1 the reverse. Metrics that fewer than 3 rows have, spreads (<code>_std</code>) and
costs (sampling images/s, NFE) are left out; a blank cell has too few rows with both.</div>
<div class="scroll"><table id="agreement"><thead><tr><th>τ</th>"""
    ]
    out += [f"<th>{html.escape(n)}</th>" for n in names]
    out.append("</tr></thead><tbody>")
    for name, row in zip(names, result["tau"]):
        out.append(f"<tr><td>{html.escape(name)}</td>")
        out += [f'<td data-v="{"" if t is None else t}">{"" if t is None else f"{t:+.2f}"}</td>'
                for t in row]  # fmt: skip
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def render_samples(data: dict) -> str:
    cards = []
    for run in data["runs"]:
        imgs = "".join(
            f'<figure><img alt="{html.escape(run["name"])} {kind}" src="{img["src"]}">'
            f"<figcaption>{html.escape(img['file'])}</figcaption></figure>"
            for kind, img in run["images"].items()
        )
        if not imgs:
            imgs = '<p class="none">no sample grid</p>'
        cards.append(f'<div class="card"><h3>{html.escape(run["name"])}</h3>{imgs}</div>')
    return '<div class="cards">' + "".join(cards) + "</div>"


def render_config(data: dict) -> str:
    out = ['<div class="scroll"><table id="config"><thead><tr><th>key</th>']
    out += [f"<th>{html.escape(r['name'])}</th>" for r in data["runs"]]
    out.append("</tr></thead><tbody><tr><td><b>command-line overrides</b></td>")
    out += [f"<td>{html.escape(' '.join(r['overrides']))}</td>" for r in data["runs"]]
    out.append("</tr>")
    for key in data["diff_keys"]:
        out.append(f"<tr><td>{html.escape(key)}</td>")
        out += [f"<td>{html.escape(str(r['config_diff'][key]))}</td>" for r in data["runs"]]
        out.append("</tr>")
    out.append("</tbody></table></div>")
    if not data["diff_keys"]:
        out.append("<p>Apart from these, the runs' configurations are identical.</p>")
    return "".join(out)


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:20px;color:#222}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px}
.meta{color:#666;font-size:12px}
table{border-collapse:collapse;font-size:12px}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right;white-space:nowrap}
td:first-child,th:first-child{text-align:left}
#runs th{cursor:pointer;background:#f4f4f4;position:sticky;top:0}
#runs th.asc::after{content:" ▲"}#runs th.desc::after{content:" ▼"}
tr.failed td{background:#fdecec}tr.completed .badge{color:#17692b}
tr.failed .badge,tr.interrupted .badge{color:#b3261e;font-weight:600}
td.best{font-weight:700;background:#eaf6ea}
.seeds{color:#666;font-size:11px}tr.group td{background:#f7f9fc}tr.group td.best{background:#eaf6ea}
tr.partial td{background:#fff6e0}
.errors{color:#b3261e;font-size:12px}
.scroll{overflow-x:auto;max-width:100%}
#config td{text-align:left;max-width:360px;white-space:normal;word-break:break-all}
.row{display:flex;gap:16px;flex-wrap:wrap;align-items:flex-start}
.panel{border:1px solid #ddd;padding:8px}
select,label{font-size:12px;margin-right:8px}
svg text{font-size:10px;fill:#444}svg .axis{stroke:#999}
.legend span{display:inline-block;margin-right:10px;font-size:12px}
.legend i{display:inline-block;width:10px;height:10px;margin-right:3px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #ddd;padding:6px;max-width:420px}
.card h3{font-size:13px;margin:0 0 4px}
figure{margin:0 0 6px}figure img{max-width:400px;image-rendering:pixelated;display:block}
figcaption{font-size:11px;color:#666}.none{color:#999}
"""

SCRIPT = r"""
const DATA = JSON.parse(document.getElementById('data').textContent);
const COLORS = ['#1f77b4','#d62728','#2ca02c','#ff7f0e','#9467bd','#8c564b','#e377c2',
  '#7f7f7f','#bcbd22','#17becf'];
const color = i => COLORS[i % COLORS.length];
const NS = 'http://www.w3.org/2000/svg';
function el(tag, attrs, parent) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}
function fmt(v) { return Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-2 && v !== 0)
  ? v.toExponential(2) : (+v.toPrecision(4)).toString(); }

// sortable table
document.querySelectorAll('#runs th').forEach((th, col) => {
  th.addEventListener('click', () => {
    const body = document.querySelector('#runs tbody');
    const asc = !th.classList.contains('asc');
    document.querySelectorAll('#runs th').forEach(h => h.classList.remove('asc', 'desc'));
    th.classList.add(asc ? 'asc' : 'desc');
    const rows = Array.from(body.rows);
    rows.sort((a, b) => {
      const x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
      if (x === '' && y !== '') return 1;
      if (y === '' && x !== '') return -1;
      const nx = parseFloat(x), ny = parseFloat(y);
      const c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y, undefined, {numeric: true});
      return asc ? c : -c;
    });
    rows.forEach(r => body.appendChild(r));
  });
});

// one chart: series [{name, color, band, points: [[x, y, std (optional)], ...]}]; a std
// draws a band around a line (band: true) or an error bar on a point
function chart(svg, series, xlabel, ylabel, lines, logy, logx, marks) {
  svg.replaceChildren();
  const W = +svg.getAttribute('width'), H = +svg.getAttribute('height');
  const m = {l: 60, r: lines ? 10 : 110, t: 10, b: 36};
  series = series.map(s => ({...s, points: s.points.map(p =>
    [p[0], p[1], p[1] - (p[2] || 0), p[1] + (p[2] || 0)])}));  // [x, y, y - std, y + std]
  if (logy) series = series.map(s => ({...s, points: s.points.filter(p => p[1] > 0)
    .map(p => [p[0], Math.log10(p[1]), Math.log10(p[2] > 0 ? p[2] : p[1]), Math.log10(p[3])])}));
  if (logx) series = series.map(s => ({...s, points: s.points.filter(p => p[0] > 0)
    .map(p => [Math.log10(p[0]), p[1], p[2], p[3]])}));
  const pts = series.flatMap(s => s.points);
  if (!pts.length) { el('text', {x: W / 2 - 40, y: H / 2}, svg).textContent = 'no data'; return 0; }
  let [x0, x1] = [Math.min(...pts.map(p => p[0])), Math.max(...pts.map(p => p[0]))];
  let [y0, y1] = [Math.min(...pts.map(p => p[2])), Math.max(...pts.map(p => p[3]))];
  if (x0 === x1) { x0 -= 1; x1 += 1; } if (y0 === y1) { y0 -= 1; y1 += 1; }
  const X = x => m.l + (x - x0) / (x1 - x0) * (W - m.l - m.r);
  const Y = y => H - m.b - (y - y0) / (y1 - y0) * (H - m.t - m.b);
  el('line', {x1: m.l, y1: H - m.b, x2: W - m.r, y2: H - m.b, class: 'axis'}, svg);
  el('line', {x1: m.l, y1: m.t, x2: m.l, y2: H - m.b, class: 'axis'}, svg);
  for (let i = 0; i <= 4; i++) {
    const xv = x0 + (x1 - x0) * i / 4, yv = y0 + (y1 - y0) * i / 4;
    el('text', {x: X(xv) - 12, y: H - m.b + 12}, svg).textContent = logx ? fmt(10 ** xv) : fmt(xv);
    el('text', {x: 4, y: Y(yv) + 3}, svg).textContent = logy ? fmt(10 ** yv) : fmt(yv);
  }
  el('text', {x: W / 2 - 30, y: H - 4}, svg).textContent = xlabel;
  el('text', {x: m.l + 4, y: m.t + 10}, svg).textContent = ylabel;
  let drawn = 0;
  series.forEach(s => {
    if (!s.points.length) return;
    const xy = (p, k) => X(p[0]).toFixed(1) + ' ' + Y(p[k]).toFixed(1);
    if (lines && s.band) {  // mean ± std of a seed group: up along y + std, back along y - std
      const d = 'M' + s.points.map(p => xy(p, 3)).join(' L') + ' L'
        + s.points.slice().reverse().map(p => xy(p, 2)).join(' L') + ' Z';
      el('path', {d, fill: s.color, 'fill-opacity': 0.18, stroke: 'none', class: 'band'}, svg);
    }
    if (lines) {
      const d = s.points.map((p, i) => (i ? 'L' : 'M') + X(p[0]).toFixed(1) + ' ' + Y(p[1]).toFixed(1)).join(' ');
      el('path', {d, fill: 'none', stroke: s.color, 'stroke-width': 1.5, class: 'curve'}, svg);
      if (marks) s.points.forEach(p =>
        el('circle', {cx: X(p[0]), cy: Y(p[1]), r: 3, fill: s.color, class: 'mark'}, svg));
    } else {
      s.points.forEach(p => {
        if (p[2] !== p[3]) el('line', {x1: X(p[0]), x2: X(p[0]), y1: Y(p[2]), y2: Y(p[3]),
          stroke: s.color, 'stroke-width': 1.5, class: 'errorbar'}, svg);
        el('circle', {cx: X(p[0]), cy: Y(p[1]), r: 5, fill: s.color, class: 'point'}, svg);
        el('text', {x: X(p[0]) + 7, y: Y(p[1]) + 3}, svg).textContent = s.name;
      });
    }
    drawn++;
  });
  return drawn;
}
// what the plots draw: a seed group (its mean, ± std) where its first run is, every other run
const UNITS = [], seenGroups = new Set();
DATA.runs.forEach(r => {
  if (r.group === null) UNITS.push({name: r.name, run: r});
  else if (!seenGroups.has(r.group)) {
    seenGroups.add(r.group);
    UNITS.push({name: DATA.groups[r.group].name, group: DATA.groups[r.group]});
  }
});
function legend(div) {  // run names are text, never markup
  UNITS.forEach((u, i) => {
    const span = div.appendChild(document.createElement('span'));
    span.appendChild(document.createElement('i')).style.background = color(i);
    span.appendChild(document.createTextNode(u.group ? u.name + ' (mean ± std)' : u.name));
  });
}

// metric curves
const curveKeys = [...new Set(UNITS.flatMap(u => Object.keys((u.run || u.group).curves)))].sort(
  (a, b) => (b.startsWith('val/') - a.startsWith('val/')) || a.localeCompare(b));
const curveSel = document.getElementById('curve-metric'), xSel = document.getElementById('curve-x');
curveKeys.forEach(k => curveSel.add(new Option(k, k)));
const firstVal = curveKeys.find(k => k === 'train/loss') || curveKeys[0];
if (firstVal) curveSel.value = firstVal;
function drawCurves() {
  const key = curveSel.value, byTime = xSel.value === 'time';
  // a run's points are [step, seconds, value], a group's [step, seconds, mean, std]
  const series = UNITS.map((u, i) => ({name: u.name, color: color(i), band: !!u.group,
    points: ((u.run || u.group).curves[key] || []).filter(p => !byTime || p[1] !== null)
      .map(p => [byTime ? p[1] : p[0], p[2], p[3]])}));
  const n = chart(document.getElementById('curves'), series,
    byTime ? 'training time (s)' : 'step', key || '', true, logBox.checked);
  document.body.dataset.curves = n;
  document.body.dataset.bands = document.querySelectorAll('#curves .band').length;
}
const logBox = document.getElementById('curve-log');
[curveSel, xSel, logBox].forEach(e => e.addEventListener('change', drawCurves));
legend(document.getElementById('curve-legend'));

// trade-off scatter
const numeric = ['train_images_per_s', 'wall_time_s', 'parameters', 'global_step', ...DATA.metrics];
const value = (r, k) => k.startsWith('val/') ? r.metrics[k] : r[k];
const stat = (u, k) => u.group  // {mean, std}: a group's over its seeds, a run's value (own std)
  ? ((k.startsWith('val/') ? u.group.metrics[k] : u.group.fields[k]) || {})
  : {mean: value(u.run, k), std: DATA.spread_of[k] ? u.run.metrics[DATA.spread_of[k]] : null};
const sx = document.getElementById('trade-x'), sy = document.getElementById('trade-y');
numeric.forEach(k => { sx.add(new Option(k, k)); sy.add(new Option(k, k)); });
sx.value = numeric.includes('val/sample_img_per_s') ? 'val/sample_img_per_s' : 'train_images_per_s';
sy.value = ['val/fid', 'val/fd_digits'].find(k => numeric.includes(k)) || numeric[0];
function drawTrade() {
  const series = UNITS.map((u, i) => {
    const x = stat(u, sx.value), y = stat(u, sy.value);
    return {name: u.name, color: color(i),
      points: (x.mean != null && y.mean != null) ? [[x.mean, y.mean, y.std]] : []};
  });
  document.body.dataset.points = chart(document.getElementById('trade'), series,
    sx.value + (logx.checked ? ' (log)' : ''), sy.value, false, false, logx.checked);
}
const logx = document.getElementById('trade-logx');
[sx, sy, logx].forEach(e => e.addEventListener('change', drawTrade));

// quality against NFE: one line per run and solver (the runs' nfe.csv)
const nfeSel = document.getElementById('nfe-metric');
const nfeLines = DATA.runs.flatMap(r => r.nfe.map(l => ({...l, name: r.name + ' · ' + l.name})));
function drawNfe() {
  const key = nfeSel.value;
  const series = nfeLines.map((l, i) => ({name: l.name, color: color(i), points: l.points[key] || []}));
  document.body.dataset.nfe = chart(document.getElementById('nfe'), series,
    'network evaluations per image (log)', key, true, nfeLog.checked, true, true);
}
const nfeLog = document.getElementById('nfe-log');
if (nfeSel) {
  DATA.nfe_metrics.forEach(k => nfeSel.add(new Option(k, k)));
  nfeSel.value = ['val/fid', 'val/fd_digits'].find(k => DATA.nfe_metrics.includes(k))
    || DATA.nfe_metrics[0];
  [nfeSel, nfeLog].forEach(e => e.addEventListener('change', drawNfe));
  const div = document.getElementById('nfe-legend');
  nfeLines.forEach((l, i) => {
    const span = div.appendChild(document.createElement('span'));
    span.appendChild(document.createElement('i')).style.background = color(i);
    span.appendChild(document.createTextNode(l.name));
  });
  drawNfe();
}

drawCurves(); drawTrade();
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  document.body.dataset.imagesLoaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.ready = '1';
});
"""


def script_json(data: dict) -> str:
    """JSON to embed in a <script> element: ``<``, ``>`` and ``&`` are written as ``\\u003c``
    etc., so no value (``</script>``, ``<!--<script>``) can close or re-open the element; the
    parsed data are unchanged."""
    text = json.dumps(data)
    for char in "<>&":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text


def render_nfe(data: dict) -> str:
    """The quality-against-NFE panel, where a run has an nfe.csv (drawn by the script)."""
    if not data["nfe_metrics"]:
        return ""
    return """<div class="panel" id="nfe-panel"><h2>Quality against NFE</h2>
<label>metric <select id="nfe-metric"></select></label>
<label><input type="checkbox" id="nfe-log"> log y</label><br>
<svg id="nfe" width="560" height="360"></svg><div class="legend" id="nfe-legend"></div></div>"""


def render(data: dict) -> str:
    runs = data["runs"]
    done = sum(r["status"] == "completed" for r in runs)
    payload = script_json(data)
    title = f"genlab: {Path(data['root']).name}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head>
<body data-runs="{len(runs)}">
<h1>{html.escape(title)}</h1>
<div class="meta">{html.escape(data["root"])} · {len(runs)} runs, {done} completed ·
generated {html.escape(data["generated"])} by <code>python -m genlab.dashboard</code></div>
<h2>Runs</h2>
<div class="meta">Click a header to sort; ↓ lower is better, ↑ higher is better; the best value
of each metric is bold.</div>
{render_table(data)}
{render_agreement(data)}
<div class="row">
<div class="panel"><h2>Trade-offs</h2>
<label>x <select id="trade-x"></select></label><label>y <select id="trade-y"></select></label>
<label><input type="checkbox" id="trade-logx" checked> log x</label><br>
<svg id="trade" width="560" height="360"></svg></div>
<div class="panel"><h2>Curves</h2>
<label>metric <select id="curve-metric"></select></label>
<label>against <select id="curve-x"><option value="step">steps</option>
<option value="time">training time</option></select></label>
<label><input type="checkbox" id="curve-log" checked> log y</label><br>
<svg id="curves" width="560" height="360"></svg><div class="legend" id="curve-legend"></div></div>
{render_nfe(data)}
</div>
<h2>Samples</h2>
{render_samples(data)}
<h2>Configuration differences</h2>
{render_config(data)}
<script id="data" type="application/json">{payload}</script>
<script>{SCRIPT}</script>
</body></html>
"""


def build(root: str | Path, out: str | Path | None = None, max_points: int = 300) -> Path:
    """Write the dashboard of the runs under root; returns the HTML file's path."""
    data = collect(root, max_points)
    out = Path(out) if out is not None else Path(root) / "dashboard.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(render(data), encoding="utf-8")
    tmp.replace(out)
    return out


def run(cfg: DictConfig) -> Path:
    """Build the page as ``cfg`` (a composed ``conf/dashboard.yaml``) says."""
    try:
        path = build(cfg.dir, cfg.out, int(cfg.max_points))
    except FileNotFoundError as err:
        raise UsageError(f"genlab.dashboard: {err}") from None
    print(f"wrote {path} (open it in a browser: file://{path.resolve()})")
    return path


def main(argv: list[str]) -> Path:
    """``python -m genlab.dashboard <argv>`` from Python."""
    return run(compose("dashboard", argv))


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="dashboard")
def cli(cfg: DictConfig) -> None:
    with reported():  # a user error: one line, exit status 1
        run(cfg)


if __name__ == "__main__":
    cli()
