"""Comparison tables of a campaign's results and the campaign report (``report.md`` and a
self-contained ``report.html``), rendered from plain dicts.

A cell is a dict with ``model``, ``method``, ``top_up``, ``sparsity`` and ``metrics`` (``{"ppl":
{corpus: value}, "tasks": {task: {"acc": value}}}``, None when the cell failed); the report also
reads ``status``, ``achieved_sparsity`` and ``timings``. A baseline holds ``model`` and ``metrics``.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable, Mapping

from neuroal.history import history_section
from neuroal.metrics import mean_accuracy, relative_change

CellText = Callable[[dict, "dict | None"], str]
LINE_BREAK = "<br>"  # inside a markdown table cell: GitHub renders it, and so does markdown_to_html


def comparison_table(cells: list[dict], baselines: list[dict], corpus: str | None = None, *,
                     title: str = "{model}: perplexity on {corpus} (mean zero-shot accuracy)",
                     cell_text: CellText | None = None) -> str:
    """A markdown table per model: rows method x top-up, columns sparsity, the dense model first.

    Args:
        cells: The cells (see the module docstring); a cell without metrics reads "failed".
        baselines: The dense models' results.
        corpus: The corpus whose perplexity the default ``cell_text`` shows.
        title: Heading of each table, formatted with ``model`` and ``corpus``.
        cell_text: ``f(entry, uniform)`` -> the text of one table cell, where ``uniform`` is the
            uniform cell of the same model, method and sparsity (None for uniform rows and the
            dense model). Default: perplexity on ``corpus`` and, when tasks were run, the mean
            zero-shot accuracy in brackets.
    """
    cell_text = cell_text or (lambda entry, _uniform: _cell(entry.get("metrics"), corpus))
    lines = []
    for model in dict.fromkeys(c["model"] for c in [*baselines, *cells]):
        mine = [c for c in cells if c["model"] == model]
        sparsities = sorted({c["sparsity"] for c in mine})
        lines += [f"### {title.format(model=model, corpus=corpus)}", "",
                  "| method | top-up | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |",
                  "|---|---|" + "---|" * len(sparsities)]
        for base in (b for b in baselines if b["model"] == model):
            lines.append(f"| dense | | {cell_text(base, None)} |" + " |" * (len(sparsities) - 1))
        for method, top_up in dict.fromkeys((c["method"], c["top_up"]) for c in mine):
            row = {c["sparsity"]: c for c in mine if (c["method"], c["top_up"]) == (method, top_up)}
            uniform = {} if top_up == "uniform" else {
                c["sparsity"]: c for c in mine if (c["method"], c["top_up"]) == (method, "uniform")}
            values = [cell_text(row[s], uniform.get(s)) if s in row else "-" for s in sparsities]
            lines.append(f"| {method} | {top_up} | " + " | ".join(values) + " |")
        lines.append("")
    return "\n".join(lines)


def quality_text(corpora: list[str], line_break: str = LINE_BREAK) -> CellText:
    """A ``cell_text`` for :func:`comparison_table`: perplexity on each corpus with its change
    against uniform (``-12.3%``), then the mean zero-shot accuracy with its change in points."""

    def text(entry: dict, uniform: dict | None) -> str:
        metrics = entry.get("metrics")
        if not metrics:
            return entry.get("status") or "failed"
        reference = (uniform or {}).get("metrics") or {}
        lines = [f"{corpus} {_ppl_with_change(metrics, reference, corpus)}" for corpus in corpora]
        accuracy = mean_accuracy(metrics)
        if accuracy is not None:
            lines.append(f"acc {accuracy:.3f}{_points(accuracy, mean_accuracy(reference))}")
        return line_break.join(lines) or "-"

    return text


def cost_text(entry: dict, _uniform: dict | None = None) -> str:
    """A ``cell_text`` for :func:`comparison_table`: achieved sparsity, pruning and evaluation time."""
    if not entry.get("metrics"):
        return entry.get("status") or "failed"
    timings = entry.get("timings") or {}
    prune = sum(v for k, v in timings.items() if not k.startswith("eval."))
    evaluation = sum(v for k, v in timings.items() if k.startswith("eval."))
    achieved = entry.get("achieved_sparsity")
    parts = [f"{achieved:.2%}" if achieved is not None else "-"]
    parts += [f"prune {_seconds(prune)}"] if prune else []
    parts += [f"eval {_seconds(evaluation)}"] if evaluation else []
    return " · ".join(parts)


def render_markdown(report: dict) -> str:
    """The campaign report as markdown.

    Args:
        report: ``experiment``, ``tracking_uri``, ``campaign`` (``run_id``, ``status``, ``started``,
            ``git_revision``, ``settings``: flat key paths -> values), ``corpora``, ``tasks``,
            ``cells``, ``baselines`` (see the module docstring; cells also carry ``name``,
            ``run_id`` and ``campaign_run_id``), ``figures`` (``model``, ``title``, ``file``,
            ``history`` for those of the history section, in order) and optionally ``history``
            (the last campaigns, see ``neuroal.history``).
    """
    campaign = report["campaign"]
    lines = [f"# Campaign report: {report['experiment']}", "",
             f"Campaign run `{campaign['run_id']}` ({campaign['status']}), started {campaign['started']}"
             + (f", git `{campaign['git_revision']}`" if campaign.get("git_revision") else "")
             + f"; MLflow `{report['tracking_uri']}`.", "",
             "Settings: " + ", ".join(f"`{k}={v}`" for k, v in campaign["settings"].items()) + ".", ""]
    for model in dict.fromkeys(c["model"] for c in [*report["baselines"], *report["cells"]]):
        lines += _model_section(report, model)
    if report.get("history"):
        lines += history_section(report["history"], report["corpora"], [f for f in report["figures"] if f.get("history")])
    reused = [c for c in report["cells"] if c.get("run_id") and c.get("campaign_run_id") != campaign["run_id"]]
    if reused:
        lines += ["## Cells from earlier campaign runs", "",
                  "Not logged by this campaign run; the latest finished run of the same configuration:", ""]
        lines += [f"- {c['name']}: run `{c['run_id']}` of campaign run `{c['campaign_run_id']}`" for c in reused]
        lines.append("")
    return "\n".join(lines)


_COST_LEGEND = ("Achieved sparsity of the decoder blocks' linear weights, then the time to prune "
                "(load, allocate, prune) and to evaluate the cell.")


def _model_section(report: dict, model: str) -> list[str]:
    cells = [c for c in report["cells"] if c["model"] == model]
    baselines = [b for b in report["baselines"] if b["model"] == model]
    tasks = ", ".join(report["tasks"])
    legend = ("The dense row is the unpruned model. Perplexity on each corpus (lower is better)"
              + (f" and mean zero-shot accuracy over {tasks} (`acc`)" if tasks else "")
              + "; in brackets the change against the uniform cell of the same method and sparsity"
              + (" (accuracy: in points)" if tasks else "") + ".")
    lines = [f"## {model}", "",
             comparison_table(cells, baselines, title="Perplexity and zero-shot accuracy",
                              cell_text=quality_text(report["corpora"])), legend, "",
             comparison_table(cells, [], title="Achieved sparsity and time", cell_text=cost_text),
             _COST_LEGEND, ""]
    figures = [f for f in report["figures"] if f["model"] == model and not f.get("history")]
    if figures:
        lines += ["### Plots", ""]
        for figure in figures:
            lines += [f"![{figure['title']}]({figure['file']})", ""]
    return lines


def markdown_to_html(markdown: str, images: Mapping[str, bytes], title: str) -> str:
    """A self-contained HTML page of the report's markdown (CommonMark and tables, through
    markdown-it-py): images embedded as base64 data URIs, inline CSS, nothing external, and the
    changes against uniform coloured better or worse.

    Args:
        markdown: The report's markdown.
        images: PNG bytes by the file name the markdown refers to.
        title: The page title.

    Raises:
        KeyError: An image the markdown refers to is not in ``images``.
    """
    from markdown_it import MarkdownIt

    renderer = MarkdownIt("commonmark", {"html": True}).enable("table")  # html: the cells' <br>
    default_image = renderer.renderer.rules["image"]

    def embedded_image(_renderer, tokens, index, options, env):
        image = tokens[index]
        data = base64.b64encode(images[image.attrGet("src")]).decode("ascii")
        image.attrSet("src", f"data:image/png;base64,{data}")
        return default_image(tokens, index, options, env)

    renderer.add_render_rule("image", embedded_image)
    body = _PPL_CHANGE.sub(lambda m: _change_span(m, better_sign="-"), renderer.render(markdown))
    body = _ACC_CHANGE.sub(lambda m: _change_span(m, better_sign="+"), body)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head>\n<body>\n{body}</body></html>\n")


_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color: #1b1f24;
       max-width: 1200px; margin: 2em auto; padding: 0 1.5em; }
h1 { font-size: 1.7em; border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }
h2 { font-size: 1.35em; margin-top: 2em; border-bottom: 1px solid #d0d7de; padding-bottom: .2em; }
h3 { font-size: 1.1em; margin-top: 1.6em; }
code { font: .9em ui-monospace, "DejaVu Sans Mono", monospace; background: #f3f4f6; padding: .1em .3em;
       border-radius: 3px; overflow-wrap: anywhere; }
table { border-collapse: collapse; margin: .5em 0 1.2em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d7de; padding: .35em .7em; vertical-align: top; text-align: left; }
th { background: #f6f8fa; }
tbody tr:nth-child(even) { background: #fafbfc; }
td { white-space: nowrap; }
.better { color: #1a7f37; } .worse { color: #cf222e; }
img { max-width: 100%; height: auto; display: block; margin: .5em 0 1.5em; border: 1px solid #eaeef2; }
"""
# A change in brackets, made by quality_text and neuroal.history: perplexity (lower is better) or
# accuracy points; a change that rounds to zero keeps the text's colour.
_PPL_CHANGE = re.compile(r"\(([+-])((\d+(?:\.\d+)?)%)\)")
_ACC_CHANGE = re.compile(r"\(([+-])((\d+(?:\.\d+)?) pt)\)")


def _change_span(match: re.Match, better_sign: str) -> str:
    if float(match[3]) == 0:
        return match[0]
    css = "better" if match[1] == better_sign else "worse"
    return f'(<span class="{css}">{match[1]}{match[2]}</span>)'


def _ppl_with_change(metrics: dict, reference: dict, corpus: str) -> str:
    ppl = (metrics.get("ppl") or {}).get(corpus)
    if ppl is None:
        return "-"
    change = relative_change(ppl, (reference.get("ppl") or {}).get(corpus))
    return f"{ppl:.2f}" + (f" ({change:+.1%})" if change is not None else "")


def _points(accuracy: float, reference: float | None) -> str:
    return f" ({(accuracy - reference) * 100:+.1f} pt)" if reference is not None else ""


def _seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 100 else f"{seconds:.0f} s"


def _cell(metrics: dict | None, corpus: str) -> str:
    if not metrics:
        return "failed"
    ppl = metrics.get("ppl", {}).get(corpus)
    text = f"{ppl:.2f}" if ppl is not None else "-"
    acc = mean_accuracy(metrics)
    return text + (f" ({acc:.3f})" if acc is not None else "")
