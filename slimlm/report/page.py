"""The report's HTML shell: styles and the table-sorting script, all inline."""

from __future__ import annotations

from html import escape

STYLE = """body{font:14px system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}
th{background:#eef;cursor:pointer;user-select:none}th.asc:after{content:" ▲"}th.desc:after{content:" ▼"}
.plots{display:flex;flex-wrap:wrap;gap:12px}.axis{stroke:#444}.front{fill:none;stroke:#d33;stroke-width:1.5}
.pt{fill:#fff;stroke:#36c;stroke-width:2}.pt.pareto{fill:#36c}.title{font-weight:600;font-size:13px}
.tick,.ptlabel{font-size:10px;fill:#555}.label{font-size:11px}.bar{fill:#36c}pre{background:#f6f6f6;padding:6px}"""

# Click a header to sort (numbers by data-v, empty last); `#sort=N` or `#sort=-N` sorts at load.
SCRIPT = """function sortBy(col,desc){const t=document.getElementById('leaderboard'),b=t.tBodies[0];
const rows=[...b.rows];const key=r=>{const c=r.cells[col],v=c.dataset.v;return v===undefined?c.textContent:(v===''?null:+v)};
rows.sort((a,c)=>{const x=key(a),y=key(c);if(x===null)return 1;if(y===null)return -1;
const s=typeof x==='number'?x-y:String(x).localeCompare(String(y));return desc?-s:s});rows.forEach(r=>b.appendChild(r));
[...t.tHead.rows[0].cells].forEach((h,i)=>{h.className=i===col?(desc?'desc':'asc'):''})}
document.querySelectorAll('#leaderboard th').forEach((h,i)=>h.addEventListener('click',()=>sortBy(i,h.className==='asc')));
const m=location.hash.match(/sort=(-?)(\\d+)/);if(m)sortBy(+m[2],m[1]==='-');document.body.dataset.ready='1';"""


def page(head: list[str], body: list[str], plots: list[str], charts: list[str], recipes: str, primary: str | None,
         db: str, n_models: int, routing: str = "") -> str:
    ths = "".join(f"<th>{escape(h)}</th>" for h in head)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>slimlm report</title><style>{STYLE}</style></head>
<body><h1>slimlm leaderboard</h1><p>{n_models} models from <code>{escape(db)}</code>. Click a column to sort.
Filled points are Pareto-optimal (no other model is both better and cheaper); hover a point for its recipe.</p>
<table id="leaderboard"><thead><tr>{ths}</tr></thead><tbody>{''.join(body)}</tbody></table>
<h2>Pareto plots ({escape(primary or 'no quality metric yet')})</h2><div class="plots">{''.join(plots)}</div>
<h2>Per-layer errors of compressed artifacts</h2><div id="layer-errors">{''.join(charts) or '<p>no artifacts with layer errors</p>'}</div>
{routing}<h2>Recipes</h2><div id="recipes">{recipes}</div>
<script>{SCRIPT}</script></body></html>"""
