"""Tests of dpo_jax/train/loop.py's pieces that need no model: the progress display, the messages of
non-finite steps, the stage of a logged row. `fit` itself runs end to end in tests/test_runner.py."""

import fcntl
import io
import os
import struct
import termios

import numpy as np

from dpo_jax.train import loop

TRAIN_ROW = {"loss": 0.5, "rewards/accuracies": 0.75, "rewards/margins": 1.25, "tokens_per_s": 100.0}


def test_progress_without_a_terminal_prints_plain_lines_every_log_step():
    out = io.StringIO()
    bar = loop.Progress("train", 0, 5, every=2, stream=out)
    for s in range(1, 6):
        bar.update(s, TRAIN_ROW)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines == [f"train: step {s}/5  loss=0.5  rewards/accuracies=0.75  rewards/margins=1.25  tokens_per_s=100"
                     for s in (2, 4, 5)]


def test_progress_shows_the_stage_own_metrics():
    out = io.StringIO()
    bar = loop.Progress("sft", 0, 1, every=1, stream=out)
    bar.update(1, {**TRAIN_ROW, "loss": 2.0})  # the SFT step also computes reward metrics: not shown
    assert out.getvalue() == "sft: step 1/1  loss=2  tokens_per_s=100\n"


def _pty(columns):
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    return leader, os.fdopen(follower, "w")


def test_progress_on_a_terminal_is_a_bar_and_on_a_zero_column_terminal_plain_lines():
    leader, tty = _pty(80)
    try:
        bar = loop.Progress("train", 0, 3, every=1, stream=tty)
        assert bar.bar is not None
        bar.close()
    finally:
        tty.close()
        os.close(leader)
    leader, tty = _pty(0)
    try:
        assert tty.isatty()
        bar = loop.Progress("train", 0, 3, every=1, stream=tty)
        assert bar.bar is None  # a terminal of zero columns gets lines, not blank bar redraws
    finally:
        tty.close()
        os.close(leader)


def test_nonfinite_message_names_what_was_not_finite():
    rows = [{"loss": float("nan"), "grad_norm": float("nan")}, {"loss": 0.3, "grad_norm": 1.0},
            {"loss": 0.3, "grad_norm": float("inf")}]
    assert loop.nonfinite_message("train", 7, rows[:1], [0], 0) == (
        "train: step 7: non-finite loss=nan, grad_norm=nan; the update was not applied")
    assert loop.nonfinite_message("train", 7, rows[1:2], [0], 0) == (
        "train: step 7: non-finite updated parameters or optimizer state; the update was not applied")
    msg = loop.nonfinite_message("train", 3, rows, [1, 2], 3)
    assert msg == ("train: step 3: non-finite member 1: updated parameters or optimizer state; "
                   "member 2: grad_norm=inf; the update was not applied")
    assert np.isnan(rows[0]["loss"])


def test_row_stage():
    assert loop.row_stage({"step": 3, "sft/loss": 1.0}) == "sft"
    assert loop.row_stage({"step": 3, "loss": 1.0, "sft/x": 2.0}) == "train"
