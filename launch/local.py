#!/usr/bin/env python3
"""Start N processes of one command on this machine, joined by `jax.distributed` over localhost.

    python launch/local.py --num-processes 2 --devices-per-process 4 -- blt train --preset tiny --run runs/x ...

Each process gets BLT_COORDINATOR / BLT_NUM_PROCESSES / BLT_PROCESS_ID (read by `blt`, or by
`blt_jax.distributed.initialize()` in your own script) and BLT_LOCAL_CPU_DEVICES virtual CPU devices; CPU
collectives run over gloo. Output lines are prefixed with the process id. If any process fails, the others
are stopped at once (a peer waiting on a dead one would otherwise hang until its heartbeat timeout), a last
line on stderr names the first process to fail and how it ended, and the exit code is its status, else 0.
SIGTERM or SIGINT to this launcher is passed to every process (training saves a checkpoint and exits), and
its exit code is theirs.
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(proc: subprocess.Popen, prefix: str, out) -> None:
    for line in iter(proc.stdout.readline, b""):
        out.write(f"{prefix}{line.decode(errors='replace')}")
        out.flush()


def _wait(proc: subprocess.Popen, pid: int, ended: queue.Queue) -> None:
    proc.wait()
    ended.put(pid)  # in the order the processes end: the first failure is the one to name


def _signal_group(proc: subprocess.Popen, sig: int) -> bool:
    """Signal a running process and its children; whether it was running. (`poll()` cannot tell: it answers
    None while `_wait`'s thread waits for the process.)"""
    if proc.returncode is not None:
        return False
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # it ended meanwhile
        return False
    return True


def how_it_ended(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def resolve(program: str) -> str | None:
    """The program to start: as given when it is a path, else from PATH, else next to this Python (the
    README runs the launcher as .venv/bin/python without activating the venv, so `blt` is not on PATH)."""
    if os.sep in program:
        return program
    beside = os.path.join(os.path.dirname(sys.executable), program)
    return shutil.which(program) or (beside if os.access(beside, os.X_OK) else None)


def launch(command: list[str], num_processes: int, devices_per_process: int, timeout: float = 0,
           port: int = 0, env: dict | None = None, out=sys.stdout) -> int:
    program = resolve(command[0]) if command else None
    if program is None:
        print(f"launch/local.py: error: {command[0] if command else 'no command'}: not found on PATH nor next to "
              f"{sys.executable}", file=sys.stderr)
        return 2
    command = [program, *command[1:]]
    port = port or free_port()
    procs, pumps, ended = [], [], queue.Queue()
    for pid in range(num_processes):
        penv = dict(os.environ if env is None else env, BLT_COORDINATOR=f"127.0.0.1:{port}",
                    BLT_NUM_PROCESSES=str(num_processes), BLT_PROCESS_ID=str(pid),
                    BLT_LOCAL_CPU_DEVICES=str(devices_per_process), JAX_PLATFORMS="cpu")
        # each process its own session: stopping it also stops its children (grain workers)
        proc = subprocess.Popen(command, env=penv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        pumps.append(threading.Thread(target=_pump, args=(proc, f"[{pid}] ", out), daemon=True))
        pumps[-1].start()
        threading.Thread(target=_wait, args=(proc, pid, ended), daemon=True).start()
        procs.append(proc)
    deadline = time.time() + timeout if timeout else None
    stop_signal = []  # SIGTERM/SIGINT to this launcher go to every process (training saves a checkpoint)

    def forward(signum, frame):
        stop_signal.append(signum)
        for p in procs:
            _signal_group(p, signal.SIGTERM)

    old_handlers = {}
    if threading.current_thread() is threading.main_thread():
        old_handlers = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    first_failure, culprit, stopped = 0, None, False
    try:
        running = num_processes
        while running:
            try:
                pid = ended.get(timeout=0.2)
            except queue.Empty:
                pid = None
            if pid is not None:
                running -= 1
                code = procs[pid].returncode
                if code != 0 and culprit is None and not stop_signal:
                    first_failure, culprit = code, pid
            expired = deadline is not None and time.time() > deadline
            if running and (culprit is not None or expired):
                first_failure = first_failure or 124
                # a peer waiting on a dead process would hang until its heartbeat timeout
                stopped = any([_signal_group(p, signal.SIGKILL) for p in procs])
                break
        for p in procs:
            p.wait()
        limit = time.time() + 5  # their last lines first: the launcher's own line below ends the output
        for t in pumps:
            t.join(timeout=max(0.0, limit - time.time()))
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    # the first process to fail, named: its peers' errors (a Gloo connection lost) come later and mislead
    others = "; the others were stopped" if stopped else ""
    if culprit is not None:
        print(f"launch/local.py: process {culprit} of {num_processes} {how_it_ended(first_failure)}{others}",
              file=sys.stderr)
    elif stopped:
        print(f"launch/local.py: --timeout {timeout:g} s passed; the processes were stopped", file=sys.stderr)
    return first_failure or next((p.returncode for p in procs if p.returncode), 0)


EXAMPLE = """example (2 processes of 4 virtual CPU devices each, killed if still running after 10 minutes):
  python launch/local.py --num-processes 2 --devices-per-process 4 --timeout 600 -- \\
      blt train --preset tiny --store runs/data --run runs/mh --set model.patching.mode=static --set data.batch_size=8
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/local.py", usage="%(prog)s [options] -- COMMAND [ARG ...]",
                                description=__doc__, epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-processes", type=int, default=2, help="processes to start (default 2)")
    p.add_argument("--devices-per-process", type=int, default=4,
                   help="virtual CPU devices per process (default 4)")
    p.add_argument("--timeout", type=float, default=0, help="seconds before all processes are killed (0: none)")
    p.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    if "--" not in argv:
        p.parse_known_args(argv)  # --help and bad options answered as usual
        p.error("give the command to run after --, e.g. launch/local.py --num-processes 2 -- blt params")
    split = argv.index("--")
    args = p.parse_args(argv[:split])
    if args.num_processes < 1 or args.devices_per_process < 1:
        p.error("--num-processes and --devices-per-process must be >= 1")
    return launch(argv[split + 1:], args.num_processes, args.devices_per_process, args.timeout, args.port)


if __name__ == "__main__":
    sys.exit(main())
