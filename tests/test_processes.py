"""Ctrl-C can never strand a process: while one is started and recorded, interrupts wait."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from fedpsg.run.processes import ManagedProcesses, _alive, signals_held


def test_ctrl_c_inside_the_block_is_raised_when_it_ends():
    done = []
    with pytest.raises(KeyboardInterrupt), signals_held():
        os.kill(os.getpid(), signal.SIGINT)
        done.append("after the signal")
    assert done == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_nested_blocks_hold_until_the_outermost_ends():
    done = []
    with pytest.raises(KeyboardInterrupt), signals_held():
        with signals_held():
            os.kill(os.getpid(), signal.SIGINT)
        done.append("inner block ended, nothing raised")
    assert done == ["inner block ended, nothing raised"]


def test_a_process_started_as_ctrl_c_arrives_is_recorded_and_stopped(tmp_path):
    procs = ManagedProcesses(grace=5)
    with pytest.raises(KeyboardInterrupt), procs, signals_held():
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the process is being started
        proc = procs.start([sys.executable, "-c", "import time; time.sleep(60)"],
                           log_file=tmp_path / "sleeper.log")  # fmt: skip
    assert proc.pid and not _alive(proc.pid)
    assert (tmp_path / "sleeper.log").exists()
