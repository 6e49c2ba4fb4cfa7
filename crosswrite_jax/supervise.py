"""One process of a multi-process run, watched from a parent, so that a lost peer ends it with one line.

When a peer process dies, the runtime ends the survivors from native code: gloo throws inside a collective and
the C++ runtime aborts, or the coordination service's heartbeat check logs a fatal error. Neither reaches Python.
`run` starts the same command as a child (in its own session, killed with its parent), passes stdout through,
forwards SIGINT and SIGTERM (so a first Ctrl-C still saves and a second stops at once), and passes stderr
through until native crash output begins. That output goes to a log file, and the parent prints one line naming
the lost process and exits with EXIT_PEER_LOST instead of 134.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import tempfile

CHILD = "CROSSWRITE_SUPERVISED"  # set in the child (to the parent's pid): it runs the command itself
EXIT_PEER_LOST = 75  # EX_TEMPFAIL: restart every process with the same command to resume

# The first line of native crash output: a C++ terminate, a glog FATAL line (F1202 12:00:00...), a check failure,
# a fatal signal report.
CRASH_START = re.compile(r"^(terminate called|F\d{4} |Check failure|\*\*\* (SIG|Check failure)|Fatal Python error)")
PEER_SIGNS = (("gloo", "a collective over gloo broke off"),
              ("another task died", "the coordination service saw a task die"),
              ("tasks are unhealthy", "the coordination service saw a task stop its heartbeat"),
              ("heartbeat", "a heartbeat was missed"),
              ("Connection reset by peer", "a connection was reset"),
              ("UNAVAILABLE", "the coordination service became unreachable"))
TASK = re.compile(r"/task:(\d+)")


def needed(environ: dict[str, str] | None = None) -> bool:
    """Whether this process should supervise: not already the child."""
    return not (os.environ if environ is None else environ).get(CHILD)


def cli_command(argv: list[str]) -> list[str]:
    """The child's command line: `crosswrite ARGV` in this interpreter."""
    return [sys.executable, "-m", "crosswrite_jax.cli", *argv]


def run(command: list[str], process_id: int | None, num_processes: int | None) -> int:
    """Runs `command` as a watched child; its exit code, or EXIT_PEER_LOST after one line. The process id and count
    are None where the cluster is detected (a TPU pod) and unknown before the runtime starts."""
    env = dict(os.environ, **{CHILD: str(os.getpid())})
    child = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, start_new_session=True)
    previous = {s: signal.signal(s, lambda number, _: child.send_signal(number))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        crash = _pass_stderr(child.stderr)
        code = child.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if not crash:
        return code if code >= 0 else 128 - code
    log = _save_crash_log(crash, process_id)
    me = "this process" if process_id is None else f"process {process_id} of {num_processes}"
    reason = next((why for sign, why in PEER_SIGNS if sign in crash), None)
    if reason is None:  # a native crash of this process, not a lost peer
        print(f"crosswrite: error: {me} crashed in native code (exit {code}); the runtime's output is in {log}",
              file=sys.stderr)
        return 1
    print(f"crosswrite: error: {me} lost {_lost(crash, process_id, num_processes)} ({reason}); restart every "
          f"process with the same command to resume from the last checkpoint; the runtime's output is in {log}",
          file=sys.stderr)
    return EXIT_PEER_LOST


def _pass_stderr(stream) -> str:
    """Copies the child's stderr to ours until native crash output starts; returns that output ('' if none)."""
    held: list[bytes] = []
    pending = b""
    for chunk in iter(lambda: os.read(stream.fileno(), 65536), b""):
        if held:
            held.append(chunk)
            continue
        pending += chunk
        lines = pending.split(b"\n")
        pending = lines.pop()  # an unfinished line (or a progress bar's \r updates) waits for more
        for i, line in enumerate(lines):
            if CRASH_START.match(line.decode("utf-8", "replace").rsplit("\r", 1)[-1]):
                held = [b"\n".join(lines[i:]), b"\n", pending]
                break
            sys.stderr.buffer.write(line + b"\n")
        else:
            if b"\r" in pending:  # progress bars redraw with \r: show them as they come
                shown, _, pending = pending.rpartition(b"\r")
                sys.stderr.buffer.write(shown + b"\r")
        sys.stderr.buffer.flush()
    if not held:
        sys.stderr.buffer.write(pending)
        sys.stderr.buffer.flush()
    return b"".join(held).decode("utf-8", "replace")


def _lost(crash: str, process_id: int | None, num_processes: int | None) -> str:
    """'process N' where the runtime's output names it (or only one other exists); else 'a peer process'."""
    others = sorted({int(n) for n in TASK.findall(crash)} - {process_id})
    if len(others) == 1:
        return f"process {others[0]}"
    if num_processes == 2 and process_id is not None:
        return f"process {1 - process_id}"
    return "a peer process (the runtime did not say which)"


def _save_crash_log(text: str, process_id: int | None) -> str:
    handle, path = tempfile.mkstemp(prefix=f"crosswrite-process{'' if process_id is None else process_id}-",
                                    suffix=".log")
    with os.fdopen(handle, "w") as f:
        f.write(text)
    return path


def die_with_parent(environ: dict[str, str] | None = None) -> None:
    """In a watched child: SIGKILL when the parent dies (Linux), so killing a process kills its run. Set here
    rather than between fork and exec, which is unsafe in a multithreaded parent; a parent already gone ends it."""
    parent = (os.environ if environ is None else environ).get(CHILD, "")
    if not parent.isdigit():
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the child outlives a killed parent
        return
    if os.getppid() != int(parent):
        os._exit(1)
