"""A throwaway Slurm cluster, started and stopped by the tests: one node on loopback, or two
nodes in network namespaces of their own (`num_nodes=2`, see below).

Everything lives under one directory the caller gives (keep it short, e.g. under /tmp:
unix socket paths are limited to ~100 bytes): a fresh MUNGE key and munged with its own
socket, a generated slurm.conf with free ports, slurmctld and slurmd in the foreground
as child processes, their state, spool and logs. Client commands reach this cluster, and
not any other, through `SLURM_CONF` in `cluster.env`; the conf's `AuthInfo=socket=...`
points them at our munged.

    with temporary_slurm_cluster() as cluster:
        job_id = cluster.sbatch("#!/bin/bash\nsrun hostname\n", "--ntasks=1", wait=True)
        assert cluster.job_state(job_id) == "COMPLETED"

With `num_nodes=2` the nodes are two hosts as far as the jobs can tell (tests/netns.py):
each slurmd runs in its own network namespace with its own address on a veth link between
them (10.250.0.1 and .2), its own hosts file and hostname (`node0`, `node1`); slurmctld
runs on node0 at its link address. Everything else — the filesystem, munged's unix
socket, the process table — is shared. Client commands must then run on node0 too:
`run()`/`sbatch()` do so, and `exec_prefix` is the prefix for any other command (e.g. a
script that calls sbatch itself).

What it deliberately leaves out: accounting (no slurmdbd, so no `sacct`; finished jobs
are read back from a jobcomp/filetxt log instead), cgroups (proctrack/linuxproc and
task/none, which work in containers), and memory as a consumable (CR_Core). All daemons
run as the current user, which must be root: slurmd launches jobs.

`stop()` stops only what `start()` started, by pid: jobs are cancelled first, then
slurmd, slurmctld and munged get SIGTERM, then SIGKILL; with two nodes, whatever still
runs inside their namespaces is killed and the namespaces, link and hosts files removed,
also when `start()` fails. The binaries come from tools/install_slurm.sh.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from tests.netns import NodeNetwork

_REPO_ROOT = Path(__file__).resolve().parents[1]
_INSTALL_HINT = f"run `bash {_REPO_ROOT / 'tools' / 'install_slurm.sh'}` (as root)"
_REQUIRED_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
# The daemons live in /usr/sbin, which a non-root PATH may lack.
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
# Longest socket name below the spool dir is "<node>_<job>.<step>"; leave it room in sun_path (108).
_MAX_ROOT_DIR_CHARS = 60
# Inherited variables that would steer client commands at another cluster or job.
_FOREIGN_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_", "SCANCEL_")
FINISHED_STATES = frozenset(
    {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)

T = TypeVar("T")


class SlurmCommandError(RuntimeError):
    """A Slurm client command exited non-zero; the message holds its stderr."""


def find_slurm_binaries() -> dict[str, str]:
    """Absolute path of every binary the cluster needs; FileNotFoundError names the missing ones."""
    found = {name: shutil.which(name, path=_SEARCH_PATH) for name in _REQUIRED_BINARIES}
    missing = sorted(name for name, path in found.items() if path is None)
    if missing:
        raise FileNotFoundError(f"Slurm/MUNGE binaries not found: {', '.join(missing)}; {_INSTALL_HINT}")
    return {name: str(path) for name, path in found.items()}


def _free_tcp_port() -> int:
    # slurmctld and slurmd bind every address, so probe every address.
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _memory_mib_for_slurm() -> int:
    with open("/proc/meminfo") as meminfo:
        total_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    # Slack below what slurmd measures, so the node never registers with less than configured.
    return max(1, int(total_kib / 1024 * 0.9))


def _tail(path: Path, num_lines: int) -> str:
    if not path.exists():
        return f"--- {path.name}: (missing)"
    lines = path.read_text(errors="replace").splitlines()[-num_lines:]
    return f"--- {path.name} (last {len(lines)} lines):\n" + "\n".join(lines)


class SlurmCluster:
    """One slurmctld + a slurmd per node + munged, all under `root_dir` (see the module docstring).

    Args:
        root_dir: an existing or new directory, short (≤ 60 chars), owned by this user;
            everything the cluster writes goes here. It is not removed by `stop()`.
        partition: name of the single, default partition.
        start_timeout_s: how long `start()` waits for the nodes to become idle.
        num_nodes: 1 (loopback, the host's name) or 2 (namespaces `node0` and `node1`).
    """

    def __init__(self, root_dir: str | os.PathLike, *, partition: str = "debug", start_timeout_s: float = 30.0,
                 num_nodes: int = 1):
        self.root_dir = Path(root_dir).absolute()
        if len(str(self.root_dir)) > _MAX_ROOT_DIR_CHARS:
            raise ValueError(
                f"root_dir {str(self.root_dir)!r} is {len(str(self.root_dir))} chars; unix socket paths below it "
                f"would overflow, use a directory of at most {_MAX_ROOT_DIR_CHARS} chars, "
                f"e.g. tempfile.mkdtemp(prefix='slurm-', dir='/tmp')"
            )
        self.partition = partition
        self.start_timeout_s = start_timeout_s
        self.network = NodeNetwork(num_nodes) if num_nodes > 1 else None
        self.node_names = self.network.node_names if self.network else [socket.gethostname().split(".")[0]]
        self.node_addresses = self.network.addresses if self.network else ["127.0.0.1"]
        self.node_name = self.node_names[0]  # the first node: slurmctld's, and where batch scripts run
        self.num_cpus = os.cpu_count() or 1
        self.conf_path = self.root_dir / "slurm.conf"
        self.munge_socket = self.root_dir / "munge.socket"
        self.job_dir = self.root_dir / "jobs"
        self.slurmctld_port: int | None = None
        self.slurmd_port: int | None = None
        self._binaries: dict[str, str] = {}
        self._daemons: dict[str, subprocess.Popen] = {}  # started order: munged, slurmctld, slurmd[-<node>]

    # ---- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> SlurmCluster:
        """Writes the key and conf, starts the daemons, and waits until the node is idle."""
        if self._daemons:
            raise RuntimeError("SlurmCluster.start() called twice; stop() it first")
        if os.geteuid() != 0:
            raise PermissionError("SlurmCluster needs root: slurmd launches the jobs and munged runs with --force")
        self._binaries = find_slurm_binaries()
        for subdir in ("state", "spool", "jobs", *(f"spool/{name}" for name in self.node_names if self.network)):
            (self.root_dir / subdir).mkdir(parents=True, exist_ok=True)
        # munged refuses a key or socket directory that group/others may write to.
        self.root_dir.chmod(0o755)
        self._write_munge_key()
        self.slurmctld_port, self.slurmd_port = _free_tcp_port(), _free_tcp_port()
        while self.slurmd_port == self.slurmctld_port:
            self.slurmd_port = _free_tcp_port()
        (self.root_dir / "plugstack.conf").write_text("")  # not /etc/slurm's: no SPANK plugins
        self.conf_path.write_text(self._slurm_conf())
        atexit.register(self.stop)
        try:
            if self.network:
                self.network.create()
            self._start_daemon("munged", [
                "-F", "--force", f"--socket={self.munge_socket}", f"--key-file={self.root_dir / 'munge.key'}",
                f"--pid-file={self.root_dir / 'munged.pid'}", f"--log-file={self.root_dir / 'munged.log'}",
                f"--seed-file={self.root_dir / 'munged.seed'}",
            ])
            self.wait_for(self.munge_socket.exists, timeout_s=10, what="munged's socket")
            self._start_daemon("slurmctld", ["-D", "-f", str(self.conf_path)], node=0)
            for node, name in enumerate(self.node_names):
                self._start_daemon(self._slurmd(node), ["-D", "-f", str(self.conf_path), "-N", name], node=node)
            self.wait_for(lambda: all(self.node_state(name) == "idle" for name in self.node_names),
                          timeout_s=self.start_timeout_s, what="nodes idle")
        except BaseException as error:
            logs = self.log_tail()
            self.stop()
            if not isinstance(error, Exception):  # KeyboardInterrupt and the like pass through as they are
                raise
            raise RuntimeError(f"Slurm cluster in {self.root_dir} did not start: {error}\n{logs}") from error
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Cancels the jobs, then stops slurmd, slurmctld and munged by pid. Idempotent."""
        atexit.unregister(self.stop)
        if not self._daemons:
            return
        try:
            if self._is_running("slurmctld"):
                self._cancel_all_jobs(timeout_s)
            for name in [self._slurmd(node) for node in range(len(self.node_names))] + ["slurmctld", "munged"]:
                if name in self._daemons:
                    self._terminate(self._daemons[name], timeout_s)
            self._kill_orphaned_steps()
            self._daemons.clear()
        finally:
            if self.network:
                self.network.remove()

    def stop_daemon(self, name: str, timeout_s: float = 10.0) -> None:
        """Stops one daemon (e.g. 'slurmd-node1': a node that goes away) by pid; the others run on."""
        self._terminate(self._daemons.pop(name), timeout_s)

    def exec_prefix(self, node: int = 0) -> list[str]:
        """The prefix that runs a command on node `node` (in its namespace); [] for one node."""
        return self.network.exec_prefix(node) if self.network else []

    def _slurmd(self, node: int) -> str:
        return "slurmd" if node == 0 else f"slurmd-{self.node_names[node]}"

    @property
    def daemon_pids(self) -> dict[str, int]:
        """{'munged': pid, 'slurmctld': pid, 'slurmd': pid, ('slurmd-node1': pid)} for the daemons
        started and not yet stopped."""
        return {name: process.pid for name, process in self._daemons.items()}

    @property
    def env(self) -> dict[str, str]:
        """os.environ without foreign SLURM_*/SBATCH_*/... variables, plus SLURM_CONF for this cluster."""
        env = {key: value for key, value in os.environ.items() if not key.startswith(_FOREIGN_ENV_PREFIXES)}
        env["SLURM_CONF"] = str(self.conf_path)
        env["PATH"] = _SEARCH_PATH
        return env

    # ---- client commands ----------------------------------------------------------------

    def run(
        self, *args: str, env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
        input: str | None = None, check: bool = True, timeout_s: float | None = 60.0,
    ) -> subprocess.CompletedProcess:
        """Runs a Slurm client command (`run("squeue", "-h")`) against this cluster.

        Raises SlurmCommandError with its stderr when it exits non-zero, unless check=False.
        """
        result = subprocess.run(
            [*self.exec_prefix(), *args], env={**self.env, **(env or {})}, cwd=cwd, input=input,
            capture_output=True, text=True, timeout=timeout_s,
        )
        if check and result.returncode != 0:
            raise SlurmCommandError(
                f"`{' '.join(args)}` exited {result.returncode}: {result.stderr.strip() or result.stdout.strip()}"
            )
        return result

    def sbatch(
        self, script: str | os.PathLike, *args: str, wait: bool = False, env: dict[str, str] | None = None,
        cwd: str | os.PathLike | None = None, timeout_s: float | None = None,
    ) -> int:
        """Submits a batch job and returns its id.

        Args:
            script: a path (os.PathLike) to a script file, or the script's text (a str
                starting with "#!"), which is handed to sbatch on stdin.
            args: extra sbatch options, e.g. "--ntasks=2", "--requeue".
            wait: pass --wait: return only when the job has ended; a job that fails raises.
            env: variables added to `self.env`; sbatch exports them into the job.
            cwd: submission (and so job) directory; default `root_dir/jobs`, where the
                default slurm-<id>.out files then land.
            timeout_s: limit for the sbatch command, with wait=True the whole job; None: none.
        """
        if isinstance(script, str):
            if not script.startswith("#!"):
                raise ValueError("sbatch(script=...): a str is the script's text and must start with '#!'; "
                                 "pass a pathlib.Path to submit a script file")
            script_args, stdin = [], script
        else:
            script_args, stdin = [str(script)], None
        command = ["sbatch", "--parsable", *(["--wait"] if wait else []), *args, *script_args]
        result = self.run(*command, env=env, cwd=cwd or self.job_dir, timeout_s=timeout_s, input=stdin, check=False)
        first_line = (result.stdout.strip().splitlines() or [""])[0]
        job_id_text = first_line.split(";")[0]  # --parsable prints "<id>" or "<id>;<cluster>"
        if not job_id_text.isdigit():
            raise SlurmCommandError(f"`{' '.join(command)}` exited {result.returncode}: {result.stderr.strip()}")
        if result.returncode != 0:  # with --wait, sbatch exits with the job's exit code
            raise SlurmCommandError(
                f"job {job_id_text} exited {result.returncode} ({self.job_state(int(job_id_text))}); "
                f"its output is in {cwd or self.job_dir}/slurm-{job_id_text}.out unless the script redirected it"
            )
        return int(job_id_text)

    def scancel(self, job_id: int, *args: str) -> None:
        self.run("scancel", *args, str(job_id))

    def job_state(self, job_id: int) -> str | None:
        """The job's state (PENDING, RUNNING, COMPLETED, CANCELLED, ...), or None if unknown.

        Live jobs come from slurmctld; jobs it has already purged (MinJobAge) from the
        jobcomp log, which holds every finished job.
        """
        result = self.run("scontrol", "show", "job", "--oneliner", str(job_id), check=False)
        if result.returncode == 0:
            fields = dict(field.split("=", 1) for field in result.stdout.split() if "=" in field)
            return fields.get("JobState")
        if "Invalid job id" not in result.stderr:
            raise SlurmCommandError(f"`scontrol show job {job_id}` exited {result.returncode}: {result.stderr.strip()}")
        return self._finished_job_states().get(job_id)

    def node_state(self, node_name: str | None = None) -> str | None:
        """sinfo's state of a node, by default the first ('idle', 'mixed', 'allocated', 'down*', ...),
        None if unreachable."""
        result = self.run("sinfo", "--noheader", f"--nodes={node_name or self.node_name}", "--format=%T", check=False)
        return (result.stdout.strip() or None) if result.returncode == 0 else None

    def wait_for_state(self, job_id: int, states: str | set[str] | frozenset[str], timeout_s: float = 30.0) -> str:
        """Waits until the job is in one of `states` (e.g. "RUNNING", FINISHED_STATES); returns that state."""
        wanted = {states} if isinstance(states, str) else set(states)
        try:
            return self.wait_for(
                lambda: (state := self.job_state(job_id)) in wanted and state,
                timeout_s=timeout_s, what=f"job {job_id} to be {' or '.join(sorted(wanted))}",
            )
        except TimeoutError as error:
            raise TimeoutError(f"{error}; it is {self.job_state(job_id)}") from None

    def wait_for(self, predicate: Callable[[], T], timeout_s: float, *, interval_s: float = 0.2, what: str = "") -> T:
        """Polls `predicate` until it returns something truthy, and returns that; else TimeoutError."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_daemons_alive()
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what or predicate}")
            time.sleep(interval_s)

    def log_tail(self, num_lines: int = 30) -> str:
        """The last lines of every daemon's output, for error messages.

        In the foreground (-D/-F) the daemons log everything, early fatal errors included,
        to stderr, captured in <daemon>.out; <daemon>.log has the same lines with timestamps.
        """
        names = ("munged.out", "slurmctld.out", *(f"{self._slurmd(i)}.out" for i in range(len(self.node_names))))
        return "\n".join(_tail(self.root_dir / name, num_lines) for name in names)

    # ---- internals ----------------------------------------------------------------------

    def _write_munge_key(self) -> None:
        key_path = self.root_dir / "munge.key"
        key_path.unlink(missing_ok=True)
        # Same as `mungekey --create` (1024 random bits), without depending on it.
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as key_file:
            key_file.write(os.urandom(128))

    def _slurm_conf(self) -> str:
        root = self.root_dir
        per_node = "/%n" if self.network else ""  # several slurmds: a spool dir, pid and log file each
        # Every node offers all CPUs: with two nodes on one machine they share them.
        nodes = "\n".join(
            f"NodeName={name} NodeHostname={name} NodeAddr={address} CPUs={self.num_cpus} "
            f"RealMemory={_memory_mib_for_slurm()} State=UNKNOWN"
            for name, address in zip(self.node_names, self.node_addresses)
        )
        return f"""\
# Generated by tests/slurm_cluster.py: {len(self.node_names)}-node test cluster.
ClusterName=sdpgtest
SlurmctldHost={self.node_name}({self.node_addresses[0]})
SlurmctldPort={self.slurmctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Clients and daemons talk to our munged; cred_expire also sets how long a requeued job is held.
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}{per_node}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd'}{per_node}.pid
SlurmctldLogFile={root / 'slurmctld.log'}
SlurmdLogFile={root / 'slurmd'}{per_node.replace('/', '-')}.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={root / 'plugstack.conf'}
# No cgroups: these work in an unprivileged container.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# No slurmdbd: finished jobs are logged here and read back by job_state().
JobCompType=jobcomp/filetxt
JobCompLoc={root / 'jobcomp.log'}
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Scheduling passes every second, not every 30-60 s: a requeued job starts once eligible.
SchedulerParameters=sched_interval=1,bf_interval=1
# The conf's CPUs/RealMemory win over what slurmd measures; no drain on mismatch.
SlurmdParameters=config_overrides
ReturnToService=2
# Short timeouts: a test should not wait on Slurm's production defaults.
# MinJobAge <= 4 also keeps `sbatch --wait` polling every 2 s instead of 8-32 s.
MinJobAge=4
KillWait=2
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
{nodes}
PartitionName={self.partition} Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE State=UP
"""

    def _start_daemon(self, name: str, args: list[str], node: int | None = None) -> None:
        # --pdeathsig: the daemon gets SIGTERM if we die without calling stop(). The kernel ties
        # it to the starting *thread*, so start() from one that outlives the cluster (pytest's main).
        # On a node (namespace) the prefix execs down to the daemon, which keeps the pid we stop.
        pdeathsig = ["setpriv", "--pdeathsig", "TERM"] if shutil.which("setpriv") else []
        prefix = self.exec_prefix(node) if node is not None else []
        with open(self.root_dir / f"{name}.out", "ab") as output:
            self._daemons[name] = subprocess.Popen(
                [*pdeathsig, *prefix, self._binaries[name.split("-")[0]], *args], env=self.env, cwd=self.root_dir,
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def _is_running(self, name: str) -> bool:
        return name in self._daemons and self._daemons[name].poll() is None

    def _check_daemons_alive(self) -> None:
        for name, process in self._daemons.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} (pid {process.pid}) exited with code {process.returncode}")

    def _cancel_all_jobs(self, timeout_s: float) -> None:
        def live_job_ids() -> list[str]:
            result = self.run("squeue", "--noheader", "--format=%A", check=False)
            return result.stdout.split() if result.returncode == 0 else []

        job_ids = live_job_ids()
        if not job_ids:
            return
        self.run("scancel", *job_ids, check=False)
        deadline = time.monotonic() + timeout_s
        while live_job_ids() and time.monotonic() < deadline:
            time.sleep(0.2)

    @staticmethod
    def _terminate(process: subprocess.Popen, timeout_s: float) -> None:
        if process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)

    def _kill_orphaned_steps(self) -> None:
        """SIGKILLs slurmstepd processes of this cluster left behind, and everything below them.

        slurmstepd detaches from slurmd, so a step that survived the cancel (slurmctld gone,
        KillWait not elapsed) outlives the daemons. Ours are told apart by SLURM_CONF in
        their environment, which names this cluster's own conf file.
        """
        marker = f"SLURM_CONF={self.conf_path}".encode()
        parent_of: dict[int, int] = {}
        stepd_pids: list[int] = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (proc / "stat").read_text()
                parent_of[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])
                is_stepd = stat.split("(", 1)[1].startswith("slurmstepd)")
                if is_stepd and marker in (proc / "environ").read_bytes().split(b"\0"):
                    stepd_pids.append(int(proc.name))
        doomed = set(stepd_pids)
        while grown := {pid for pid, parent in parent_of.items() if parent in doomed and pid not in doomed}:
            doomed |= grown
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _finished_job_states(self) -> dict[int, str]:
        path = self.root_dir / "jobcomp.log"
        if not path.exists():
            return {}
        states = {}
        for line in path.read_text(errors="replace").splitlines():
            fields = dict(field.split("=", 1) for field in line.split() if "=" in field)
            if "JobId" in fields and "JobState" in fields:
                states[int(fields["JobId"])] = fields["JobState"]  # a requeued job's last line wins
        return states


@contextlib.contextmanager
def temporary_slurm_cluster(**kwargs) -> Iterator[SlurmCluster]:
    """A started SlurmCluster in a fresh short directory under /tmp, removed afterwards.

    For a session-scoped fixture:

        @pytest.fixture(scope="session")
        def slurm_cluster():
            with temporary_slurm_cluster() as cluster:
                yield cluster
    """
    root_dir = tempfile.mkdtemp(prefix="slurm-", dir="/tmp")
    try:
        with SlurmCluster(root_dir, **kwargs) as cluster:
            yield cluster
    finally:
        shutil.rmtree(root_dir, ignore_errors=True)
