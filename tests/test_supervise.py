"""The watched child of a multi-process run: output passes through, a native abort after a lost peer becomes one
line and exit 75, signals reach the child. Fake children stand in for training (the real two-process case is the
slow test in test_multihost.py)."""

import signal
import subprocess
import sys
import textwrap

import pytest

from crosswrite_jax import supervise
from crosswrite_jax.cli import main

GLOO_ABORT = ("terminate called after throwing an instance of 'gloo::EnforceNotMet'\n"
              "  what():  [enforce fail at external/gloo/gloo/transport/tcp/pair.cc:459] op.preamble.length <= "
              "op.nbytes. 8 vs 4\n")
HEARTBEAT_FATAL = ("F1202 21:00:00.000000 1234 coordination_service_agent.cc:123] Terminating process because the "
                   "JAX distributed service detected fatal errors. This most likely indicates that another task "
                   "died; see the other task logs for more details. /job:jax_worker/replica:0/task:2 ...\n"
                   "*** Check failure stack trace: ***\n    @ 0x7f00 abort\n")


def _child(body: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(body)]


def _crashing(native: str) -> list[str]:
    return _child(f"""
        import os, sys
        print('{{"loss": 1.0}}')
        sys.stderr.write("step 1\\rstep 2\\rstep 3\\n")
        sys.stderr.write("mesh {{'data': 8}}\\n")
        sys.stderr.flush()
        sys.stdout.flush()
        os.write(2, {native!r}.encode())
        os.abort()
    """)


@pytest.mark.parametrize("native, lost, reason", [
    (GLOO_ABORT, "process 1", "gloo"),
    (HEARTBEAT_FATAL, "process 2", "another task died"),
])
def test_a_native_abort_after_a_lost_peer_is_one_line_and_exit_75(capfd, native, lost, reason):
    code = supervise.run(_crashing(native), process_id=0, num_processes=3 if lost == "process 2" else 2)
    out, err = capfd.readouterr()
    assert code == supervise.EXIT_PEER_LOST
    assert out == '{"loss": 1.0}\n'  # the child's stdout is untouched
    assert err.startswith("step 1\rstep 2\rstep 3\nmesh {'data': 8}\n")  # what came before the crash passes
    errors = [line for line in err.splitlines() if line.startswith("crosswrite:")]
    assert len(errors) == 1 and err.endswith(errors[0] + "\n")
    assert f"process 0 of {3 if lost == 'process 2' else 2} lost {lost}" in errors[0]
    assert "terminate called" not in err and "Check failure" not in err
    log = errors[0].rsplit("runtime's output is in ", 1)[1]
    with open(log) as f:
        assert reason in f.read()  # the native output is kept, not lost


def test_a_native_crash_without_a_peer_sign_is_one_line_and_exit_1(capfd):
    code = supervise.run(_crashing("F1202 12:00:00 1 foo.cc:1] Check failed: x == y\n"), process_id=1,
                         num_processes=2)
    err = capfd.readouterr().err
    assert code == 1
    assert err.splitlines()[-1].startswith("crosswrite: error: process 1 of 2 crashed in native code")


def test_an_ordinary_exit_code_and_output_pass_through(capfd):
    code = supervise.run(_child("""
        import sys
        sys.stderr.write("crosswrite: error: train.steps must be positive\\n")
        sys.exit(2)
    """), process_id=0, num_processes=2)
    assert code == 2
    assert capfd.readouterr().err == "crosswrite: error: train.steps must be positive\n"


def test_sigterm_to_the_parent_reaches_the_child(tmp_path):
    """The parent forwards SIGTERM; the child saves (here: writes a file) and exits with its own code."""
    marker = tmp_path / "saved"
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent(f"""
        import signal, sys, time
        def save(*_):
            open({str(marker)!r}, "w").write("ok")
            sys.exit(3)
        signal.signal(signal.SIGTERM, save)
        print("ready", flush=True)
        time.sleep(60)
    """))
    parent = subprocess.Popen([sys.executable, "-c", "import sys; from crosswrite_jax import supervise; "
                               f"sys.exit(supervise.run([sys.executable, {str(child)!r}], 0, 2))"],
                              stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline() == "ready\n"
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 3
    assert marker.read_text() == "ok"


def test_a_single_process_run_is_not_supervised(monkeypatch):
    """Only runs with several processes get a watched child."""
    calls = []
    monkeypatch.setattr(supervise, "run", lambda *a: calls.append(a) or 0)
    monkeypatch.delenv(supervise.CHILD, raising=False)
    assert main(["eval", "--workdir", "/nonexistent/run"]) == 2  # ran in this process: a one-line error
    assert calls == []
    monkeypatch.setenv("CROSSWRITE_COORDINATOR", "127.0.0.1:1")
    monkeypatch.setenv("CROSSWRITE_NUM_PROCESSES", "2")
    monkeypatch.setenv("CROSSWRITE_PROCESS_ID", "1")
    assert main(["eval", "--workdir", "/nonexistent/run"]) == 0  # handed to the (stubbed) watched child
    assert calls and calls[0][0][-2:] == ["--workdir", "/nonexistent/run"] and calls[0][1:] == (1, 2)
    assert not supervise.needed({supervise.CHILD: "1"})  # the child runs the command itself


@pytest.mark.parametrize("parent_is_me, code", [(True, 0), (False, 1)])
def test_a_watched_child_whose_parent_is_gone_ends_at_once(parent_is_me, code):
    """The child arms SIGKILL-on-parent-death itself, then exits if its recorded parent is no longer its parent."""
    import os

    env = dict(os.environ, **{supervise.CHILD: str(os.getpid()) if parent_is_me else "1"})
    done = subprocess.run([sys.executable, "-c", "from crosswrite_jax import supervise; supervise.die_with_parent(); "
                           "print('went on')"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == code
    assert (done.stdout == "went on\n") == parent_is_me
