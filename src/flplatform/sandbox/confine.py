"""Confinement of a sandbox worker, applied by the worker to itself before it reads any
untrusted byte (and before torch starts any thread, so every later thread inherits it).

Layers, each applied when the kernel/process supports it and reported in :class:`Report`:

* resource limits: ``RLIMIT_AS`` (memory), ``RLIMIT_CPU`` (lifetime CPU seconds; the per-call
  guard is the server's wall-clock deadline), ``RLIMIT_FSIZE=0`` (no file can grow),
  ``RLIMIT_NOFILE`` (a few descriptors), ``RLIMIT_NPROC``, ``RLIMIT_CORE=0``;
* when started as root: supplementary groups dropped, then gid/uid of an unprivileged account
  (``nobody`` by default);
* ``PR_SET_NO_NEW_PRIVS`` and ``PR_SET_DUMPABLE=0``;
* Landlock (its three syscalls through ctypes, the ABI probed first): read-only access to
  the Python installation, the import path and shared libraries, nothing else; no write, create,
  remove or truncate anywhere; TCP bind/connect denied (ABI ≥ 4); abstract unix sockets and signals
  outside the sandbox denied (ABI ≥ 6);
* seccomp (``pyseccomp`` over the system ``libseccomp.so.2``), synchronised to all threads: socket
  creation, process creation and exec, opening files for writing, file-system modification,
  ptrace, namespaces, mounts, BPF, io_uring, kernel keyrings and module loading fail with EPERM.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_DUMPABLE = 4

# Landlock file-system rights (linux/landlock.h).
_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_ABI1_FS = (1 << 13) - 1
_REFER, _TRUNCATE, _IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1

# Read-only roots outside the import path that the interpreter and torch read after start-up.
_SYSTEM_READ_ROOTS = (
    "/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib", "/etc/ld.so.cache",
    "/sys/devices/system/cpu", "/proc/self", "/proc/cpuinfo", "/dev/null", "/dev/urandom",
)  # fmt: skip


@dataclass(frozen=True)
class Limits:
    memory_bytes: int
    cpu_seconds: int
    open_files: int = 64
    processes: int = 1024
    unprivileged_user: str = "nobody"


@dataclass
class Report:
    """What is active in this worker (sent to the server and logged there)."""

    rlimits: dict[str, int] = field(default_factory=dict)
    uid: int = -1
    gid: int = -1
    no_new_privs: bool = False
    landlock_abi: int = 0
    landlock: str = "off"
    seccomp: str = "off"
    read_roots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(*args: Any) -> int:
    result = _libc.syscall(*args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(result)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is missing or disabled."""
    try:
        return _syscall(
            _SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), _LANDLOCK_CREATE_RULESET_VERSION
        )
    except OSError:
        return 0


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]  # fmt: skip


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def read_roots() -> list[str]:
    """Paths the worker may read: the import path, the flplatform package, system libraries."""
    import flplatform

    roots = [p for p in sys.path if p and os.path.isabs(p)]
    roots += [str(Path(flplatform.__file__).resolve().parent), sys.base_prefix + "/lib"]
    roots += list(_SYSTEM_READ_ROOTS)
    seen: dict[str, None] = {}
    for root in roots:
        real = os.path.realpath(root)
        if os.path.exists(real):
            seen.setdefault(real, None)
    return list(seen)


def _apply_landlock(abi: int, report: Report) -> None:
    fs = (
        _ABI1_FS
        | (_REFER if abi >= 2 else 0)
        | (_TRUNCATE if abi >= 3 else 0)
        | (_IOCTL_DEV if abi >= 5 else 0)
    )
    attr = _RulesetAttr(
        fs,
        (_NET_BIND_TCP | _NET_CONNECT_TCP) if abi >= 4 else 0,
        (_SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL) if abi >= 6 else 0,
    )
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), 0)
    try:
        for root in read_roots():
            is_dir = os.path.isdir(root)
            allowed = (_READ_FILE | _EXECUTE | _READ_DIR) if is_dir else _READ_FILE
            fd = os.open(root, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = _PathBeneathAttr(allowed, fd)
                _syscall(_SYS_LANDLOCK_ADD_RULE, ruleset, _LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0)
            finally:
                os.close(fd)
            report.read_roots.append(root)
        _syscall(_SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0)
    finally:
        os.close(ruleset)
    parts = ["fs read-only allowlist, no writes"]
    if abi >= 4:
        parts.append("tcp bind/connect denied")
    if abi >= 6:
        parts.append("abstract unix sockets and signals scoped")
    report.landlock = "; ".join(parts)


# Syscalls that always fail with EPERM inside the sandbox.
_DENIED_SYSCALLS = (
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    "execve", "execveat", "fork", "vfork", "ptrace", "process_vm_readv", "process_vm_writev",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "bpf", "perf_event_open",
    "keyctl", "add_key", "request_key", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "reboot", "swapon", "swapoff", "acct", "mknod", "mknodat", "symlink", "symlinkat", "link", "linkat",
    "unlink", "unlinkat", "rename", "renameat", "renameat2", "mkdir", "mkdirat", "rmdir", "chmod", "fchmod",
    "fchmodat", "chown", "fchown", "fchownat", "lchown", "truncate", "creat", "memfd_create",
    "name_to_handle_at", "open_by_handle_at", "setuid", "setgid", "setreuid", "setregid", "setresuid",
    "setresgid", "setgroups", "setfsuid", "setfsgid",
)  # fmt: skip
_WRITE_FLAGS = (os.O_WRONLY, os.O_RDWR, os.O_CREAT, os.O_TRUNC, os.O_APPEND)
_CLONE_THREAD = 0x00010000


def _apply_seccomp(report: Report, seccomp: Any) -> None:
    deny = seccomp.ERRNO(errno.EPERM)
    flt = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    flt.set_attr(seccomp.Attr.CTL_TSYNC, 1)
    skipped = []
    for name in _DENIED_SYSCALLS:
        try:
            flt.add_rule(deny, name)
        except (RuntimeError, ValueError, OSError):
            skipped.append(name)
    # Opening for writing: open(path, flags) and openat(dirfd, path, flags); openat2 hides its
    # flags in a struct, so it reports ENOSYS and the C library falls back to openat.
    for flag in _WRITE_FLAGS:
        flt.add_rule(deny, "open", seccomp.Arg(1, seccomp.MASKED_EQ, flag, flag))
        flt.add_rule(deny, "openat", seccomp.Arg(2, seccomp.MASKED_EQ, flag, flag))
    flt.add_rule(seccomp.ERRNO(errno.ENOSYS), "openat2")
    # New threads yes (clone with CLONE_THREAD), new processes no; clone3 passes its flags in
    # a struct, so it reports ENOSYS and the C library falls back to clone.
    flt.add_rule(deny, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, _CLONE_THREAD, 0))
    flt.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    flt.load()
    report.seccomp = "sockets, exec, process creation, write-opens, fs changes, ptrace, namespaces denied"
    if skipped:
        report.notes.append("seccomp: unknown syscalls skipped: " + ", ".join(skipped))


def _drop_privileges(user: str, report: Report) -> None:
    import pwd

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        entry = None
    uid, gid = (entry.pw_uid, entry.pw_gid) if entry else (65534, 65534)
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def _set_limit(which: int, value: int, name: str, report: Report) -> None:
    try:
        resource.setrlimit(which, (value, value))
        report.rlimits[name] = value
    except (ValueError, OSError) as exc:
        report.notes.append(f"{name} not set: {exc}")


def confine(limits: Limits) -> Report:
    """Apply every layer this kernel supports; failures of optional layers are reported, not
    raised. Irreversible: call once, after imports and before reading untrusted input."""
    report = Report()
    try:  # imported first: it looks the library up with a subprocess, which seccomp then forbids
        import pyseccomp as seccomp
    except ImportError:
        seccomp = None
    _set_limit(resource.RLIMIT_CORE, 0, "RLIMIT_CORE", report)
    _set_limit(resource.RLIMIT_FSIZE, 0, "RLIMIT_FSIZE", report)
    _set_limit(resource.RLIMIT_NOFILE, limits.open_files, "RLIMIT_NOFILE", report)
    _set_limit(resource.RLIMIT_NPROC, limits.processes, "RLIMIT_NPROC", report)
    _set_limit(resource.RLIMIT_CPU, limits.cpu_seconds, "RLIMIT_CPU", report)
    _set_limit(resource.RLIMIT_AS, limits.memory_bytes, "RLIMIT_AS", report)
    if os.geteuid() == 0:
        _drop_privileges(limits.unprivileged_user, report)
    report.uid, report.gid = os.getuid(), os.getgid()
    libc_prctl = _libc.prctl
    libc_prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    if libc_prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:
        report.no_new_privs = True
    report.landlock_abi = landlock_abi()
    if report.landlock_abi > 0:
        try:
            _apply_landlock(report.landlock_abi, report)
        except OSError as exc:
            report.notes.append(f"landlock failed: {exc}")
    else:
        report.notes.append("landlock unavailable in this kernel")
    if seccomp is None:
        report.notes.append("seccomp: pyseccomp not installed")
        return report
    try:
        _apply_seccomp(report, seccomp)
    except (OSError, RuntimeError, ValueError) as exc:
        report.notes.append(f"seccomp failed: {exc}")
    return report
