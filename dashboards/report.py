"""One self-contained HTML report per sweep: figures embedded (base64 PNG), the statistics, the
messages about degenerate sweeps, the per-trial results table (with repeated seeds, beside each
trial the means of its configuration, on which the fronts are) and the resolved config. No
external CSS, script or image: the file opens anywhere, including as an MLflow artifact."""

from __future__ import annotations

import base64
import html
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from dashboards.fronts import FINISHED
from references.cache import atomic_write_text

__all__ = ["render_report", "write_report"]

_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto;
       max-width: 1200px; color: #1b1b1b; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.5em; text-align: right; }
th { background: #f4f4f4; } td.text { text-align: left; }
tr.failed td { color: #a93226; } tr.front td { background: #fdf6e3; }
.messages { background: #fef5e7; border-left: 4px solid #e67e22; padding: 0.5em 1em; }
.meta td { text-align: left; } figure { margin: 1em 0; } figure img { max-width: 100%; }
figcaption { font-size: 0.85em; color: #555; } pre { background: #f7f7f7; padding: 1em;
overflow-x: auto; font-size: 0.8em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def _image(png: Path, alt: str, caption: str) -> str:
    data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


_RESULT_COLUMNS = ("trial_id", "direction", "alpha", "beta", "seed", "status", "performance",
                   "best_performance", "alignment", "linear", "alignment_nc", "cka", "rsa",
                   "dead_units", "performance_change", "degradation", "front_up", "front_down")
# With repeated seeds the fronts are on these (dashboards.tables), shown before the flags.
_MEAN_COLUMNS = ("seeds_in_configuration", "performance_mean", "alignment_mean")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _configurations(results: pa.Table, *, usable: bool) -> Counter:
    """(condition, direction, alpha, beta) -> its trials; with ``usable`` only the FINISHED
    ones with a finite alignment and performance (those the statistics use)."""
    return Counter((r["condition"], r["direction"], r["alpha"], r["beta"])
                   for r in results.to_pylist()
                   if not usable or (r["status"] == FINISHED and _finite(r["alignment"])
                                     and _finite(r["performance"])))


def _results_html(results: pa.Table) -> str:
    if results.num_rows == 0:
        return "<p>No trials.</p>"
    repeated = any(n > 1 for n in _configurations(results, usable=False).values())
    order = list(_RESULT_COLUMNS)
    if repeated:
        order[order.index("front_up"):order.index("front_up")] = _MEAN_COLUMNS
    cols = [c for c in order if c in results.column_names]
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = []
    for row in results.to_pylist():
        cls = ("failed" if row["status"] != FINISHED
               else "front" if row["front_up"] or row["front_down"] else "")
        cells = "".join(
            f'<td class="text">{_e(_fmt(row[c]))}</td>' if isinstance(row[c], str)
            else f"<td>{_e(_fmt(row[c]))}</td>" for c in cols)
        body.append(f'<tr class="{cls}">{cells}</tr>')
    why = ("Fronts are computed on each configuration's means over its finished seeds "
           "(performance_mean, alignment_mean; seeds_in_configuration of them): a row is "
           "shaded when its configuration's means are on a front, whatever its own numbers; "
           if repeated else "Rows on a front are shaded; ")
    return (f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
            f"<p>{why}trials that did not finish are red.</p>")


def _statistics_intro(statistics: Mapping[str, Mapping], results: pa.Table) -> str:
    """What the rho and its interval are over: with several seeds of a configuration,
    ``dashboards.statistics`` takes the configurations' means and resamples seeds within them."""
    grouped = list(dict.fromkeys(
        k[0] for k, n in _configurations(results, usable=True).items() if n > 1))
    if not grouped:
        over = ("across the finished trials of each condition, with a percentile bootstrap "
                "interval (trials resampled)")
    elif set(statistics) <= set(grouped):
        over = ("across the configurations of each condition (direction, alpha, beta: each "
                "the mean of its finished seeds), with a percentile bootstrap interval (seeds "
                "resampled within configurations)")
    else:
        over = (f"across the finished trials of each condition, or, where a configuration "
                f"has several seeds ({', '.join(grouped)}), across the configurations' "
                f"means; with a percentile bootstrap interval (trials resampled, or seeds "
                f"resampled within configurations)")
    return (f"<p>Does achieved alignment go with task performance? Spearman's rho {over}, and "
            "whether performance is monotone in signed alpha (mean over betas and seeds at "
            "each alpha).</p>")


def _statistics_html(statistics: Mapping[str, Mapping]) -> str:
    if not statistics:
        return "<p>No trials: no statistics.</p>"
    head = ("<tr><th>condition</th><th>finished / trials</th><th>performance</th>"
            "<th>Spearman rho (alignment, performance)</th><th>95% bootstrap interval</th>"
            "<th>p</th><th>performance in signed alpha</th><th>rho (alpha, performance)</th>"
            "<th>most minus least aligned trial or, with seeds, configuration (points)</th>"
            "<th>notes</th></tr>")
    rows = []
    for cond, s in statistics.items():
        sp, mono = s["spearman"], s["monotonicity"]
        ci = (f"[{_fmt(sp['low'], 3)}, {_fmt(sp['high'], 3)}]"
              if sp["low"] is not None and not math.isnan(sp["low"]) else "")
        trend = mono["trend"] + (" (monotone)" if mono["monotone"] else
                                 " (not monotone)" if mono["monotone"] is False else "")
        notes = " ".join(m for m in (sp["message"], mono["message"]) if m)
        rows.append(
            f'<tr><td class="text">{_e(cond)}</td><td>{s["finished"]} / {s["trials"]}</td>'
            f'<td class="text">{_e(s["performance_metric"] or "")}</td>'
            f"<td>{_e(_fmt(sp['rho'], 3))}</td><td>{_e(ci)}</td>"
            f"<td>{_e(_fmt(sp['p_value'], 3))}</td><td class=\"text\">{_e(trend)}</td>"
            f"<td>{_e(_fmt(mono['rho_alpha'], 3))}</td>"
            f"<td>{_e(_fmt(s.get('gap', {}).get('points'), 3))}</td>"
            f"<td class=\"text\">{_e(notes)}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _paper_html(terms: Mapping[str, Any] | None) -> str:
    """The paper's headline numbers beside this run's, and the comparisons it draws."""
    if not terms or not (terms.get("headlines") or terms.get("comparisons")):
        return ("<p>None of the paper's headline conditions or comparisons is in this "
                "sweep.</p>")
    parts = []
    if terms["headlines"]:
        head = ("<tr><th>condition</th><th>the paper</th><th>measured as</th>"
                "<th>this run</th><th>comparable</th></tr>")
        rows = "".join(
            f'<tr><td class="text">{_e(h["condition"])}</td><td class="text">{_e(h["paper"])}'
            f'</td><td class="text">{_e(h["measured_as"])}</td>'
            f"<td>{_e(_fmt(h['measured'], 3))}</td>"
            f'<td class="text">{_e("yes" if h["comparable"] else h["note"])}</td></tr>'
            for h in terms["headlines"])
        parts.append(f'<table id="paper-headlines">{head}{rows}</table>')
    if terms["comparisons"]:
        head = ("<tr><th>comparison</th><th>most minus least aligned, first (points)</th>"
                "<th>second (points)</th><th>first minus second</th><th>comparable</th></tr>")
        rows = "".join(
            f'<tr><td class="text">{_e(c["what"])}</td><td>{_e(_fmt(c["first_gap"], 3))}</td>'
            f"<td>{_e(_fmt(c['second_gap'], 3))}</td><td>{_e(_fmt(c['difference'], 3))}</td>"
            f'<td class="text">{_e("yes" if c["comparable"] else c["note"])}</td></tr>'
            for c in terms["comparisons"])
        parts.append(f'<table id="paper-comparisons">{head}{rows}</table>')
    return "".join(parts)


def _interval_text(e: Mapping[str, Any], key: str) -> str:
    if e.get(key) is None:
        return ""
    if e.get("low") is None:
        return _fmt(e[key], 3)
    return f"{_fmt(e[key], 3)} [{_fmt(e['low'], 3)}, {_fmt(e['high'], 3)}]"


def _effects_html(sides: Mapping[str, Mapping] | None) -> str:
    """Each side's drop from the baseline with its paired bootstrap interval, the alignment
    it moved, and the same for the negative control beside the condition it controls."""
    if not sides:
        return "<p>No condition has finished trials.</p>"
    head = ("<tr><th>condition</th><th>side</th><th>configurations</th>"
            "<th>drop from baseline, points [95 % CI]</th><th>interval excludes 0</th>"
            "<th>alignment change</th><th>interval over</th></tr>")
    rows, lines = [], []
    for cond, entry in sides.items():
        for side in ("min", "max"):
            e = entry.get(side) or {}
            label = "suppressing (alpha < 0)" if side == "min" else "promoting (alpha > 0)"
            excl = e.get("excludes_zero")
            rows.append(
                f'<tr><td class="text">{_e(cond)}</td><td class="text">{_e(label)}</td>'
                f"<td>{_e(e.get('configurations', 0))}</td>"
                f"<td>{_e(_interval_text(e, 'drop'))}</td>"
                f'<td class="text">{"" if excl is None else ("yes" if excl else "no")}</td>'
                f"<td>{_e(_fmt(e.get('alignment_change'), 3))}</td>"
                f'<td class="text">{_e(entry.get("message") or entry.get("over", ""))}</td>'
                "</tr>")
        versus = entry.get("versus_control")
        if versus:
            for side in ("min", "max"):
                v = versus[side]
                if v.get("drop_difference") is None:
                    continue
                verb = "suppressing" if side == "min" else "promoting"
                ci = ("" if v.get("low") is None else
                      f" (95 % CI {v['low']:.1f} to {v['high']:.1f})")
                lines.append(
                    f"{cond}, {verb}: drop minus the control's drop "
                    f"({versus['control']}) = {v['drop_difference']:.1f} points{ci}: the part "
                    f"of the effect that the reference's image-specific content explains")
    extra = "".join(f"<li>{_e(x)}</li>" for x in lines)
    return (f'<table id="effects">{head}{"".join(rows)}</table>'
            + (f'<ul id="versus-control">{extra}</ul>' if extra else ""))


def render_report(*, title: str, meta: Mapping[str, Any], messages: Sequence[str],
                  statistics: Mapping[str, Mapping], figures: Sequence[tuple[Path, str, str]],
                  results: pa.Table, config: Mapping[str, Any],
                  files: Sequence[str], paper: Mapping[str, Any] | None = None,
                  effects: Mapping[str, Mapping] | None = None) -> str:
    """The report as one HTML string.

    meta : label -> value lines at the top (sweep, experiment, source, ...).
    messages : what is degenerate about the sweep (shown first when present).
    statistics : ``dashboards.statistics.sweep_statistics`` output.
    figures : (png path, alt text, caption), embedded as base64.
    results : the results table; config : the resolved config (shown as JSON);
    files : names of the files written beside the report (linked relatively).
    paper : ``dashboards.paper.paper_terms`` output (the paper's headline numbers beside
    this run's).
    effects : ``dashboards.effects.direction_effects`` output (each side's drop with its
    interval, and the negative control beside its condition).
    """
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    meta_rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in meta.items())
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        (f'<table class="meta">{meta_rows}<tr><th>report written</th><td>{generated}</td>'
         "</tr></table>"),
    ]
    if messages:
        items = "".join(f"<li>{_e(m)}</li>" for m in messages)
        parts.append(f'<div class="messages" id="messages"><strong>Notes on this sweep'
                     f"</strong><ul>{items}</ul></div>")
    parts.append("<h2>Statistics</h2>")
    parts.append(_statistics_intro(statistics, results))
    parts.append(_statistics_html(statistics))
    parts.append("<h2>What each side costs, beside the control</h2>")
    parts.append("<p>Per condition and side: the drop of the side's mean performance from "
                 "the baseline (points; positive = worse) with a 95 % paired bootstrap "
                 "interval over the validation images (and the seeds of each configuration "
                 "when there are several; each trial is compared with the baseline of its "
                 "own seed), and the change of validation alignment. A "
                 "condition ending in <code>_shuffled</code> is a negative control: the same "
                 "trials against the reference shuffled across images. Promoting a shuffled "
                 "reference should not raise alignment with it; what suppressing it costs is "
                 "not explained by what the reference encodes about the images.</p>")
    parts.append(_effects_html(effects))
    parts.append("<h2>In the paper's terms</h2>")
    parts.append("<p>Degradation is the drop from the baseline in points (top-1 percentage "
                 "points or mAP points; positive = worse). The seed paper's headline numbers "
                 "beside what this run measured, and the comparisons between conditions it "
                 "draws; at demo scale none of them is comparable (simulated world, shrunk "
                 "networks).</p>")
    parts.append(_paper_html(paper))
    parts.append("<h2>Figures</h2>")
    parts.extend(_image(png, alt, caption) for png, alt, caption in figures)
    parts.append("<h2>Trials</h2>")
    parts.append(_results_html(results))
    parts.append('<h2>Files</h2><p id="files-where">Beside this report (in the sweep\'s '
                 'output folder, and in its MLflow parent run\'s artifacts):</p><ul>')
    parts.extend(f'<li><a class="beside" href="{_e(name)}">{_e(name)}</a></li>'
                 for name in files)
    parts.append("</ul>")
    parts.append(_ARTIFACT_VIEW_SCRIPT)
    parts.append("<h2>Resolved config</h2>")
    parts.append(f"<pre>{_e(json.dumps(config, indent=2, sort_keys=True, default=str))}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


# MLflow's artifact view shows an HTML artifact as a blob: document in a sandboxed frame, where
# relative links resolve to nothing (and downloads are blocked): the files are then named as
# text, pointing at the artifact list the report sits in.
_ARTIFACT_VIEW_SCRIPT = """<script>
if (location.protocol === "blob:") {
  for (const a of document.querySelectorAll("a.beside")) {
    const name = document.createElement("code");
    name.textContent = a.textContent;
    a.replaceWith(name);
  }
  document.getElementById("files-where").textContent =
    "In this run's artifacts, listed beside this report (and in the sweep's output folder):";
}
</script>"""


def write_report(path: str | Path, **kwargs: Any) -> Path:
    """``render_report(**kwargs)`` written to ``path`` (UTF-8, atomically: the previous
    report or this one, never a truncated one); returns the path."""
    return atomic_write_text(path, render_report(**kwargs))
