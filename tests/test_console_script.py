"""The console script skips the interpreter's teardown and keeps what a normal exit
guarantees: the exit code, every byte written to a pipe, the ``atexit`` handlers
(``ray.shutdown`` is one), and a running non-daemon thread's work."""

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

HEADER = "import atexit, sys, threading, time\nfrom antipers import cli\n"


def _run(setup: str, *argv: str, **env_over: str) -> subprocess.CompletedProcess[str]:
    """``antipers *argv`` through the console script after ``setup``, stdout a real pipe."""
    call = f"\nsys.argv = ['antipers', *{list(argv)!r}]\ncli.console_main()\n"
    code = HEADER + textwrap.dedent(setup) + call
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # block-buffered
    env.update(env_over)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_installed_command_is_the_console_script():
    scripts = importlib.metadata.entry_points(group="console_scripts")
    assert scripts["antipers"].value == "antipers.cli:console_main"


TEARDOWN = """
class Teardown:
    def __del__(self):
        print("teardown ran")
keep = Teardown()
"""


def test_the_teardown_is_skipped_unless_asked_for():
    assert "teardown ran" not in _run(TEARDOWN, "list", "defenses").stdout
    forced = _run(TEARDOWN, "list", "defenses", ANTIPERS_NORMAL_EXIT="1")
    assert forced.returncode == 0
    assert "teardown ran" in forced.stdout


def test_output_exit_code_and_atexit_handlers_survive():
    out = _run("atexit.register(lambda: print('atexit ran'))", "list", "defenses")
    assert out.returncode == 0, out.stderr
    assert "aspl" in out.stdout  # the command's own buffered output reached the pipe
    assert out.stdout.rstrip().endswith("atexit ran")


def test_a_user_error_keeps_its_exit_code():
    out = _run("", "score", "/no/such/folder", "--references", "/no/such/either")
    assert out.returncode == 2
    assert out.stderr.startswith("error:")


def test_a_running_thread_is_waited_for():
    # the thread prints only after the main thread has finished, as Python's exit marks it
    setup = """
    def late():
        while threading.main_thread().is_alive():
            time.sleep(0.02)
        time.sleep(0.2)
        print('thread done')
    threading.Thread(target=late, daemon=False).start()
    """
    out = _run(setup, "list", "defenses")
    assert out.returncode == 0, out.stderr
    assert "thread done" in out.stdout


def test_a_command_that_loads_models_imports_them_with_the_collector_paused():
    setup = """
    import gc
    def report():
        stack = "diffusers.models.unets.unet_2d_condition" in sys.modules
        print(f"stack={stack} enabled={gc.isenabled()} frozen={gc.get_freeze_count()}")
    atexit.register(report)
    """
    out = _run(
        setup, "protect", "/no/such", "/tmp/unused", "--defense", "aspl", "--base-model", "tiny"
    )
    assert out.returncode == 2, out.stderr  # the folder is refused after the imports
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("stack=True enabled=True frozen=")
    assert int(last.rsplit("=", 1)[1]) > 100_000  # the stack's objects left the collector
    listing = _run(setup, "list", "defenses")
    assert listing.stdout.strip().splitlines()[-1].startswith("stack=False")
