"""The figure check in Recorder.figure: synthetic figures that break, and keep, each rule."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from dpbench.errors import UserError  # noqa: E402
from dpbench.workbench.results import FigureCheckError, Recorder, check_figure, use_style  # noqa: E402


@pytest.fixture(autouse=True)
def _style():
    use_style()
    yield
    plt.close("all")


def labelled(figsize=(4, 3), **kw):
    fig, ax = plt.subplots(figsize=figsize, **kw)
    ax.plot([1, 2, 3], [1, 4, 9], label="squares")
    ax.set_xlabel("x (units)")
    ax.set_ylabel("y (units)")
    ax.set_title("a clean figure")
    return fig, ax


def kinds(problems):
    return sorted({p.split(":")[0] for p in problems})


def test_clean_figure_passes_and_is_saved(tmp_path):
    fig, ax = labelled()
    ax.legend()
    ax.annotate("peak", (3, 9), xytext=(1.5, 7), arrowprops={"arrowstyle": "->"})
    assert check_figure(fig) == []
    path = Recorder(tmp_path, experiment="t").figure(fig, "clean")
    assert path.is_file() and path.stat().st_size > 0


# ---- rule 1: overlapping text -------------------------------------------------------------------

def test_crowded_tick_labels_overlap():
    fig, ax = labelled(figsize=(2.5, 2.5))
    ax.set_xticks([1, 1.5, 2, 2.5, 3], [f"method number {i}" for i in range(5)])
    problems = check_figure(fig)
    assert kinds(problems) == ["overlapping tick labels"]
    assert "'method number 0'" in problems[0] and "x tick label" in problems[0]


def test_rotated_tick_labels_that_clear_each_other_pass():
    # The same labels rotated upright clear each other: the rotated boxes, not their bounding
    # boxes, decide (at 60 degrees the bounding boxes still intersect, the labels do not).
    fig, ax = labelled(figsize=(3.5, 3))
    ax.set_xticks([1, 1.5, 2, 2.5, 3], [f"method number {i}" for i in range(5)], rotation=60,
                  ha="right", rotation_mode="anchor")
    texts = [t for t in ax.get_xticklabels() if t.get_text()]
    fig.draw_without_rendering()
    a, b = (t.get_window_extent(fig.canvas.get_renderer()) for t in texts[:2])
    assert a.overlaps(b)  # a bounding-box test would fail this figure
    assert check_figure(fig) == []


def test_text_on_top_of_text_overlaps():
    fig, ax = labelled()
    ax.text(2, 5, "first note", ha="center")
    ax.text(2, 5, "second note", ha="center")
    problems = check_figure(fig)
    assert kinds(problems) == ["overlapping text"]
    assert "'first note'" in problems[0] and "'second note'" in problems[0]


def test_legend_over_annotation_overlaps():
    fig, ax = labelled()
    ax.legend(loc="upper left")
    ax.text(0.02, 0.97, "an annotation under the legend", transform=ax.transAxes, va="top")
    assert kinds(check_figure(fig)) == ["overlapping text"]
    assert "legend text 'squares'" in check_figure(fig)[0]


def test_title_over_tick_labels_of_the_axes_above_overlaps_until_laid_out():
    fig, axes = plt.subplots(2, 1, figsize=(4, 3), layout="none")
    for ax in axes:
        ax.plot([1, 2], [1, 2])
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.set_title("panel")
    assert kinds(check_figure(fig)) == ["overlapping text"]
    fig.set_layout_engine("constrained")
    assert check_figure(fig) == []


def test_touching_by_less_than_the_tolerance_passes():
    fig, ax = labelled()
    a = ax.text(0.1, 0.5, "left", transform=ax.transAxes)
    fig.draw_without_rendering()
    bb = a.get_window_extent(fig.canvas.get_renderer())
    x1 = ax.transAxes.inverted().transform((bb.x1 - 0.5, bb.y0))[0]  # half a pixel into "left"
    ax.text(x1, 0.5, "right", transform=ax.transAxes)
    assert check_figure(fig) == []
    assert kinds(check_figure(fig, tolerance_px=0.0)) == ["overlapping text"]


# ---- rule 2: a plotted axis has a label ---------------------------------------------------------

def test_missing_axis_labels():
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    ax.set_xlabel("x")
    problems = check_figure(fig)
    assert len(problems) == 1 and problems[0].startswith("unlabelled axis: the y axis of axes 1")


def test_bars_with_category_ticks_need_an_x_label():
    fig, ax = plt.subplots()
    ax.bar([0, 1], [3, 4])
    ax.set_xticks([0, 1], ["a", "b"])
    ax.set_ylabel("seconds")
    assert kinds(check_figure(fig)) == ["unlabelled axis"]
    ax.set_xlabel("method")
    assert check_figure(fig) == []


def test_axes_without_data_or_tick_labels_need_no_label():
    fig, axes = plt.subplots(1, 3, figsize=(9, 3), sharey=True)
    for ax in axes:
        ax.plot([1, 2], [3, 4])
        ax.set_xlabel("x")
    axes[0].set_ylabel("y")  # the shared y axes of panels 2 and 3 draw no tick labels
    fig2, (a, b) = plt.subplots(1, 2)
    a.text(0.5, 0.5, "only text", ha="center")  # no data
    b.plot([1, 2])
    b.axis("off")  # switched off
    assert check_figure(fig) == [] and check_figure(fig2) == []


def test_figure_level_labels_count():
    fig, axes = plt.subplots(1, 2, figsize=(7, 3), layout="constrained")
    for ax in axes:
        ax.plot([1, 2], [3, 4])
    assert len(check_figure(fig)) == 4
    fig.supxlabel("step")
    fig.supylabel("loss")
    assert check_figure(fig) == []


def test_twin_axis_needs_its_own_label():
    fig, ax = labelled()
    twin = ax.twinx()
    twin.plot([1, 2, 3], [5, 6, 7], color="C1")
    problems = check_figure(fig)
    assert len(problems) == 1 and "the y axis of axes 2" in problems[0]  # the twin's hidden x axis is exempt
    twin.set_ylabel("other (units)")
    assert check_figure(fig) == []


# ---- rule 3: placeholders -----------------------------------------------------------------------

@pytest.mark.parametrize("where", ["title", "xlabel", "legend", "suptitle"])
@pytest.mark.parametrize("text, what", [("TODO: name it", "TODO"), ("memory (n/m)", "n/m"),
                                        ("accuracy at eps={eps}", "{"), ("seconds per {}", "{")])
def test_placeholders_in_titles_and_labels(where, text, what):
    fig, ax = labelled(layout="constrained")
    if where == "title":
        ax.set_title(text)
    elif where == "xlabel":
        ax.set_xlabel(text)
    elif where == "legend":
        ax.lines[0].set_label(text)
        ax.legend()
    else:
        fig.suptitle(text)
    problems = check_figure(fig)
    assert kinds(problems) == ["placeholder"], problems
    assert what in problems[0]


def test_no_false_placeholders():
    fig, ax = labelled(layout="constrained")
    ax.set_title(r"noise $\sigma^{2}/B$ at $\delta=10^{-5}$, n/min ratio, todo-free")
    ax.set_xlabel("runs n/(m+1)")
    ax.text(1, 5, "n/m")  # a free text is not a title or label
    assert check_figure(fig) == []


# ---- the recorder --------------------------------------------------------------------------------

def test_recorder_raises_one_line_after_saving(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    ax.set_title("memory (n/m)")
    rec = Recorder(tmp_path, experiment="t")
    with pytest.raises(FigureCheckError) as info:
        rec.figure(fig, "bad")
    msg = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in msg
    assert msg.startswith("figure 'bad' fails the figure check (3 problem(s)")
    assert "set_xlabel" in msg and "set_ylabel" in msg and "'n/m'" in msg
    assert (tmp_path / "figures" / "bad.png").is_file()  # saved anyway, to look at


def test_recorder_message_caps_the_list(tmp_path):
    fig, axes = plt.subplots(1, 3, figsize=(9, 3))
    for ax in axes:
        ax.plot([1, 2], [3, 4])
    with pytest.raises(FigureCheckError, match=r"\(6 problem\(s\).*; and 2 more$"):
        Recorder(tmp_path, experiment="t").figure(fig, "six")


def test_secondary_axis_tick_labels_count():
    fig, ax = labelled(figsize=(4, 3), layout="constrained")
    top = ax.secondary_xaxis("top", functions=(lambda x: x * 1000, lambda v: v / 1000))
    top.set_xlabel("x times 1000")
    assert check_figure(fig) == []
    top.set_xticks([1000, 1100, 1200], ["one thousand", "eleven hundred", "twelve hundred"])
    problems = check_figure(fig)
    assert kinds(problems) == ["overlapping tick labels"] and "secondary axes of axes 1" in problems[0]
