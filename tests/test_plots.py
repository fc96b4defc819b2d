"""The figures: plots/accuracy.png keeps one y-axis from run to run with every label inside the frame;
plots/accuracy_vs_compression.png shows the "no recovery" line, with the legend outside the axes."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from kdprune.experiments import report  # noqa: E402
from stages import evaluate  # noqa: E402
from tests.experiments.test_report import fake_runs  # noqa: E402

NAMES = ["teacher", "pruned", "kd", "finetune"]


def boxes(fig):
    fig.canvas.draw()
    return fig.canvas.get_renderer()


@pytest.mark.parametrize("accs", [[92.23, 34.32, 91.75, 91.80], [99.6, 98.9, 99.5, 100.0], [12.0, 5.0, 11.0, 10.0]])
def test_accuracy_axis_is_the_same_for_every_run_and_labels_stay_inside(accs):
    fig = evaluate.accuracy_figure(NAMES, accs, "a long title: fashion_mnist, ResNet-8, magnitude ratio 0.8 (4.8x)")
    ax = fig.axes[0]
    assert ax.get_ylim() == evaluate.ACC_YLIM
    r = boxes(fig)
    frame = ax.get_window_extent(r)
    for t in ax.texts:
        assert frame.contains(*t.get_window_extent(r).corners()[1]) and frame.contains(*t.get_window_extent(r).corners()[3])
    fig_box = fig.bbox
    for artist in (ax.title, ax.yaxis.label):
        b = artist.get_window_extent(r)
        assert fig_box.x0 <= b.x0 and b.x1 <= fig_box.x1 and fig_box.y0 <= b.y0 and b.y1 <= fig_box.y1
    plt.close(fig)


def test_accuracy_vs_compression_shows_no_recovery_and_keeps_the_legend_off_the_data():
    df = fake_runs(kd=[[91.0, 91.2, 91.1], [89.0, 88.0, 90.0]], ft=[[90.0, 90.1, 90.0], [89.5, 87.5, 89.9]])
    table, _ = report.summarise(df)
    pruned = table[table.method == "pruned"]
    assert pruned.acc_mean.max() < 60  # far below the recovered methods
    fig = report.figure(table, "t")
    axes = fig.axes
    for acc in list(table.acc_mean):  # every point, "no recovery" included, is inside some panel
        assert any(a.get_ylim()[0] <= acc <= a.get_ylim()[1] for a in axes), acc
    top = axes[0]
    assert top.get_ylim()[0] > 80  # the recovered methods keep their zoom
    r = boxes(fig)
    legend = fig.legends[0].get_window_extent(r)
    assert "no recovery" in [t.get_text() for t in fig.legends[0].get_texts()]
    assert all(not legend.overlaps(a.get_window_extent(r)) for a in axes)
    plt.close(fig)


def test_accuracy_vs_compression_has_one_panel_when_everything_fits():
    df = fake_runs(kd=[[91.0, 91.2, 91.1]], ft=[[90.0, 90.1, 90.0]], ratios=(0.5,))
    df["acc_pruned"] = 89.0
    table, _ = report.summarise(df)
    fig = report.figure(table, "t")
    assert len(fig.axes) == 1 and fig.axes[0].get_ylim()[0] <= 89.0
    plt.close(fig)
