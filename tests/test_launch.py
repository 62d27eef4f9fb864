"""The launchers against stub `gcloud` / `xpk` / `docker` / `curl` commands that record their arguments (and,
for `tpu-vm ssh`, run the remote script here with one home folder per worker and a stub `blt` that records
its arguments and environment); `launch/local.py` with a failing process; the Slurm start-up."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blt_jax import distributed, exit_codes

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"

RECORDER = r'''#!/usr/bin/env python3
import json, os, subprocess, sys
tool, args = os.path.basename(sys.argv[0]), sys.argv[1:]
entry = {"tool": tool, "args": args}
for a in args:
    if a.startswith("--env-file="):
        entry["env_file"] = open(a.split("=", 1)[1]).read()
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps(entry) + "\n")
if tool == "curl":
    sys.exit(22)  # no metadata server here: the scripts fall back to the host name
if tool == "gcloud" and args[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and os.environ.get("STUB_RUN_SSH"):
    worker = next(a.split("=", 1)[1] for a in args if a.startswith("--worker="))
    command = next(a.split("=", 1)[1] for a in args if a.startswith("--command="))
    workers = range(int(os.environ.get("STUB_WORKERS", "2"))) if worker == "all" else [int(worker)]
    code = 0
    for w in workers:
        home = os.path.join(os.environ["STUB_ROOT"], f"worker{w}")
        os.makedirs(home, exist_ok=True)
        code = max(code, subprocess.run(["bash", "-c", command], env={**os.environ, "HOME": home}).returncode)
    sys.exit(code)
'''

FAKE_BLT = r'''#!/usr/bin/env bash
python3 - "$@" <<'EOF'
import json, os, sys
env = {k: os.environ.get(k) for k in ("LIBTPU_INIT_ARGS", "SPACED", "FROM_SHELL")}
with open(os.environ["STUB_BLT_LOG"], "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "env": env, "home": os.environ["HOME"]}) + "\n")
EOF
if [ -n "${STUB_BLT_SLEEP:-}" ]; then exec sleep "$STUB_BLT_SLEEP"; fi
'''


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def stubs(tmp_path):
    """Environment for running a launcher with the stubs first on PATH; `calls()` reads what they recorded,
    `blt_calls()` what the stub `blt` recorded."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("gcloud", "xpk", "docker", "curl"):
        _executable(bin_dir / tool, RECORDER)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    _executable(venv / "bin" / "blt", FAKE_BLT)
    (tmp_path / "repo").mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TPU_", "CLUSTER", "WORKLOAD", "ENV_FILE", "TRAIN_ENV", "JAX_VERSION", "BUCKET",
                                "STORAGE", "MAX_RESTARTS", "NUM_SLICES", "XPK_ARGS", "LOG_LINES"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", STUB_LOG=str(tmp_path / "calls.jsonl"), STUB_ROOT=str(tmp_path),
               STUB_BLT_LOG=str(tmp_path / "blt.jsonl"), TPU_NAME="blt-test", ZONE="us-east5-a",
               VENV=str(venv), REMOTE_DIR=str(tmp_path / "repo"), TPU_LOCKFILE=str(tmp_path / "libtpu_lockfile"))

    class Stubs:
        root = tmp_path
        environ = env

        def run(self, script: str, *args: str, check: bool = True, **extra_env) -> subprocess.CompletedProcess:
            proc = subprocess.run(["bash", str(LAUNCH / script), *args], env={**env, **extra_env},
                                  capture_output=True, text=True, timeout=120, check=False)
            if check:
                assert proc.returncode == 0, proc.stdout + proc.stderr
            return proc

        def calls(self, tool: str) -> list[dict]:
            log = tmp_path / "calls.jsonl"
            lines = log.read_text().splitlines() if log.exists() else []
            return [c for c in map(json.loads, lines) if c["tool"] == tool]

        def blt_calls(self, expected: int) -> list[dict]:
            log = tmp_path / "blt.jsonl"
            for _ in range(200):  # the jobs start in the background
                if log.exists() and len(log.read_text().splitlines()) >= expected:
                    break
                time.sleep(0.05)
            return [json.loads(line) for line in log.read_text().splitlines()]

    return Stubs()


def _flag(args: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in args if a.startswith(name + "=")]
    assert len(values) == 1, (name, args)
    return values[0]


TRAIN_ARGS = ["--what", "blt", "--preset", "fast-blt-1b", "--store", "gs://b/data", "--run", "/gcs/b/runs/it's a run",
              "--set", "mesh.ici_parallelism=[1,-1,1]", "--set", 'model.name="quoted"']


def _env_file(stubs, text: str) -> str:
    path = stubs.root / "job.env"
    path.write_text(text)
    return str(path)


# ---- tpu_vm.sh ----------------------------------------------------------------------------------------------

def test_tpu_vm_train_runs_the_same_quoted_command_with_env_file_on_every_worker(stubs):
    env_file = _env_file(stubs, "# libtpu flags\nLIBTPU_INIT_ARGS=--xla_tpu_a=true --xla_tpu_b=2\n\n"
                                "SPACED=  two  spaces and 'quotes' \"too\"\nFROM_SHELL\n")
    stubs.run("tpu_vm.sh", "train", *TRAIN_ARGS, STUB_RUN_SSH="1", ENV_FILE=env_file, FROM_SHELL="shell value")
    calls = stubs.blt_calls(2)
    assert len(calls) == 2 and {c["home"] for c in calls} == {str(stubs.root / "worker0"), str(stubs.root / "worker1")}
    for c in calls:
        assert c["argv"] == ["train", *TRAIN_ARGS]
        assert c["cwd"] == str(stubs.root / "repo")
        assert c["env"] == {"LIBTPU_INIT_ARGS": "--xla_tpu_a=true --xla_tpu_b=2",
                            "SPACED": "  two  spaces and 'quotes' \"too\"", "FROM_SHELL": "shell value"}
        log = Path(c["home"]) / "blt-logs"
        assert (log / "job.name").read_text().strip() == "train" and list(log.glob("train-worker*.log"))
    ssh = stubs.calls("gcloud")[0]["args"]
    assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", "blt-test"] and _flag(ssh, "--worker") == "all"


def test_tpu_vm_refuses_bad_env_files_and_the_old_train_env(stubs):
    bad = stubs.run("tpu_vm.sh", "train", "--preset", "tiny", check=False,
                    ENV_FILE=_env_file(stubs, "GOOD=1\nnot a pair\n"))
    assert bad.returncode != 0 and "line 2: expected KEY=VALUE" in bad.stderr
    old = stubs.run("tpu_vm.sh", "train", "--preset", "tiny", check=False, TRAIN_ENV="LIBTPU_INIT_ARGS=--a --b")
    assert old.returncode != 0 and "TRAIN_ENV is replaced by ENV_FILE" in old.stderr
    unset = stubs.run("tpu_vm.sh", "train", "--preset", "tiny", check=False, ENV_FILE=_env_file(stubs, "NOT_SET\n"))
    assert unset.returncode != 0 and "NOT_SET has no value here" in unset.stderr
    assert not stubs.calls("gcloud")  # nothing was started


def test_tpu_vm_prepare_logs_and_stop_wait_for_the_job_and_free_the_tpu(stubs):
    lock = Path(stubs.environ["TPU_LOCKFILE"])
    lock.write_text("")
    stubs.run("tpu_vm.sh", "prepare", "--data", "/gcs/b/corpus", "--store", "gs://b/data", STUB_RUN_SSH="1",
              STUB_BLT_SLEEP="300")
    calls = stubs.blt_calls(2)
    assert [c["argv"] for c in calls] == [["prepare", "--data", "/gcs/b/corpus", "--store", "gs://b/data"]] * 2
    pids = [int((stubs.root / f"worker{w}" / "blt-logs" / "job.pid").read_text()) for w in range(2)]
    try:
        again = stubs.run("tpu_vm.sh", "train", "--preset", "tiny", check=False, STUB_RUN_SSH="1")
        assert again.returncode != 0 and "prepare already runs" in again.stderr
        logs = stubs.run("tpu_vm.sh", "logs", "1", STUB_RUN_SSH="1", LOG_LINES="5", LINES="1")
        assert "prepare-worker" in logs.stdout and "blt prepare --data /gcs/b/corpus" in logs.stdout
        stopped = stubs.run("tpu_vm.sh", "stop", STUB_RUN_SSH="1", STOP_TIMEOUT="20")
        assert stopped.stdout.count("stopped, TPU free") == 2
    finally:
        for pid in pids:  # only if stop failed: the stub jobs this test started, by their ids
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not lock.exists()
    assert not (stubs.root / "worker0" / "blt-logs" / "job.pid").exists()


def test_tpu_vm_setup_pins_jax_from_setup_cfg_and_mounts_the_bucket(stubs):
    pinned = re.search(r"^\s*jax==(\S+)\s*$", (REPO / "setup.cfg").read_text(), re.MULTILINE).group(1)
    stubs.run("tpu_vm.sh", "setup", REPO_URL="https://example.invalid/blt_jax.git", BUCKET="my-bucket")
    script = _flag(stubs.calls("gcloud")[-1]["args"], "--command")
    assert f"JAX_VERSION={pinned}" in script
    assert 'pip install --quiet "jax[tpu]==$JAX_VERSION" -e "$REMOTE_DIR"' in script
    assert "check_install.py" in script
    assert "BUCKETS=my-bucket MOUNT_ROOT=/gcs" in script and 'gcsfuse --implicit-dirs "$B" "$MNT"' in script
    assert "apt-get install -y -qq gcsfuse" in script and 'mountpoint -q "$MNT"' in script
    other = stubs.run("tpu_vm.sh", "setup", check=False, REPO_URL="x", JAX_VERSION="0.4.35")
    assert other.returncode != 0 and f"differs from setup.cfg's jax=={pinned}" in other.stderr
    bad_bucket = stubs.run("tpu_vm.sh", "mount", check=False, BUCKET="gs://my-bucket")
    assert bad_bucket.returncode != 0 and "without gs://" in bad_bucket.stderr


def test_tpu_vm_accelerator_names_and_check_uses_the_distributed_start_up(stubs):
    v5e = stubs.run("tpu_vm.sh", "create", check=False, ACCELERATOR="v5e-16")
    assert v5e.returncode != 0 and "v5litepod-N" in v5e.stderr
    stubs.run("tpu_vm.sh", "create", "--reserved", ACCELERATOR="v5litepod-16", SPOT="1")
    create = stubs.calls("gcloud")[-1]["args"]
    assert _flag(create, "--accelerator-type") == "v5litepod-16" and _flag(create, "--version") == "v2-alpha-tpuv5-lite"
    assert "--spot" in create and create[-1] == "--reserved"
    # check runs for real here, in this project's venv: one process, one device
    check = stubs.run("tpu_vm.sh", "check", STUB_RUN_SSH="1", STUB_WORKERS="1",
                      VENV=str(Path(sys.executable).parents[1]))
    assert "distributed.initialize()" in _flag(stubs.calls("gcloud")[-1]["args"], "--command")
    assert check.stdout.splitlines()[-1] == "0 1 1 1"


# ---- xpk.sh -------------------------------------------------------------------------------------------------

XPK_ENV = {"CLUSTER": "blt-cluster", "WORKLOAD": "blt-1b-a", "TPU_TYPE": "v5p-256", "DOCKER_IMAGE": "img:v1",
           "STORAGE": "blt-bucket"}


def test_xpk_create_passes_env_file_restarts_storage_and_a_quoted_command(stubs, tmp_path):
    env_file = _env_file(stubs, "LIBTPU_INIT_ARGS=--xla_tpu_a=true --xla_tpu_b=2\n")
    stubs.run("xpk.sh", "create", *TRAIN_ARGS, **XPK_ENV, NUM_SLICES="2", MAX_RESTARTS="10", ENV_FILE=env_file)
    args = stubs.calls("xpk")[-1]["args"]
    assert args[:2] == ["workload", "create"]
    assert _flag(args, "--workload") == "blt-1b-a" and _flag(args, "--num-slices") == "2"
    assert _flag(args, "--storage") == "blt-bucket"
    assert _flag(args, "--env-file") == env_file
    assert stubs.calls("xpk")[-1]["env_file"] == "LIBTPU_INIT_ARGS=--xla_tpu_a=true --xla_tpu_b=2\n"
    assert _flag(args, "--max-restarts") == "10"
    # the restart policy and blt's exit statuses agree: a SIGTERM'd run (checkpoint saved) and a crash
    # restart; a refused flag or input does not; xpk itself restarts on 42 and 127-255 (signals)
    codes = {int(c) for c in _flag(args, "--restart-on-exit-codes").split(",")}
    assert codes == {exit_codes.INTERRUPTED, exit_codes.CRASHED}
    assert exit_codes.ERROR not in codes | {42} | set(range(127, 256))
    assert not any(a.startswith("--restart-on-user-code-failure") for a in args)
    # the command, run by a shell as xpk runs it, gives blt exactly these arguments (+ the slices' mesh)
    fake_bin = tmp_path / "fakebin"
    fake_bin.mkdir()
    _executable(fake_bin / "blt", FAKE_BLT)
    subprocess.run(["bash", "-c", _flag(args, "--command")], check=True,
                   env={**stubs.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}"})
    assert stubs.blt_calls(1)[-1]["argv"] == ["train", *TRAIN_ARGS, "--set", "mesh.dcn_parallelism=[2,1,1]"]


def test_xpk_refuses_what_xpk_or_the_pods_would_get_wrong(stubs):
    cases = {
        "Blt-Run": "must start with a lowercase letter", "1blt": "must start with a lowercase letter",
        "blt-": "not end in a dash", "b" * 41: "41 characters, at most 40",
    }
    for name, message in cases.items():
        proc = stubs.run("xpk.sh", "create", "--preset", "tiny", check=False, **{**XPK_ENV, "WORKLOAD": name})
        assert proc.returncode != 0 and message in proc.stderr, name
    no_storage = stubs.run("xpk.sh", "create", "--preset", "tiny", check=False, **{**XPK_ENV, "STORAGE": ""})
    assert no_storage.returncode != 0 and "set STORAGE" in no_storage.stderr
    quote = stubs.run("xpk.sh", "create", "--preset", "tiny", check=False, **XPK_ENV,
                      ENV_FILE=_env_file(stubs, 'A="quoted"\n'))
    assert quote.returncode != 0 and "xpk cannot pass" in quote.stderr
    assert not stubs.calls("xpk")
    stubs.run("xpk.sh", "create", "--preset", "tiny", **{**XPK_ENV, "WORKLOAD": "b" * 40}, MAX_RESTARTS="0")
    args = stubs.calls("xpk")[-1]["args"]
    assert not any(a.startswith("--restart-on-exit-codes") for a in args)  # no restarts asked for


def test_xpk_prepare_storage_and_build(stubs):
    stubs.run("xpk.sh", "prepare", "--data", "/gcs/b/corpus", "--store", "gs://b/data", **XPK_ENV, NUM_SLICES="2")
    command = _flag(stubs.calls("xpk")[-1]["args"], "--command")
    assert command == "blt prepare --data /gcs/b/corpus --store gs://b/data"  # no mesh flags for prepare
    stubs.run("xpk.sh", "storage", CLUSTER="blt-cluster", STORAGE="blt-bucket", BUCKET="my-bucket", ZONE="z")
    attach = stubs.calls("xpk")[-1]["args"]
    assert attach[:3] == ["storage", "attach", "blt-bucket"]
    assert _flag(attach, "--type") == "gcsfuse" and _flag(attach, "--bucket") == "my-bucket"
    assert _flag(attach, "--mount-point") == "/gcs/my-bucket" and _flag(attach, "--readonly") == "false"
    assert _flag(attach, "--size") == "1" and _flag(attach, "--cluster") == "blt-cluster"
    stubs.run("xpk.sh", "build", DOCKER_IMAGE="img:v2")
    build, push = stubs.calls("docker")
    assert build["args"][:3] == ["build", "--platform", "linux/amd64"] and build["args"][-1] == str(REPO)
    assert push["args"] == ["push", "img:v2"]


def test_the_image_leaves_out_what_it_does_not_need():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "build", "dist", "*.egg-info"} <= set(ignored)
    dockerfile = (LAUNCH / "Dockerfile").read_text()
    assert "check_install.py --source /app" in dockerfile and "ARG JAX_VERSION" not in dockerfile


# ---- local.py and the distributed start-up ------------------------------------------------------------------

def _local():
    sys.path.insert(0, str(LAUNCH))
    try:
        import local  # noqa: PLC0415 (launch/ is not a package: imported from its folder)
    finally:
        sys.path.remove(str(LAUNCH))
    return local


def test_local_launcher_ends_the_job_when_any_process_fails(tmp_path, capsys):
    """Process 1 fails while process 0 would run for minutes: the launcher stops process 0 at once and
    returns process 1's status (it used to poll only the first running process), and names process 1."""
    local = _local()
    marker = tmp_path / "process0-finished"
    script = ("import os, sys, time\n"
              "if os.environ['BLT_PROCESS_ID'] == '1':\n    time.sleep(0.5)\n    sys.exit(3)\n"
              f"time.sleep(120)\nopen({str(marker)!r}, 'w').close()\n")
    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        code = local.launch([sys.executable, "-c", script], 2, 1, timeout=100, out=f)
    assert code == 3
    assert not marker.exists()  # process 0 was stopped, not waited for
    assert capsys.readouterr().err == "launch/local.py: process 1 of 2 exited with status 3; the others were stopped\n"


def test_local_launcher_names_the_process_that_died_first(tmp_path, capsys):
    """A probe: SIGKILL to process 1 of a 2-process job; the only line said process 0 failed (a Gloo error: its
    peer was gone), nothing about process 1. Here process 0 fails the same way once process 1 is gone: the
    launcher names process 1, the first to end, and how it ended, and returns its status."""
    local = _local()
    pid_file = tmp_path / "pid1"
    script = ("import os, signal, sys, time\n"
              "if os.environ['BLT_PROCESS_ID'] == '1':\n"
              f"    open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n"
              "def gone():\n"
              f"    if not os.path.exists({str(pid_file)!r}): return False\n"
              "    try:\n"
              f"        os.kill(int(open({str(pid_file)!r}).read()), 0)\n"
              "    except (ProcessLookupError, ValueError):\n"
              "        return True\n"
              "    return False\n"
              "deadline = time.time() + 60\n"
              "while not gone() and time.time() < deadline:\n"
              "    time.sleep(0.01)\n"
              "print('RuntimeError: Gloo: connection closed by peer', flush=True)\n"
              "sys.exit(1)\n")
    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        code = local.launch([sys.executable, "-c", script], 2, 1, timeout=100, out=f)
    assert code == -signal.SIGKILL, out.read_text()
    err = capsys.readouterr().err
    assert err.startswith("launch/local.py: process 1 of 2 was killed by SIGKILL") and err.count("\n") == 1, err


def test_local_launcher_says_when_its_timeout_stopped_the_job(tmp_path, capsys):
    local = _local()
    with open(tmp_path / "out.txt", "w") as f:
        code = local.launch([sys.executable, "-c", "import time; time.sleep(60)"], 2, 1, timeout=1, out=f)
    assert code == 124
    assert capsys.readouterr().err == "launch/local.py: --timeout 1 s passed; the processes were stopped\n"


def test_local_launcher_help_describes_its_options_with_an_example():
    """A probe: `launch/local.py --help` printed only a usage line (and exit status 2)."""
    proc = subprocess.run([sys.executable, str(LAUNCH / "local.py"), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    for text in ("joined by `jax.distributed`", "--num-processes", "--devices-per-process", "--timeout", "--port",
                 "example", "-- \\\n      blt train"):
        assert text in proc.stdout, text
    proc = subprocess.run([sys.executable, str(LAUNCH / "local.py"), "--num-processes", "2"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == ("launch/local.py: error: give the command to run after --, e.g. "
                                            "launch/local.py --num-processes 2 -- blt params")


def test_local_launcher_finds_blt_beside_its_python_and_refuses_a_missing_command(tmp_path, monkeypatch, capsys):
    """A probe: `.venv/bin/python launch/local.py -- blt ...` without the venv on PATH ended in a
    FileNotFoundError traceback (and so did any misspelt command)."""
    local = _local()
    monkeypatch.setenv("PATH", str(tmp_path))  # neither blt nor anything else on PATH
    assert local.resolve("blt") == str(Path(sys.executable).parent / "blt")
    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        assert local.launch(["blt", "params", "--preset", "tiny"], 1, 1, timeout=100, out=f) == 0
    assert "total_blt" in out.read_text()
    assert local.main(["--num-processes", "2", "--", "nosuchcmd"]) == 2
    assert capsys.readouterr().err.strip() == (f"launch/local.py: error: nosuchcmd: not found on PATH nor next to "
                                               f"{sys.executable}")


def test_explicit_settings_turn_cluster_detection_off(monkeypatch):
    """With coordinator settings given, jax must not auto-detect Slurm, which would bind one GPU per process
    (local_device_ids=[SLURM_LOCALID]) although one process per host drives all its GPUs."""
    import jax  # noqa: PLC0415

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.config, "update", lambda *a: None)
    monkeypatch.setattr(distributed, "_initialized", False)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    cfg = distributed.DistributedConfig(coordinator="host0:1234", num_processes=2, process_id=1)
    assert distributed.initialize(cfg) is True
    assert calls and calls[0]["cluster_detection_method"] == "deactivate" and "local_device_ids" not in calls[0]
