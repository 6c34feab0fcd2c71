"""`dvc plots show` writes a page that a browser draws without the internet (plots_templates/offline.html).

The page's scripts come from the pinned vl-convert-python; the browser test runs the real `dvc plots show`
on the smoke study and opens the page in Chromium with every request off this machine blocked.
"""

from __future__ import annotations

import csv
import shutil

import pytest
import yaml

from tests.conftest import REPO, run_command


def test_the_committed_page_is_what_the_pinned_package_gives() -> None:
    pytest.importorskip("vl_convert", reason="vl-convert-python is in the test extra")
    from pipeline.reporting.plots_page import PAGE, page

    assert PAGE.read_text(encoding="utf8") == page(), "rewrite it: python -m pipeline.reporting.plots_page"


def test_dvc_is_pointed_at_the_offline_page() -> None:
    config = (REPO / ".dvc/config").read_text()
    assert "html_template = ../plots_templates/offline.html" in config
    page = (REPO / "plots_templates/offline.html").read_text(encoding="utf8")
    assert "{plot_divs}" in page and "{scripts}" not in page  # DVC's CDN tags have nowhere to go
    assert "cdn.jsdelivr" not in page and "<script src=" not in page


def _plots_of(root) -> dict[str, dict]:
    """dvc.yaml's top-level plots: title -> definition."""
    return {title: spec for entry in yaml.safe_load((root / "dvc.yaml").read_text())["plots"]
            for title, spec in entry.items()}  # fmt: skip


@pytest.fixture(scope="module")
def chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip(
            "no chromium on this machine (apt-get install -y chromium): the plots page is not checked"
        )
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield browser
        browser.close()


def test_dvc_plots_show_draws_every_plot_with_its_intervals_offline(smoke_study, chromium, tmp_path, capsys):
    out = tmp_path / "dvc_plots"
    run_command(["dvc", "plots", "show", "-o", str(out)], smoke_study)
    context = chromium.new_context(viewport={"width": 1500, "height": 1000})
    off_machine: list[str] = []

    def offline(route) -> None:  # as on a robot lab's machine without internet access
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            off_machine.append(route.request.url)
            route.abort()

    context.route("**/*", offline)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto((out / "index.html").as_uri())
    plots = _plots_of(smoke_study)
    page.wait_for_function(
        f"window.dvcPlotViews && window.dvcPlotViews.length >= {len(plots)}", timeout=30_000
    )
    assert not errors and not off_machine, (errors, off_machine)

    charts = page.locator("body > div")
    assert charts.count() == len(plots)  # every plot of dvc.yaml, and nothing else
    for i, (title, spec) in enumerate(plots.items()):
        chart = charts.nth(i)
        assert chart.locator("svg").count() == 1, title
        (data_file,) = spec["y"]
        assert chart.locator("g.mark-symbol path, g.mark-line path").count() > 0, title  # the values
        columns = next(csv.reader(open(smoke_study / data_file)))
        if any(c.endswith(("_lo", "_hi")) for c in columns):  # their intervals, as error bars
            assert chart.locator("g.mark-rule line").count() > 0, title
    shot = tmp_path / "dvc_plots.png"
    page.screenshot(path=shot, full_page=True)
    with capsys.disabled():
        print(f"\ndvc plots page screenshot: {shot}")
    context.close()
