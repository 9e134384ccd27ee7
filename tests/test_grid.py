"""Grid search: one stop event for the whole grid, so SIGTERM cancels the current run and starts no other."""
from __future__ import annotations

import os
import signal
import threading

from covidscan.training import grid as grid_module
from covidscan.training import grid_search
from test_training import folder, tiny_config  # noqa: F401 - the shared fixture


def test_sigterm_cancels_the_whole_grid(folder, tmp_path, monkeypatch):  # noqa: F811
    real_train = grid_module.train
    started = []

    def train_and_terminate_at_the_first_step(config, run_dir, **kwargs):
        started.append(run_dir.name)

        def on_progress(record):
            if record["state"] == "running" and record["step"] >= 1:
                os.kill(os.getpid(), signal.SIGTERM)

        return real_train(config, run_dir, progress_callback=on_progress, **kwargs)

    monkeypatch.setattr(grid_module, "train", train_and_terminate_at_the_first_step)
    # Every step reports progress (not every 2 s), and later epochs remain: the stop always lands mid-run.
    from covidscan.training import RunWriter

    monkeypatch.setattr(RunWriter, "every_s", 0.0)
    before = signal.getsignal(signal.SIGTERM)
    rows = grid_search(tiny_config(folder, epochs=3, batch_size=2), tmp_path / "grid", lrs=[1e-2, 1e-3, 1e-4],
                       archs=["tiny_cnn"], image_sizes=[32])
    assert started == ["tiny_cnn-32px-lr0.01"]  # later runs never started
    assert [row["state"] for row in rows] == ["cancelled"]
    assert sorted(p.name for p in (tmp_path / "grid").iterdir()) == ["grid.csv", "tiny_cnn-32px-lr0.01"]
    assert signal.getsignal(signal.SIGTERM) is before  # the grid's handler is removed again


def test_a_set_stop_event_starts_no_run(folder, tmp_path):  # noqa: F811
    stop = threading.Event()
    stop.set()
    rows = grid_search(tiny_config(folder, epochs=1), tmp_path / "grid", lrs=[1e-2, 1e-3], archs=["tiny_cnn"],
                       image_sizes=[32], stop_event=stop)
    assert rows == [] and [p.name for p in (tmp_path / "grid").iterdir()] == ["grid.csv"]
