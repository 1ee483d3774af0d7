"""Multi-host start-up: jax.distributed from the config, the environment, or not at all.

Three ways to run:
- one process (the default): nothing to initialise;
- explicit: `coordinator_address`, `num_processes` and `process_id` in the config (or on
  the command line of each process);
- cluster auto-detection: with `distributed=true` and no address, JAX reads SLURM,
  Open MPI and similar environments itself.
`distributed_timeout` bounds the wait for the coordinator and the other processes: an
unreachable coordinator or a wrong process count ends in an error, not a hang.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

import jax
from jax._src import distributed as jax_distributed  # its runtime client: no public API

from jaxface import cli, peers


class DistributedError(RuntimeError):
    """The processes of a multi-host run could not be connected."""


def initialize(cfg) -> bool:
    """Connect this process to the others if the config asks for it; True if it did."""
    explicit = cfg.coordinator_address is not None
    if not explicit and not cfg.distributed:
        return False
    if jax.distributed.is_initialized():
        return True
    # CPU collectives across processes go through gloo (GPUs use NCCL regardless). Asking
    # for the backend here would start it, and initialize() must come first.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Its SIGTERM handling is jaxface's own (jaxface.stopping); unused, the service only
    # adds error lines when a process is lost.
    jax.config.update("jax_enable_preemption_service", False)
    # XLA's own timeout ends in a C++ abort with a stack dump, after minutes of silence;
    # the watchdog below fires first, with a message.
    kwargs = {
        "initialization_timeout": cfg.distributed_timeout + 30,
        "heartbeat_timeout_seconds": peers.xla_heartbeat_timeout(cfg.peer_timeout),
    }
    if explicit and cfg.process_id != 0:
        # XLA aborts the whole process when the coordinator never answers; look first, so
        # that an unreachable address is an error message, not a crash.
        _wait_for_coordinator(cfg.coordinator_address, cfg.distributed_timeout, cfg)
    if explicit:
        kwargs.update(
            coordinator_address=cfg.coordinator_address,
            num_processes=cfg.num_processes,
            process_id=cfg.process_id,
        )
    where = cfg.coordinator_address or "the coordinator the environment names"
    watchdog = threading.Timer(cfg.distributed_timeout, _give_up, (cfg, where))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as exc:  # noqa: BLE001 - jax raises several types for the same failure
        raise DistributedError(
            f"could not join the run at {where} as process {cfg.process_id} of "
            f"{cfg.num_processes} within {cfg.distributed_timeout} s (config keys "
            f"'coordinator_address', 'num_processes', 'process_id'): {exc}"
        ) from None
    finally:
        watchdog.cancel()
    if explicit:
        _check_process_counts(cfg)
    if jax.process_count() > 1:
        state = jax_distributed.global_state
        peers.start(cfg, state.client, state.coordinator_address, cli.debugging())
    return True


def _give_up(cfg, where: str) -> None:
    """The watchdog: initialize() is blocked in C++, so say why and end the process."""
    print(
        f"jaxface.train: error: the run at {where} did not come together within "
        f"{cfg.distributed_timeout} s: this is process {cfg.process_id} of "
        f"{cfg.num_processes}, and not every process joined (config keys 'num_processes', "
        "'coordinator_address', 'distributed_timeout'); start all of them with the same "
        "coordinator and count",
        file=sys.stderr,
        flush=True,
    )
    os._exit(1)


def _check_process_counts(cfg) -> None:
    """Every process must have been started with the coordinator's process count.

    The coordinator alone decides how many processes make the run, so a process told
    another count still joins, and the mismatch would surface as a collective that never
    completes. Each process publishes its count in the coordinator's key-value store and
    compares it with everyone else's before anything else runs."""
    client = jax_distributed.global_state.client
    me, count = jax.process_index(), jax.process_count()
    client.key_value_set(f"jaxface/num_processes/{me}", str(cfg.num_processes))
    timeout_ms = int(cfg.distributed_timeout * 1000)
    for other in range(count):
        try:
            theirs = int(
                client.blocking_key_value_get(f"jaxface/num_processes/{other}", timeout_ms)
            )
        except Exception as exc:  # noqa: BLE001 - the runtime raises its own error types
            raise DistributedError(
                f"process {other} did not report its config within "
                f"{cfg.distributed_timeout} s: {exc}"
            ) from None
        if theirs != cfg.num_processes or count != cfg.num_processes:
            raise DistributedError(
                f"mismatched process counts (config key 'num_processes'): the coordinator "
                f"at {cfg.coordinator_address} runs {count} processes, process {other} was "
                f"started with num_processes={theirs} and this one (process {me}) with "
                f"{cfg.num_processes}; start every process with the same count"
            )


def _wait_for_coordinator(address: str, timeout: float, cfg) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(
            f"config key 'coordinator_address'={address!r} must look like host:port"
        )
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise DistributedError(
                    f"could not join the run at {address} as process {cfg.process_id} of "
                    f"{cfg.num_processes}: nothing answered there within {timeout} s "
                    f"(config key 'coordinator_address'; is process 0 running?): {exc}"
                ) from None
            time.sleep(0.5)
