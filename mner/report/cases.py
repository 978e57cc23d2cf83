"""Case studies: ``cases.html`` (every test tweet, filterable) and ``cases.png`` (a figure).

Every seed paper shows a case-study figure: a few tweets, their images, and each model's
entities. ``cases.html`` is that for the whole test split, as one self-contained static
page (thumbnails embedded as JPEG data URIs, styles and the filter script inline: no
server, no network): per tweet the image, the gold entities, and one line per model with
its entities highlighted by type, wrong ones (spurious, wrong type, wrong boundary)
struck through in red and missed gold ones listed after them. Each row's predictions are
those of its best seed on dev.

Filters: image-dependent entities only, models disagree, one model right and another
wrong (both picked), errors of one type. Cases are sorted so the most instructive come
first: where the baseline (the text-only row, ``report.baseline``) is wrong and another
model is right, then where the models disagree, then where all are wrong, then the rest;
within each group image-dependent tweets and tweets with more entities first.

``cases.png`` draws the first ``report.case_figure`` cases of that order the way papers
do: the image beside the tweet, one line per model.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mner.data.conll import TYPES
from mner.data.images import check_image, find_image
from mner.report.predictions import Entity, RowPredictions, TestSet

#: Highlight colours per type (colour-blind-safe Okabe-Ito hues); other types grey.
COLORS: dict[str, str] = {"PER": "#E69F00", "LOC": "#56B4E9", "ORG": "#009E73", "MISC": "#CC79A7"}
OTHER_COLOR = "#999999"
WRONG = "#D55E00"


@dataclass
class Case:
    """One test tweet with every row's entities.

    Attributes:
        index: the tweet's position in the test file.
        preds: per row (in row order), the predicted entities of its best seed.
        right: indexes of the rows whose entities equal the gold ones.
        error_types: types of the wrong or missed entities of any row.
        group: 3 baseline wrong and another row right, 2 rows disagree, 1 all wrong, 0
            all right (the sort key; higher first).
    """

    index: int
    preds: list[set[Entity]]
    right: list[int]
    error_types: list[str]
    group: int

    @property
    def disagree(self) -> bool:
        return len({frozenset(p) for p in self.preds}) > 1


def build_cases(test: TestSet, rows: Sequence[RowPredictions], baseline: int | None) -> list[Case]:
    """Every test tweet as a :class:`Case`, most instructive first.

    Args:
        test: the gold split.
        rows: each row's predictions (rows without predictions are left out by the caller).
        baseline: index in ``rows`` of the baseline row, or None.
    """
    cases = []
    for i, gold in enumerate(test.gold):
        preds = [r.seeds[r.best_seed][i] for r in rows]
        right = [k for k, p in enumerate(preds) if p == gold]
        errors = sorted({t for p in preds for t, _, _ in (p ^ gold)}, key=_type_order)
        if baseline is not None and baseline not in right and right:
            group = 3
        elif len({frozenset(p) for p in preds}) > 1:
            group = 2
        elif not right:
            group = 1
        else:
            group = 0
        cases.append(Case(i, preds, right, errors, group))
    cases.sort(key=lambda c: (-c.group, -bool(test.image_dependent[c.index]),
                              -len(test.gold[c.index]), c.index))
    return cases


def _type_order(t: str) -> tuple[int, str]:
    return (TYPES.index(t) if t in TYPES else len(TYPES), t)


def thumbnail(test: TestSet, image_id: str, size: int) -> tuple[str | None, str]:
    """A JPEG data URI of the tweet's image at most ``size`` px, or None and the status."""
    if test.images_dir is None:
        return None, "no images folder"
    path = find_image(test.images_dir, image_id)
    status = check_image(path)
    if status.value != "ok" or path is None:
        return None, status.value
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), "ok"


def _spans_html(tokens: Sequence[str], pred: set[Entity], gold: set[Entity], *, is_gold: bool) -> str:
    """The tweet with ``pred``'s entities highlighted; wrong ones marked against ``gold``."""
    starts = {s: (t, e) for t, s, e in pred}
    gold_at = {(s, e): t for t, s, e in gold}
    out, i = [], 0
    while i < len(tokens):
        if i in starts:
            typ, end = starts[i]
            words = html.escape(" ".join(tokens[i:end]))
            if is_gold or (typ, i, end) in gold:
                cls, title = "ok", typ
            elif (i, end) in gold_at:
                cls, title = "bad", f"predicted {typ}, gold {gold_at[(i, end)]}"
            else:
                cls, title = "bad", f"predicted {typ}, not a gold entity"
            out.append(f'<span class="ent {cls}" data-type="{html.escape(typ)}" '
                       f'style="--c:{COLORS.get(typ, OTHER_COLOR)}" title="{html.escape(title)}">'
                       f'{words}<sup>{html.escape(typ)}</sup></span>')
            i = end
        else:
            out.append(html.escape(tokens[i]))
            i += 1
    text = " ".join(out)
    if not is_gold:
        missed = sorted(gold - pred, key=lambda x: x[1])
        if missed:
            text += ' <span class="missed">missed: ' + ", ".join(
                f'<span class="ent miss" data-type="{html.escape(t)}" '
                f'style="--c:{COLORS.get(t, OTHER_COLOR)}">{html.escape(" ".join(tokens[s:e]))}'
                f"<sup>{html.escape(t)}</sup></span>" for t, s, e in missed) + "</span>"
    return text


_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:8px 16px;z-index:1}
header h1{font-size:18px;margin:0 0 6px}
header label{margin-right:14px;white-space:nowrap}
.legend span{margin-right:10px}
main{padding:8px 16px}
.case{display:flex;gap:12px;background:#fff;border:1px solid #e3e3e3;border-radius:6px;
 padding:8px;margin:8px 0}
.case img,.noimg{width:var(--thumb);min-width:var(--thumb);height:auto;border-radius:4px}
.noimg{height:calc(var(--thumb)*0.75);background:#eee;color:#777;display:flex;align-items:center;
 justify-content:center;font-size:12px}
table.lines{border-collapse:collapse}
table.lines td{padding:2px 8px 2px 0;vertical-align:top}
td.who{color:#555;white-space:nowrap;font-size:12px}
tr.gold td{border-bottom:1px solid #eee}
.ent{background:color-mix(in srgb,var(--c) 35%,white);border:2px solid var(--c);border-radius:4px;
 padding:0 3px}
.ent sup{font-size:9px;font-weight:600;margin-left:2px}
.ent.bad{border-color:#D55E00;text-decoration:line-through;text-decoration-color:#D55E00}
.ent.miss{background:#fff;border-style:dashed}
.missed{color:#D55E00;font-size:12px;margin-left:6px}
.meta{color:#777;font-size:12px}
.hidden{display:none}
"""

_JS = """
const cases=[...document.querySelectorAll('.case')];
const $=id=>document.getElementById(id);
function apply(){
  const dep=$('f-imgdep').checked, dis=$('f-disagree').checked;
  const r=$('f-right').value, w=$('f-wrong').value, t=$('f-errtype').value, d=$('f-dataset').value;
  let n=0;
  for(const c of cases){
    const right=c.dataset.right.split(' ');
    const ok=(!dep||c.dataset.imgdep==='1')&&(!dis||c.dataset.disagree==='1')
      &&(!r||right.includes(r))&&(!w||!right.includes(w))
      &&(!t||c.dataset.errtypes.split(' ').includes(t))&&(!d||c.dataset.dataset===d);
    c.classList.toggle('hidden',!ok); if(ok)n++;
  }
  $('shown').textContent=n;
}
for(const id of ['f-imgdep','f-disagree','f-right','f-wrong','f-errtype','f-dataset'])
  $(id).addEventListener('change',apply);
apply();
"""


def render_html(title: str, datasets: Sequence[tuple[str, TestSet, Sequence[RowPredictions], list[Case]]],
                thumb: int = 128) -> str:
    """The self-contained ``cases.html``.

    Args:
        title: the page heading.
        datasets: ``(name, test set, rows, cases)`` per dataset (cases from :func:`build_cases`).
        thumb: thumbnail size in px.
    """
    labels = list(dict.fromkeys(r.label for _, _, rows, _ in datasets for r in rows))
    types = sorted({t for _, test, _, _ in datasets for g in test.gold for t, _, _ in g}, key=_type_order)
    any_marks = any(test.has_marks for _, test, _, _ in datasets)
    model_opts = "".join(f'<option value="m{k}">{html.escape(lab)}</option>' for k, lab in enumerate(labels))
    type_opts = "".join(f"<option>{html.escape(t)}</option>" for t in types)
    ds_opts = "".join(f"<option>{html.escape(n)}</option>" for n, *_ in datasets)
    legend = "".join(
        f'<span><span class="ent ok" style="--c:{c}">{t}</span></span>' for t, c in COLORS.items()
    ) + ('<span><span class="ent bad" style="--c:#999">wrong</span></span>'
         '<span><span class="ent miss" style="--c:#999">missed</span></span>')
    total = sum(len(cases) for *_, cases in datasets)
    head = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)} — cases</title>", f"<style>{_CSS}</style></head>",
        f'<body style="--thumb:{thumb}px"><header>',
        f"<h1>{html.escape(title)}: test cases (<span id=\"shown\">{total}</span> of {total} shown)</h1>",
        "<div>",
        f'<label><input type="checkbox" id="f-imgdep"{"" if any_marks else " disabled"}> '
        "image-dependent only</label>",
        '<label><input type="checkbox" id="f-disagree"> models disagree</label>',
        f'<label>right: <select id="f-right"><option value="">any</option>{model_opts}</select></label>',
        f'<label>wrong: <select id="f-wrong"><option value="">any</option>{model_opts}</select></label>',
        f'<label>errors of type: <select id="f-errtype"><option value="">any</option>{type_opts}</select></label>',
        f'<label{"" if len(datasets) > 1 else " class=hidden"}>dataset: <select id="f-dataset">'
        f'<option value="">all</option>{ds_opts}</select></label>',
        "</div>", f'<div class="legend meta">{legend} Each model: its best seed on dev.</div>',
        "</header><main>",
    ]
    body = []
    for name, test, rows, cases in datasets:
        idx = {r.label: labels.index(r.label) for r in rows}
        for case in cases:
            tw = test.tweets[case.index]
            gold = test.gold[case.index]
            uri, status = thumbnail(test, tw.image_id, thumb)
            img = (f'<img src="{uri}" alt="image {html.escape(tw.image_id)}">' if uri else
                   f'<div class="noimg">image {html.escape(status)}</div>')
            lines = [f'<tr class="gold"><td class="who">gold</td><td>'
                     f"{_spans_html(tw.tokens, gold, gold, is_gold=True)}</td></tr>"]
            for r, pred in zip(rows, case.preds, strict=True):
                mark = "✓" if pred == gold else "✗"
                lines.append(f'<tr class="model" data-model="m{idx[r.label]}"><td class="who">'
                             f"{mark} {html.escape(r.label)}</td><td>"
                             f"{_spans_html(tw.tokens, pred, gold, is_gold=False)}</td></tr>")
            attrs = {
                "dataset": name,
                "imgdep": "1" if test.image_dependent[case.index] else "0",
                "disagree": "1" if case.disagree else "0",
                "right": " ".join(f"m{idx[rows[k].label]}" for k in case.right),
                "errtypes": " ".join(case.error_types),
                "group": str(case.group),
            }
            data = " ".join(f'data-{k}="{html.escape(v)}"' for k, v in attrs.items())
            body.append(
                f'<div class="case" id="{html.escape(name)}-{case.index}" {data}>{img}<div>'
                f'<div class="meta">{html.escape(name)} · tweet {case.index} · IMGID:'
                f"{html.escape(tw.image_id)}</div>"
                f'<table class="lines">{"".join(lines)}</table></div></div>'
            )
    return "\n".join(head + body + ["</main>", f"<script>{_JS}</script>", "</body></html>"]) + "\n"


def render_figure(test: TestSet, rows: Sequence[RowPredictions], cases: Sequence[Case], path: Path,
                  *, title: str = "") -> bool:
    """``cases.png``: each case's image beside its tweet, one line per model (paper style).

    Returns:
        False (nothing written) when there is no case.
    """
    if not cases:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    n_lines = [1 + len(rows) for _ in cases]
    line_h = 0.32
    heights = [max(1.5, (n + 0.6) * line_h) for n in n_lines]
    fig = plt.figure(figsize=(11, sum(heights) + 0.6), dpi=110)
    top = 1.0 - 0.4 / (sum(heights) + 0.6)
    renderer = fig.canvas.get_renderer()
    y0 = top
    for case, h in zip(cases, heights, strict=True):
        frac = h / (sum(heights) + 0.6)
        tw = test.tweets[case.index]
        ax_img = fig.add_axes((0.01, y0 - frac + 0.01, 0.14, frac - 0.02))
        ax_img.axis("off")
        uri, status = thumbnail(test, tw.image_id, 256)
        if uri:
            from PIL import Image

            with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
                ax_img.imshow(im.convert("RGB"))
        else:
            ax_img.text(0.5, 0.5, f"image\n{status}", ha="center", va="center", fontsize=8, color="#777")
        ax = fig.add_axes((0.17, y0 - frac, 0.82, frac))
        ax.axis("off")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        gold = test.gold[case.index]
        who = ["gold", *(("✓ " if p == gold else "✗ ") + r.label for r, p in zip(rows, case.preds, strict=True))]
        sets = [gold, *case.preds]
        step = 1.0 / (len(who) + 0.6)
        for k, (label, ents) in enumerate(zip(who, sets, strict=True)):
            y = 1 - (k + 0.8) * step
            ax.text(0.0, y, label, fontsize=8, color="#555", va="center")
            _draw_tokens(ax, renderer, tw.tokens, ents, gold, x=0.17, y=y, is_gold=(k == 0))
        y0 -= frac
    handles = [Patch(facecolor=c, label=t) for t, c in COLORS.items()]
    handles.append(Patch(facecolor="white", edgecolor=WRONG, label="wrong"))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, x=0.01, ha="left", fontsize=9, y=0.995)
    fig.savefig(path, format="png")
    plt.close(fig)
    return True


def _draw_tokens(ax, renderer, tokens, ents, gold, *, x: float, y: float, is_gold: bool) -> None:
    """Tokens left to right from ``x``; entity tokens boxed in their type's colour."""
    typ_at = {}
    for t, s, e in ents:
        for i in range(s, e):
            typ_at[i] = (t, is_gold or (t, s, e) in gold)
    inv = ax.transData.inverted()
    for i, tok in enumerate(tokens):
        style = {}
        if i in typ_at:
            t, ok = typ_at[i]
            style["bbox"] = {"boxstyle": "round,pad=0.15", "facecolor": COLORS.get(t, OTHER_COLOR),
                             "edgecolor": COLORS.get(t, OTHER_COLOR) if ok else WRONG,
                             "linewidth": 0.6 if ok else 1.6}
        txt = ax.text(x, y, tok, fontsize=8.5, va="center", **style)
        box = txt.get_window_extent(renderer)
        x = inv.transform((box.x1, box.y0))[0] + 0.006
        if x > 0.98:
            break


def case_payload(test: TestSet, rows: Sequence[RowPredictions], cases: Sequence[Case]) -> list[dict]:
    """The cases as JSON-ready records (what the page shows), for tests and other tools."""
    out = []
    for c in cases:
        tw = test.tweets[c.index]
        out.append({
            "index": c.index, "image_id": tw.image_id, "group": c.group,
            "image_dependent": bool(test.image_dependent[c.index]), "disagree": c.disagree,
            "right": [rows[k].label for k in c.right], "error_types": c.error_types,
        })
    return out

