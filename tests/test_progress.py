"""usim.progress: a bar only when enabled, on a terminal, with tqdm, after the delay; silent otherwise."""

import io
import sys
import time

import pytest

import usim
from usim import progress as progress_module
from usim.progress import progress, set_progress, track


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def restore_switch():
    before = progress_module.progress_enabled()
    yield
    set_progress(before)


def test_exported_from_the_package():
    assert usim.set_progress is set_progress


def test_shows_a_bar_on_a_terminal_after_the_delay():
    pytest.importorskip("tqdm")
    set_progress(True)
    stream = FakeTerminal()
    with progress(3, "building", delay=0, stream=stream) as bar:
        for _ in range(3):
            bar.update()
    assert bar.shown and "building" in stream.getvalue()


def test_one_long_step_opens_the_bar_without_updates():
    pytest.importorskip("tqdm")
    set_progress(True)
    stream = FakeTerminal()
    with progress(None, "planning", delay=0.05, stream=stream) as bar:
        deadline = time.monotonic() + 5
        while not bar.shown and time.monotonic() < deadline:
            time.sleep(0.01)
    assert bar.shown and "planning" in stream.getvalue()


def test_silent_when_not_a_terminal():
    set_progress(True)
    stream = io.StringIO()
    with progress(3, "building", delay=0, stream=stream) as bar:
        bar.update(3)
    assert not bar.shown and stream.getvalue() == ""


def test_silent_when_switched_off():
    set_progress(False)
    stream = FakeTerminal()
    with progress(3, "building", delay=0, stream=stream) as bar:
        bar.update(3)
    assert not bar.shown and stream.getvalue() == ""


def test_silent_for_quick_work():
    set_progress(True)
    stream = FakeTerminal()
    with progress(3, "building", stream=stream) as bar:  # the default delay, 2 s
        bar.update(3)
    assert not bar.shown and stream.getvalue() == ""


def test_silent_without_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    set_progress(True)
    stream = FakeTerminal()
    with progress(3, "building", delay=0, stream=stream) as bar:
        bar.update(3)
    assert not bar.shown and stream.getvalue() == ""


def test_track_yields_every_item_and_counts_them():
    set_progress(True)
    assert list(track(range(5), desc="x", stream=io.StringIO())) == [0, 1, 2, 3, 4]


def test_bad_arguments():
    with pytest.raises(TypeError, match="True or False"):
        set_progress(1)
    with pytest.raises(TypeError, match="total"):
        progress(2.5)
    with pytest.raises(ValueError, match="-1"):
        progress(-1)
