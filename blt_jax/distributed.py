"""Multi-process start-up: `jax.distributed` initialisation for TPU pods, GPU clusters and CPU hosts.

- TPU VM pods and xpk/GKE TPU workloads: jax finds the coordinator itself (`initialize()` with no arguments).
- Elsewhere: the coordinator address, process count and id come from arguments or the environment
  (BLT_COORDINATOR, BLT_NUM_PROCESSES, BLT_PROCESS_ID); on CPU the collectives run over gloo.
- Never in a child process (grain's data workers re-import the entry module): only the parent joins.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
from dataclasses import dataclass
from typing import Optional

ENV_COORDINATOR = "BLT_COORDINATOR"
ENV_NUM_PROCESSES = "BLT_NUM_PROCESSES"
ENV_PROCESS_ID = "BLT_PROCESS_ID"
ENV_LOCAL_DEVICES = "BLT_LOCAL_CPU_DEVICES"
# set on TPU VMs by the runtime; their presence means jax can discover the pod by itself
_TPU_POD_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_ID")


class DistributedError(ValueError):
    """The multi-process settings are incomplete or inconsistent."""


@dataclass(frozen=True)
class DistributedConfig:
    coordinator: Optional[str] = None  # host:port of process 0
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    local_cpu_devices: Optional[int] = None  # virtual CPU devices per process (CPU-only runs and tests)
    initialization_timeout: int = 300
    heartbeat_timeout: int = 100

    @classmethod
    def from_env(cls, **overrides) -> "DistributedConfig":
        """Arguments win over the environment; None means "not given"."""
        def env_int(name):
            value = os.environ.get(name)
            if value in (None, ""):
                return None
            try:
                return int(value)
            except ValueError:
                raise DistributedError(f"{name}={value!r}: expected an integer") from None

        values = dict(coordinator=os.environ.get(ENV_COORDINATOR) or None, num_processes=env_int(ENV_NUM_PROCESSES),
                      process_id=env_int(ENV_PROCESS_ID), local_cpu_devices=env_int(ENV_LOCAL_DEVICES))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def explicit(self) -> bool:
        return any(v is not None for v in (self.coordinator, self.num_processes, self.process_id))

    def validate(self) -> None:
        if not self.explicit:
            return
        missing = [n for n, v in (("coordinator", self.coordinator), ("num_processes", self.num_processes),
                                  ("process_id", self.process_id)) if v is None]
        if missing:
            raise DistributedError(f"multi-process settings are incomplete: {', '.join(missing)} not given "
                                   f"(flags --coordinator/--num-processes/--process-id or {ENV_COORDINATOR}/"
                                   f"{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID})")
        if ":" not in self.coordinator:
            raise DistributedError(f"coordinator {self.coordinator!r}: expected host:port")
        if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
            raise DistributedError(f"process_id {self.process_id} is out of range for {self.num_processes} processes")


def on_tpu_pod() -> bool:
    """A Cloud TPU VM (its runtime's environment, or TPU device files): jax discovers the pod's hosts."""
    return any(k in os.environ for k in _TPU_POD_ENV) or bool(glob.glob("/dev/accel[0-9]*")) or bool(
        glob.glob("/dev/vfio/[0-9]*"))


def is_child_process() -> bool:
    """True inside a multiprocessing child (grain data workers), which must never join the cluster."""
    return multiprocessing.parent_process() is not None


_initialized = False


def initialize(cfg: Optional[DistributedConfig] = None) -> bool:
    """Join the cluster if this run is multi-process; returns whether `jax.distributed` was initialised.

    Must run before any other jax call of the process (jax refuses afterwards).
    """
    global _initialized
    cfg = cfg or DistributedConfig.from_env()
    cfg.validate()
    import jax  # noqa: PLC0415 (the config updates below must precede the backends)

    if cfg.local_cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", cfg.local_cpu_devices)
    if _initialized or is_child_process():
        return _initialized
    if cfg.explicit:
        if cfg.num_processes == 1:
            return False
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        # the settings are complete: no cluster detection, which under Slurm would also bind each process to
        # one GPU (local_device_ids=[SLURM_LOCALID]) where one process per host drives all of its GPUs
        jax.distributed.initialize(coordinator_address=cfg.coordinator, num_processes=cfg.num_processes,
                                   process_id=cfg.process_id, initialization_timeout=cfg.initialization_timeout,
                                   heartbeat_timeout_seconds=cfg.heartbeat_timeout,
                                   cluster_detection_method="deactivate")
    elif on_tpu_pod():
        jax.distributed.initialize()
    else:
        return False
    _initialized = True
    return True


def is_initialized() -> bool:
    """Whether this process joined a jax.distributed job through `initialize`."""
    return _initialized


def shutdown() -> None:
    global _initialized
    if _initialized:
        import jax  # noqa: PLC0415

        jax.distributed.shutdown()
        _initialized = False
