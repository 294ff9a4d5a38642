"""The explorers' static fallback: displayed, an explorer emits the live widget and an HTML rendering of
its default setting, and nbconvert's HTML of an executed notebook shows that rendering."""
import base64
import json
import re

import pytest

ipywidgets = pytest.importorskip("ipywidgets")

import kvlab  # noqa: E402
from kvlab import widgets  # noqa: E402

VIEW = "application/vnd.jupyter.widget-view+json"


@pytest.fixture(scope="module")
def shell():
    from IPython.core.interactiveshell import InteractiveShell
    return InteractiveShell.instance()


@pytest.fixture(scope="module")
def loaded():
    return kvlab.load()


def shown(shell, obj) -> list[dict]:
    """The outputs ``display(obj)`` publishes, as mimebundles."""
    from IPython.display import display
    from IPython.utils.capture import capture_output

    with capture_output() as cap:
        display(obj)
    return [o.data for o in cap.outputs]


def static_of(outputs) -> str:
    """The one HTML output that carries the static block."""
    blocks = [o["text/html"] for o in outputs if widgets.STATIC_CLASS in o.get("text/html", "")]
    assert len(blocks) == 1, f"expected one static block, got {len(blocks)} in {[list(o) for o in outputs]}"
    return blocks[0]


def test_interactive_output_shows_widget_then_default_figure_as_png(shell):
    import matplotlib.pyplot as plt

    calls = []

    def show(n):
        calls.append(n)
        fig, ax = plt.subplots(figsize=(2, 1.5))
        ax.plot(range(n))
        plt.show()

    slider = ipywidgets.IntSlider(value=3, min=2, max=9)
    ex = widgets.interactive_output(show, n=slider)
    assert calls == [3]                         # the default view is computed once
    outputs = shown(shell, ex)
    assert VIEW in outputs[0] and outputs[0][VIEW]["model_id"] == ex.model_id
    html = static_of(outputs)
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    assert len(pngs) == 1 and base64.b64decode(pngs[0])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.get_fignums()                # the figure was closed after rendering
    slider.value = 5                            # a change re-runs fn; the static view stays the default's
    assert calls == [3, 5] and ex.static_html in html


def test_error_in_default_view_raises():
    def boom(x):
        raise RuntimeError("no such layer")

    with pytest.raises(RuntimeError, match="no such layer"):
        widgets.interactive_output(boom, x=ipywidgets.IntText(value=1))


def test_lens_static_view_is_the_default_prompts_table(shell, loaded):
    from kvlab.lens import residual_stream

    model, tok, arch = loaded
    prompt = "Uwe Keller was born in"
    html = static_of(shown(shell, widgets.explore_lens(model, tok, prompt)))
    final = tok.decode([int(residual_stream(model, tok, [prompt])["final"][0])])
    assert "<table>" in html and f"<code>{final}</code>" in html
    assert html.count("<tr>") == arch.n_layers + 1          # header + one row per layer
    assert "display: none" in html and ".jp-LabShell" in html   # hidden where Lab draws the widget


def test_editing_static_view_is_the_default_edit(shell, loaded):
    from kvlab.data import load_counterfact
    from kvlab.editing import EditRequest, ft_values, same_weights, snapshot

    model, tok, arch = loaded
    req = EditRequest.from_counterfact(load_counterfact(model=model)[0])
    saved = snapshot(model)
    editors = {"FT-values": lambda m, t, r: ft_values(m, t, r, layers=[0], steps=2, lr=1e-2)}
    html = static_of(shown(shell, widgets.explore_editing(model, tok, editors, req.prompt, req.subject,
                                                          req.target_new)))
    assert "before:" in html and "after:" in html and "weights restored after undo: True" in html
    assert same_weights(model, saved)
    empty = static_of(shown(shell, widgets.explore_editing(model, tok, editors)))
    assert "no edit by default" in empty


def test_executed_notebook_html_shows_the_static_view(tmp_path):
    """A notebook executed as papermill does (widget state saved) converts to HTML with the fallback."""
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter   # >= 7.1: 7.0 imported lxml.html.clean, which lxml 5.2 split off

    src = ("import ipywidgets as W\nfrom IPython.display import Markdown, display\nfrom kvlab import widgets\n"
           "widgets.interactive_output(lambda n: display(Markdown(f'**squares:** {[i * i for i in range(n)]}')),"
           " n=W.IntSlider(value=4, min=1, max=9))")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}},
                   store_widget_state=True).execute()
    assert "application/vnd.jupyter.widget-state+json" in nb.metadata["widgets"]
    body, _ = HTMLExporter().from_notebook_node(nb)
    assert widgets.STATIC_CLASS in body and "<strong>squares:</strong> [0, 1, 4, 9]" in body
    outputs = nb.cells[0].outputs
    assert [VIEW in o.get("data", {}) for o in outputs] == [True, False], json.dumps(outputs)[:500]
