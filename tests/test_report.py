"""The HTML report: content, Pareto logic, and the page as a real headless Chromium renders it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from slimlm.report import build_report, primary_quality
from slimlm.report.svg import pareto_front
from slimlm.store import ResultsStore

MODELS = {  # label: (hellaswag acc_norm, weight bytes, decode tok/s, J/token)
    "default/fp": (0.46, 538e6, 18.0, 1.2),
    "default/rtn8": (0.45, 180e6, 20.0, 1.0),
    "default/rtn4": (0.40, 110e6, 22.0, 0.9),
    "default/bad": (0.30, 300e6, 10.0, 2.0),
}


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.skip("chromium is not installed (apt-get install -y chromium; see scripts/ci-deps.sh)")
    return exe


@pytest.fixture
def report(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    for label, (acc, size, tps, jpt) in MODELS.items():
        store.add_rows([{"task": "hellaswag", "model": label, "recipe": f"steps:\n  - rtn: {{bits: {label[-1]}}}\n", "acc_norm": acc},
                        {"task": "cost", "model": label, "weight_bytes_in_memory": size, "decode_tok_s": tps, "j_per_token": jpt}])
    art = tmp_path / "art"
    art.mkdir()
    errs = {f"model.layers.{i}.mlp.down_proj": 0.01 * (i + 1) for i in range(30)}
    (art / "slimlm.json").write_text(json.dumps({"report": {"steps": [{"method": "rtn", "layer_errors": errs}]}}))
    return build_report(tmp_path / "report.html", db=tmp_path / "r.db", artifacts=[art])


def test_pareto_front():
    pts = [(1.0, 0.5), (2.0, 0.6), (3.0, 0.55), (0.5, 0.2)]  # size (lower better) vs accuracy (higher better)
    assert pareto_front(pts, x_low=True, y_low=False) == [0, 1, 3]
    assert pareto_front(pts, x_low=False, y_low=False) == [1, 2]


def test_report_html_is_self_contained_and_complete(report):
    html = report.read_text()
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in html
    for el in ('id="leaderboard"', 'id="pareto-size"', 'id="pareto-speed"', 'id="pareto-energy"', 'id="layer-errors-0-0"'):
        assert el in html
    assert html.count('class="pt pareto"') == 3 * 3  # fp, rtn8, rtn4 are on every front; "bad" on none
    assert html.count('class="bar"') == 30
    assert "rtn: {bits: 4}" in html  # each point's recipe


def test_primary_quality_prefers_the_most_common_accuracy():
    assert primary_quality({"a": {"piqa acc_norm": 1, "wikitext2 token_perplexity": 9}, "b": {"piqa acc_norm": 1}}) == "piqa acc_norm"


def test_report_in_headless_chromium(report, tmp_path):
    exe = chromium()
    # `#sort=-1` makes the page's own script sort by column 1 (hellaswag acc_norm), descending, at load.
    dom = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", f"file://{report}#sort=-1"],
                         capture_output=True, text=True, timeout=120).stdout
    assert 'data-ready="1"' in dom, "the page's script did not run"
    table = dom[dom.index('id="leaderboard"'):dom.index("</table>")]
    order = re.findall(r"<tr><td>([^<]+)</td>", table)
    assert order[-1] == "default/bad" and order[-2] == "default/rtn4"
    assert re.search(r'<th class="desc">hellaswag acc_norm</th>', table)
    for svg in ("pareto-size", "pareto-speed", "pareto-energy", "layer-errors-0-0"):
        assert f'id="{svg}"' in dom
    shot = tmp_path / "shot.png"
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1300,1500",
                    f"--screenshot={shot}", f"file://{report}"], capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000
