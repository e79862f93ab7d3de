"""Find a target's llama-server process on this host; read its command line, environment, process
group and resident memory.

A target is found, in this order of preference, by
- a pid file the operator configured (authoritative: when it is set, a broken one is reported
  rather than guessed around);
- the TCP port it listens on: LISTEN sockets on that port in /proc/net/tcp and /proc/net/tcp6,
  then the process holding such a socket, from the `socket:[inode]` links in /proc/<pid>/fd;
- its process name: /proc/<pid>/comm, or the basename of argv[0].

Everything is read from a proc root (`/proc` by default) that tests replace with a fake tree.
No lookup raises: each returns a `ProcessLookup` whose pid is None with a reason when it fails.

What the exporter can see is bounded by the namespaces it runs in:
- another host: no lookup can find the server; the target gets no per-process series.
- another PID namespace (the exporter in a container without `hostPID: true` on Kubernetes or
  `--pid=host` on Docker): the server's process is not in /proc. A port lookup still sees its
  socket in /proc/net/tcp when both share a network namespace, and reports `not_visible`;
  otherwise `not_listening` or `not_found`. NVML lists GPU processes by their pid in the host
  namespace, so a pid from another namespace would not match anyway.
- another network namespace: /proc/net/tcp lists only the exporter's own namespace's sockets,
  so a port lookup needs the server's network (host network, or the same pod) or reports
  `not_listening`; use the pid file or the name instead.
- another user: /proc/<pid>/fd is a 0500 directory of that user (listing it needs the same
  uid, root or CAP_DAC_READ_SEARCH) whose links, like /proc/<pid>/environ and cwd, also need
  ptrace read access (the same uid, or CAP_SYS_PTRACE); without them a port lookup reports
  `not_visible`, and `read_environ` and `read_cwd` None.
In each case the GPU collector emits no per-process series for the target, and the lookup's
reason says why; GPU-wide series are unaffected.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from exporter.host.files import open_regular

PROC: Final = Path("/proc")

Method = Literal["pid_file", "port", "name"]
LookupReason = Literal[
    "not_configured",  # no pid file, port or name to look for
    "not_listening",  # no LISTEN socket on the port in this network namespace
    "not_visible",  # a socket listens, but no process this exporter can see holds it
    "not_found",  # no process of that name
    "ambiguous",  # several processes match; guessing would report the wrong one's memory
    "pid_file_unreadable",
    "pid_file_invalid",  # not a positive integer
    "stale_pid_file",  # its process has exited
]

_TCP_LISTEN: Final = "0A"  # include/net/tcp_states.h: TCP_LISTEN = 10
# The kernel keeps a task's comm to TASK_COMM_LEN - 1 characters.
_COMM_LEN: Final = 15
# A pid and a newline; more than this is not a pid file, and is not read into memory.
_PID_FILE_MAX_BYTES: Final = 64


@dataclass(frozen=True)
class ProcessLookup:
    pid: int | None
    method: Method | None  # how it was found, or which lookup failed
    reason: LookupReason | None = None  # set exactly when pid is None


def find_server_pid(
    *,
    port: int | None = None,
    pid_file: Path | None = None,
    name: str | None = None,
    proc_root: Path = PROC,
) -> ProcessLookup:
    """The first configured lookup that finds the process; else the first one's failure."""
    if pid_file is not None:
        return read_pid_file(pid_file, proc_root=proc_root)
    failures: list[ProcessLookup] = []
    if port is not None:
        found = find_listening_pid(port, proc_root=proc_root)
        if found.pid is not None:
            return found
        failures.append(found)
    if name is not None:
        found = find_pid_by_name(name, proc_root=proc_root)
        if found.pid is not None:
            return found
        failures.append(found)
    return failures[0] if failures else ProcessLookup(None, None, "not_configured")


def find_listening_pid(port: int, *, proc_root: Path = PROC) -> ProcessLookup:
    """The process listening on TCP `port` (IPv4 or IPv6, any address)."""
    inodes = _listening_inodes(port, proc_root)
    if not inodes:
        return ProcessLookup(None, "port", "not_listening")
    targets = {f"socket:[{inode}]" for inode in inodes}
    pids = {pid for pid in _pids(proc_root) if _holds_any(proc_root / str(pid) / "fd", targets)}
    if len(pids) == 1:
        return ProcessLookup(pids.pop(), "port")
    # A listening socket inherited across fork is held by parent and child alike.
    return ProcessLookup(None, "port", "ambiguous" if pids else "not_visible")


def read_pid_file(path: Path, *, proc_root: Path = PROC) -> ProcessLookup:
    try:
        # Written by whatever started the server, so possibly a FIFO: opened only if regular.
        with open_regular(path) as f:
            text = f.read(_PID_FILE_MAX_BYTES).decode("ascii", errors="replace").strip()
    except OSError:
        return ProcessLookup(None, "pid_file", "pid_file_unreadable")
    if not text.isdigit() or int(text) <= 0:
        return ProcessLookup(None, "pid_file", "pid_file_invalid")
    pid = int(text)
    if not (proc_root / str(pid)).is_dir():
        return ProcessLookup(None, "pid_file", "stale_pid_file")
    return ProcessLookup(pid, "pid_file")


def find_pid_by_name(name: str, *, proc_root: Path = PROC) -> ProcessLookup:
    """The one process whose comm or argv[0] basename is `name`."""
    pids = [pid for pid in _pids(proc_root) if _is_named(pid, name, proc_root)]
    if len(pids) == 1:
        return ProcessLookup(pids[0], "name")
    return ProcessLookup(None, "name", "ambiguous" if pids else "not_found")


def read_cmdline(pid: int, *, proc_root: Path = PROC) -> tuple[str, ...] | None:
    """argv of `pid`; None if it is gone or unreadable, () for a kernel thread or a zombie."""
    raw = _read_bytes(proc_root / str(pid) / "cmdline")
    if raw is None:
        return None
    args = raw.split(b"\0")
    if args[-1] == b"":  # each argument ends in a NUL, so the split leaves an empty tail
        args.pop()
    return tuple(arg.decode(errors="replace") for arg in args)


def read_environ(pid: int, *, proc_root: Path = PROC) -> dict[str, str] | None:
    """The environment `pid` started with; None if it is gone or not ours to read.

    It may hold secrets (LLAMA_API_KEY): pick the variables needed, never log it whole.
    """
    raw = _read_bytes(proc_root / str(pid) / "environ")
    if raw is None:
        return None
    env: dict[str, str] = {}
    for entry in raw.split(b"\0"):
        key, sep, value = entry.partition(b"=")
        if sep and key:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def read_cwd(pid: int, *, proc_root: Path = PROC) -> Path | None:
    """The working directory of `pid`, against which its relative paths (`-m model.gguf`)
    resolve; None if it is gone or not ours to read (the link needs the same uid as
    /proc/<pid>/environ does)."""
    try:
        target = os.readlink(proc_root / str(pid) / "cwd")
    except OSError:
        return None
    # The kernel writes an absolute path; anything else (a fake tree's slip) is not one to join.
    return Path(target) if os.path.isabs(target) else None


def process_group(pgid: int, *, proc_root: Path = PROC) -> set[int]:
    """Every process in group `pgid`: a server command may be a wrapper that forks the server."""
    pids = set()
    for pid in _pids(proc_root):
        raw = _read_bytes(proc_root / str(pid) / "stat")
        if raw is None:
            continue  # exited meanwhile
        stat = raw.decode("ascii", errors="replace")
        # The command name (field 2) may hold spaces and parentheses: split after the last ")".
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[2] == str(pgid):
            pids.add(pid)
    return pids


def rss_bytes(pids: Iterable[int], *, proc_root: Path = PROC) -> int | None:
    """Resident host memory of `pids` together; None when none of them can be read."""
    total, seen = 0, False
    for pid in pids:
        raw = _read_bytes(proc_root / str(pid) / "status")
        for line in (raw or b"").decode("ascii", errors="replace").splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
                seen = True
    return total if seen else None


def _read_bytes(path: Path) -> bytes | None:
    # Only procfs files come here, read synchronously: the kernel generates them from the
    # process table, they cannot be a FIFO, a device or on a network mount, and a read never
    # waits on anything but the kernel. Files a server names go through exporter.host.files.
    # PermissionError (another user's environ), FileNotFoundError (the process exited) and the
    # rest alike: the caller can only do without the value.
    try:
        return path.read_bytes()
    except OSError:
        return None


def _listening_inodes(port: int, proc_root: Path) -> set[int]:
    inodes: set[int] = set()
    for table in ("tcp", "tcp6"):
        raw = _read_bytes(proc_root / "net" / table)
        if raw is None:
            continue  # no IPv6 in this kernel, or no /proc/net at all
        for line in raw.decode(errors="replace").splitlines()[1:]:
            fields = line.split()
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
            if len(fields) < 10 or fields[3] != _TCP_LISTEN:
                continue
            _, _, hex_port = fields[1].rpartition(":")
            try:
                local_port, inode = int(hex_port, 16), int(fields[9])
            except ValueError:
                continue
            # Inode 0: a socket being torn down, owned by no file descriptor.
            if local_port == port and inode != 0:
                inodes.add(inode)
    return inodes


def _pids(proc_root: Path) -> Iterator[int]:
    try:
        entries = os.listdir(proc_root)
    except OSError:
        return
    for entry in entries:
        if entry.isdigit():
            yield int(entry)


def _holds_any(fd_dir: Path, targets: set[str]) -> bool:
    try:
        fds = os.listdir(fd_dir)
    except OSError:  # another user's process, or it exited during the scan
        return False
    for fd in fds:
        try:
            if os.readlink(fd_dir / fd) in targets:
                return True
        except OSError:  # the descriptor closed since the listing
            continue
    return False


def _is_named(pid: int, name: str, proc_root: Path) -> bool:
    base = proc_root / str(pid)
    comm = _read_bytes(base / "comm")
    if comm is not None:
        comm_name = comm.decode(errors="replace").rstrip("\n")
        if comm_name == name or (len(name) > _COMM_LEN and comm_name == name[:_COMM_LEN]):
            return True
    argv = read_cmdline(pid, proc_root=proc_root)
    return argv is not None and len(argv) > 0 and os.path.basename(argv[0]) == name
