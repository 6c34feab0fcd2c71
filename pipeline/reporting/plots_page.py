"""The page `dvc plots show` and `dvc plots diff` write, readable without the internet.

DVC's own page loads vega, vega-lite and vega-embed from a CDN, so on a machine without internet access it
is blank. `.dvc/config` points DVC at `plots_templates/offline.html` instead (`plots.html_template`), a page
with the three libraries inlined. It has no `{scripts}` placeholder, so DVC's CDN tags never enter it.

The libraries come from a pinned package, never copied by hand: `vl-convert-python` (the version pinned in
pyproject's `test` extra) bundles vega-embed, vega-lite and vega with their dependencies into one script.
`python -m pipeline.reporting.plots_page` writes the page again from the installed package, and a test checks
that the committed page is exactly what the pinned package gives.

The page also makes every chart an SVG (vega-embed's `renderer: "svg"`; DVC's own call passes no options),
so the marks can be read, selected and checked, and keeps each chart's view in `window.dvcPlotViews`.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

PAGE = Path(__file__).resolve().parents[2] / "plots_templates" / "offline.html"
VEGA_LITE = "v5.21"  # the newest 5.x the package bundles: plots_templates/*.json are Vega-Lite 5 specs
# What DVC fills in (`dvc_render.html.HTML.embed`): the bundle must not contain them.
PLACEHOLDERS = ("{scripts}", "{plot_divs}", "{refresh_tag}")

_SVG_EMBED = """
(function () {
  // DVC's page calls vegaEmbed('#id', spec) with no options: draw SVG, and keep every view.
  var embed = window.vegaEmbed;
  window.dvcPlotViews = [];
  window.vegaEmbed = function (el, spec, opts) {
    var done = embed(el, spec, Object.assign({renderer: "svg", actions: false}, opts || {}));
    done.then(function (result) { window.dvcPlotViews.push(result.view); });
    return done;
  };
})();
"""

_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:1.5em}"
    "body>div{display:inline-block;vertical-align:top;margin:0 1.5em 1.5em 0}"
)


def bundle() -> tuple[str, str]:
    """(the script, where it came from): vega-embed, vega-lite and vega bundled by vl-convert-python."""
    try:
        import vl_convert
    except ImportError:
        raise SystemExit(
            "vl-convert-python is not installed; it is in the test extra: pip install -e '.[test]'"
        ) from None
    # Its stub asks for a snippet; None bundles the libraries alone, as its docs say.
    script = vl_convert.javascript_bundle(None, vl_version=VEGA_LITE)  # type: ignore[arg-type]
    found = [p for p in PLACEHOLDERS if p in script] + (["</script"] if "</script" in script.lower() else [])
    if found:
        raise SystemExit(f"the bundle contains {found}, which would break the page; pin another version")
    source = (
        f"vega {vl_convert.get_vega_version()}, vega-lite {VEGA_LITE}, vega-embed "
        f"{vl_convert.get_vega_embed_version()}, bundled by vl-convert-python {version('vl-convert-python')}"
    )
    return script, source


def page() -> str:
    """The whole page: DVC's placeholders, the bundle (in a function scope: its top-level names stay out
    of the page's globals, where DVC's inline `var spec` lives) and the SVG wrapper."""
    script, source = bundle()
    return (
        '<!DOCTYPE html>\n<html>\n<head>\n{refresh_tag}\n<meta charset="utf-8">\n'
        "<title>DVC plots: perception-study</title>\n"
        f"<!-- {source}; written by `python -m pipeline.reporting.plots_page` -->\n"
        f"<script>\n(function () {{\n{script}\n}})();\n</script>\n"
        f"<script>{_SVG_EMBED}</script>\n<style>{_STYLE}</style>\n</head>\n<body>\n{{plot_divs}}\n</body>\n"
        "</html>\n"
    )


def write(path: Path = PAGE) -> Path:
    path.write_text(page(), encoding="utf8")
    return path


if __name__ == "__main__":  # not a stage: no stage depends on it (dvc.yaml)
    print(f"wrote {write()}")
