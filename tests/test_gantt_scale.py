"""The run's Gantt chart for a plant of thousands of resources: drawn, bounded in size (a canvas
grown with the plant was refused by Agg beyond 2^16 pixels, after taking gigabytes)."""

from __future__ import annotations

from pathlib import Path

from scenarios.gantt import MAX_HEIGHT_IN, Bar, draw


def test_a_chart_of_5000_resources_is_drawn_within_its_height_cap(tmp_path: Path) -> None:
    import matplotlib.image

    bars = [Bar(f"r{i}", f"p{i}", 1, float(i % 7), float(i % 7) + 1.0, 1 + i % 5) for i in range(5000)]
    path = draw(bars, tmp_path / "gantt.png", dpi=110)
    assert path is not None and path.stat().st_size > 10_000
    height, width = matplotlib.image.imread(path).shape[:2]
    assert height <= MAX_HEIGHT_IN * 110 * 1.05 and width < 2000


def test_a_small_chart_keeps_its_row_height_and_labels(tmp_path: Path) -> None:
    import matplotlib.image

    bars = [Bar(f"r{i}", f"p{i}", 1, 0.0, 10.0) for i in range(4)]
    path = draw(bars, tmp_path / "gantt.png", dpi=110)
    assert path is not None
    height = matplotlib.image.imread(path).shape[0]
    assert 300 < height <= (0.42 * 4 + 1.7) * 110  # 0.42 in a row, as before the cap
