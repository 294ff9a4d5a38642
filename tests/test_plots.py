"""kvlab.plots: one colour per method, NaN drawn as missing, intervals and paper points drawn."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from kvlab import checks, plots  # noqa: E402


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def test_one_colour_per_method_across_plots():
    assert plots.method_color("ROME (sequential)") == plots.method_color("ROME") != plots.method_color("MEMIT")
    assert plots.method_color("MEMIT (batch)") == plots.method_color("MEMIT")
    assert plots.method_color("keys (r=8)") == plots.method_color("keys") != plots.method_color("values")
    assert plots.method_color("no such method") is None
    a = plots.lines({"MEMIT": [1, 2], "ROME": [2, 1]})           # order swapped between two plots
    b = plots.lines({"ROME": [1, 2], "MEMIT": [2, 1]})
    col = lambda ax, name: next(l.get_color() for l in ax.lines if l.get_label() == name)  # noqa: E731
    assert col(a, "ROME") == col(b, "ROME") and col(a, "MEMIT") == col(b, "MEMIT")
    g = plots.grouped_bars({"S": {"ROME": 1.0, "KN": 0.5}})
    assert tuple(g.patches[0].get_facecolor()[:3]) == pytest.approx(matplotlib.colors.to_rgb(plots.PALETTE["ROME"]))


def test_nan_is_missing_not_zero():
    ax = plots.heatmap(np.array([[0.1, 0.2], [np.nan, np.nan]]), row_labels=["first", "middle"], cmap="Purples")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["first", "middle (none)"]
    assert np.ma.is_masked(ax.images[0].get_array()[1, 0])
    g = plots.grouped_bars({"a": {"x": 1.0, "y": float("nan")}})
    assert [t.get_text() for t in g.texts] == ["n/a"]


def test_intervals_paper_points_and_legend_outside():
    ivs = [checks.wilson(k, 40) for k in (5, 10, 20)]
    ax = plots.lines({"ROME": ivs}, x=[0, 1, 2], paper={"paper (layer 1, 16 of 16)": [(0, 0.6), (2, 0.2)]},
                     ylim0=True)
    assert len(ax.collections) == 1                      # the 95% band
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(min(i.lo for i in ivs)) and band.max() == pytest.approx(max(i.hi for i in ivs))
    star = next(l for l in ax.lines if l.get_label().startswith("paper"))
    assert star.get_marker() == "*" and list(star.get_xdata()) == [0, 2]   # points, not a flat line
    assert ax.get_ylim()[0] == 0
    legend = ax.get_legend()
    assert legend is not None and legend._loc == 2 and legend.get_bbox_to_anchor().x0 > ax.bbox.x1 - 1


def test_bars_name_their_x_axis_and_draw_chance():
    ax = plots.bars([3.0, 2.0], ["17", "4"], xlabel="neuron i", chance=1.0)
    assert ax.get_xlabel() == "neuron i"
    assert any(l.get_label() == "chance" for l in ax.lines)


def test_shared_scale_leaves_out_the_last_row_and_says_it_saturates():
    import torch
    a = torch.tensor([[0.1, 0.2], [float("nan"), float("nan")], [0.3, 0.9]])   # last row: the last token
    b = torch.tensor([[0.25, 0.0], [0.0, 0.0], [0.8, 0.8]])
    assert plots.shared_vmax([a, b]) == pytest.approx(0.25)
    assert plots.shared_vmax([a, b], skip_last_row=False) == pytest.approx(0.9)
    ax = plots.heatmap(a, vmin=0, vmax=plots.shared_vmax([a, b]))
    assert ax.images[0].colorbar.extend == "max"
