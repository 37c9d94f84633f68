"""Run untrusted Python (a model's generated code plus a problem's tests) in a contained child process.

Each program runs in its own process, in a fresh temporary directory, with:
- limits: CPU seconds, address space, file size, open files, no core dumps, and a wall-clock timeout after
  which the whole process group is killed;
- no new processes: a seccomp filter refuses fork, vfork and clone without CLONE_THREAD (threads stay
  possible, bounded by the address-space limit); this holds for root too, where RLIMIT_NPROC does not;
- Landlock (Linux >= 5.13): files can be written only inside the temporary directory, TCP bind/connect
  is refused, and (kernel ABI >= 6) signals to processes outside the sandbox are refused;
- an empty environment (PATH, LANG and HOME=temporary directory only): no inherited secrets;
- `python -I` (isolated mode: no user site, no PYTHON* variables).

`sandbox_support()` says which parts this machine provides (seccomp on x86_64 and aarch64 Linux, Landlock on
Linux >= 5.13). `run_program` refuses to run without both unless `weak=True` is given (then only the limits,
the timeout and the empty environment apply).
A program passes when it exits with status 0 after printing the pass marker, within the limits.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import resource
import signal
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..config import CodeEvalConfig
from ..errors import BuddyError

PASS_MARKER = "__buddy_sandbox_passed__"
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2
_LL_CREATE_RULESET_VERSION, _LL_RULE_PATH_BENEATH = 1, 1
# per machine: (landlock_create_ruleset, landlock_add_rule, landlock_restrict_self), seccomp arch,
# {process-creating syscall: number}
_ARCH = {
    "x86_64": ((444, 445, 446), 0xC000003E, {"clone": 56, "fork": 57, "vfork": 58, "clone3": 435}),
    "aarch64": ((444, 445, 446), 0xC00000B7, {"clone": 220, "clone3": 435}),
}
_CLONE_THREAD = 0x00010000


class SandboxError(BuddyError):
    """The sandbox this run asked for is not available on this machine."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = float(CodeEvalConfig.timeout)  # wall clock, per program
    cpu_s: int = CodeEvalConfig.timeout
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # largest file the program may write
    max_files: int = 64


@dataclass
class Outcome:
    passed: bool
    status: str  # passed | failed | timeout (wall clock or CPU seconds) | killed
    returncode: int | None
    output: str  # the tail of stdout and stderr


def _arch():
    return _ARCH.get(platform.machine()) if sys.platform == "linux" else None


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


@functools.lru_cache(maxsize=1)
def sandbox_support() -> dict:
    """What this machine provides (a property of the kernel: probed once per process): {"seccomp": bool, "landlock_abi": int (0: none)}."""
    arch = _arch()
    if arch is None:
        return {"seccomp": False, "landlock_abi": 0}
    abi = _libc().syscall(arch[0][0], None, ctypes.c_size_t(0), ctypes.c_uint32(_LL_CREATE_RULESET_VERSION))
    return {"seccomp": True, "landlock_abi": max(int(abi), 0)}


def _no_new_processes_filter(audit_arch: int, nr: dict) -> bytes:
    """A seccomp BPF program: fork, vfork and x32 calls fail with EPERM, clone3 with ENOSYS (so libc falls back
    to clone), clone is allowed only with CLONE_THREAD (threads); everything else is allowed."""
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    ALLOW, KILL = 0x7FFF0000, 0x80000000
    EPERM, ENOSYS = 0x00050000 | 1, 0x00050000 | 38
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, audit_arch), (RET, 0, 0, KILL), (LD, 0, 0, 0)]
    if audit_arch == 0xC000003E:
        prog.append((JGE, "eperm", 0, 0x40000000))  # x32 system calls
    for name in ("fork", "vfork"):
        if name in nr:
            prog.append((JEQ, "eperm", 0, nr[name]))
    prog += [(JEQ, "enosys", 0, nr["clone3"]), (JEQ, 0, "allow", nr["clone"]),
             (LD, 0, 0, 16), (JSET, "allow", "eperm", _CLONE_THREAD)]
    labels = {"allow": len(prog), "eperm": len(prog) + 1, "enosys": len(prog) + 2}
    prog += [(RET, 0, 0, ALLOW), (RET, 0, 0, EPERM), (RET, 0, 0, ENOSYS)]
    out = bytearray()
    for i, (code, jt, jf, k) in enumerate(prog):
        jt, jf = (labels[j] - i - 1 if isinstance(j, str) else j for j in (jt, jf))
        out += struct.pack("<HBBI", code, jt, jf, k)
    return bytes(out)


def _fs_write_rights(abi: int) -> int:
    rights = 1 << 1  # WRITE_FILE
    for bit in range(4, 13):  # REMOVE_DIR, REMOVE_FILE, MAKE_CHAR/DIR/REG/SOCK/FIFO/BLOCK/SYM
        rights |= 1 << bit
    if abi >= 2:
        rights |= 1 << 13  # REFER
    if abi >= 3:
        rights |= 1 << 14  # TRUNCATE
    return rights


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _preexec(workdir: str, limits: Limits, full: bool):
    """Runs in the child between fork and exec: limits, then (full) seccomp and Landlock. A failure aborts the
    child (the parent reports the sandbox as broken), so a program never runs with less than was asked."""
    libc = _libc()
    arch = _arch()
    abi = sandbox_support()["landlock_abi"] if full else 0
    if full:
        bpf = ctypes.create_string_buffer(_no_new_processes_filter(arch[1], arch[2]))
        fprog = _SockFprog(len(bpf.raw) // 8, ctypes.addressof(bpf))
        fprog._keep = bpf  # the program's memory must live until the child installs it
    rights = _fs_write_rights(abi)

    def prctl(option, arg2, arg3=0):  # prctl is variadic: every argument as an unsigned long
        return libc.prctl(ctypes.c_int(option), *(ctypes.c_ulong(a) for a in (arg2, arg3, 0, 0)))

    def check(ok, what):
        if not ok:
            raise OSError(ctypes.get_errno(), f"{what} failed")

    def preexec():
        cap = [(resource.RLIMIT_CPU, limits.cpu_s), (resource.RLIMIT_AS, limits.memory_mb << 20),
               (resource.RLIMIT_FSIZE, limits.file_mb << 20), (resource.RLIMIT_NOFILE, limits.max_files),
               (resource.RLIMIT_CORE, 0)]
        for what, value in cap:
            # CPU: SIGXCPU at the soft limit (reported as a timeout), SIGKILL a second later
            resource.setrlimit(what, (value, value + 1 if what == resource.RLIMIT_CPU else value))
        if not full:
            return
        check(prctl(_PR_SET_NO_NEW_PRIVS, 1) == 0, "prctl(NO_NEW_PRIVS)")
        nums = arch[0]
        # Landlock: writes only beneath the work directory (and to /dev/null), no TCP, no signals outside
        attr = _RulesetAttr(rights, 0b11 if abi >= 4 else 0, 0b11 if abi >= 6 else 0)
        size = 24 if abi >= 6 else 16 if abi >= 4 else 8
        fd = libc.syscall(nums[0], ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
        check(fd >= 0, "landlock_create_ruleset")
        for path, allowed in ((workdir, rights), ("/dev/null", (1 << 1) | ((1 << 14) if abi >= 3 else 0))):
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            rule = _PathBeneathAttr(allowed, pfd)
            check(libc.syscall(nums[1], ctypes.c_int(fd), ctypes.c_int(_LL_RULE_PATH_BENEATH), ctypes.byref(rule),
                               ctypes.c_uint32(0)) == 0, f"landlock_add_rule({path})")
            os.close(pfd)
        check(libc.syscall(nums[2], ctypes.c_int(fd), ctypes.c_uint32(0)) == 0, "landlock_restrict_self")
        os.close(fd)
        # seccomp last: no new processes (the exec that follows is not a new process)
        check(prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog)) == 0, "seccomp filter")

    return preexec


def require_sandbox(weak: bool = False) -> None:
    """Raise SandboxError unless this machine has the full sandbox (or weak=True accepts less)."""
    support = sandbox_support()
    if not weak and not (support["seccomp"] and support["landlock_abi"]):
        raise SandboxError(f"running generated code needs Linux (x86_64 or aarch64) with seccomp and Landlock (this "
                           f"machine: {support}); --weak-sandbox (weak=True) runs it with resource limits, a timeout "
                           "and an empty environment only")


def run_program(source: str, limits: Limits = Limits(), weak: bool = False) -> Outcome:
    """Run `source` (a complete Python program) contained; passed when it exits 0 having printed PASS_MARKER
    as its last line. weak=True runs without seccomp and Landlock (for machines that lack them)."""
    require_sandbox(weak)
    with tempfile.TemporaryDirectory(prefix="buddy-sandbox-") as work:
        script = Path(work) / "program.py"
        script.write_text(source, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work}
        try:
            p = subprocess.Popen([sys.executable, "-I", str(script)], cwd=work, env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                 preexec_fn=_preexec(work, limits, full=not weak))
        except subprocess.SubprocessError as e:
            raise SandboxError(f"the code sandbox could not start a program: {e}") from None
        try:
            out, _ = p.communicate(timeout=limits.timeout_s)
            status = None
        except subprocess.TimeoutExpired:
            status = "timeout"
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the program's children too
            except (ProcessLookupError, PermissionError):
                pass
        if status == "timeout":
            out, _ = p.communicate()
        text = out.decode("utf-8", "replace")[-2000:]
        if status is None:
            lines = text.rstrip().splitlines()
            ok = p.returncode == 0 and bool(lines) and lines[-1] == PASS_MARKER
            status = ("passed" if ok else "timeout" if p.returncode == -signal.SIGXCPU  # out of CPU seconds
                      else "killed" if p.returncode < 0 else "failed")
        return Outcome(status == "passed", status, p.returncode, text)
