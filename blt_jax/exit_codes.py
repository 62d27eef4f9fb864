"""Exit statuses of the `blt` command, defined once for the CLI, the launchers and schedulers.

A scheduler (Kubernetes, xpk, Slurm, a shell loop) can tell from the status alone whether to restart a job:
`INTERRUPTED` means the run saved a checkpoint and stopped on request (SIGTERM, SIGINT), so starting the
same command again resumes it; `ERROR` means the command refused its input or hit a condition it reports
in one line (a bad flag or config value, a missing or damaged file, a failed save, a diverged loss), so a
restart fails the same way until the cause is fixed.
"""

OK = 0
# an uncaught exception (Python's own status for a traceback): a bug to report
CRASHED = 1
# a one-line `blt <cmd>: error: ...` (argparse uses the same status for unknown or malformed flags)
ERROR = 2
# stopped by SIGTERM/SIGINT after saving a checkpoint: run the same command again to resume
# (sysexits.h EX_TEMPFAIL, "temporary failure; the user is invited to retry")
INTERRUPTED = 75
# stopped by SIGINT (Ctrl-C) with nothing to resume (eval, convert, a single generation): 128 + SIGINT, the
# status a shell reports for a command the signal ended
CANCELLED = 130
