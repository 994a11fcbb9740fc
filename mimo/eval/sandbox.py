"""Run untrusted, model-written Python code in a contained process tree.

Used by the HumanEval grader and the RL code reward: `run_python(code)` returns a `SandboxResult`,
and the evaluating process survives whatever the code does. Every run is a process tree

    evaluator --Popen--> launcher --fork--> init --fork--> user code (`python -I -B main.py`)

where the launcher and init are this module's trusted code (`_launcher_main`). Containment layers
in the default "namespaces" mode:

1. Namespaces. The launcher unshares PID, network, mount, IPC and UTS namespaces (and a user
   namespace when not root), so init is pid 1 of a fresh PID namespace.
   - PID: when init exits (right after the user process, or when killed) the kernel kills every
     process left in the namespace, however it forked, daemonised or setsid()'d. Nothing outside
     can be seen or signalled.
   - Network: only a loopback device that is down, so every connect() fails (host 127.0.0.1 too).
   - Mount: every mount is remounted read-only and nosuid; private size-capped tmpfs go on /tmp
     (the working directory /tmp/work is there), /dev/shm and /run; a fresh /proc shows only the
     sandbox. Nothing written reaches the host; it all vanishes with the namespace.
2. No privilege. As root the code runs as a fresh random uid/gid (no capabilities, no groups), so
   it cannot signal init or the launcher nor read root-only files; a directory closed to others
   on the way to the interpreter (pyenv under /root) is replaced by a tmpfs holding only the
   interpreter. Without root, a nested user namespace maps the caller to uid 1000, which leaves
   no capabilities. PR_SET_NO_NEW_PRIVS keeps setuid binaries from regaining any.
3. rlimits on the user process and its children: CPU seconds, address space (memory),
   processes+threads (counted per uid, hence the fresh uid), file size, no core dumps.
4. A clean environment: a fixed minimal env, and `python -I` ignores PYTHON* and user site-packages.
5. Wall clock and cleanup: at the deadline the evaluator makes the launcher kill init, which
   empties the PID namespace before the launcher exits. Init and launcher carry
   PR_SET_PDEATHSIG=SIGKILL, so nothing outlives a dead evaluator. Output is read with a byte cap.

Where namespaces are refused (a container without CAP_SYS_ADMIN, user namespaces disabled),
`isolation_mode()` warns and falls back to "rlimits": layers 3-5 in a new session and a throw-away
working directory, running as a fresh uid when root and the interpreter is reachable by others,
else as the caller (as uid 0 with an empty capability set). That mode does NOT block network
access or writes outside the working directory, and a descendant that leaves the process group
survives the run unless the uid was changed.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import resource
import secrets
import selectors
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass

from mimo.errors import MimoError

# The launcher imports this file as `mimo.eval.sandbox` under a bare `mimo` package, so it never runs
# mimo/__init__.py (which may grow heavy imports) and starts in tens of milliseconds.
_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # mimo/, above mimo/eval/
_BOOT = (f"import sys, types; pkg = types.ModuleType('mimo'); pkg.__path__ = [{_PKG_DIR!r}]; sys.modules['mimo'] = pkg; "
         "from mimo.eval.sandbox import _launcher_main; _launcher_main()")
_TMPFS_MB = {"/tmp": 256, "/dev/shm": 64, "/run": 8}  # private tmpfs inside the sandbox, with size caps
_FILE_MB = 256  # largest file the code may write (RLIMIT_FSIZE)
_WORKDIR = "/tmp/work"  # the code's cwd inside the mount namespace

# From <linux/sched.h>, <linux/mount.h>, <linux/prctl.h>.
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_NEW_NAMESPACES = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_STRICTATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 24
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
# The code runs on the base interpreter, not a virtual environment's link to it: a venv can sit under /tmp
# (a CI checkout), which the sandbox replaces with a private tmpfs; `-I` ignores site-packages anyway.
_INTERPRETER = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
_KEPT_MOUNT_FLAGS = {"nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                     "nodiratime": MS_NODIRATIME, "strictatime": MS_STRICTATIME}


@dataclass
class SandboxResult:
    returncode: int | None  # None if killed by the sandbox; -N if the code died of signal N
    stdout: str
    stderr: str
    timed_out: bool  # wall or CPU limit hit
    status: str  # "ok" | "error" (nonzero exit) | "timeout" | "memory" | "killed"
    duration_s: float

    @property
    def passed(self) -> bool:
        return self.status == "ok"


def run_python(code: str, *, stdin: str = "", timeout_s: float = 10.0, cpu_s: float | None = None,
               memory_mb: int = 1024, max_processes: int = 64, max_output_bytes: int = 1_000_000) -> SandboxResult:
    """Run `code` as a script in the sandbox and report how it ended (see the module docstring)."""
    limits = {"cpu_s": timeout_s if cpu_s is None else cpu_s, "memory_mb": memory_mb, "max_processes": max_processes}
    return _run(code, isolation_mode(), stdin, timeout_s, limits, max_output_bytes)


def run_many(codes: list[str], *, workers: int = 2, **kw) -> list[SandboxResult]:
    """`run_python` over many programs, `workers` at a time; results in the order of `codes`."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda code: run_python(code, **kw), codes))


_mode: str | None = None
_mode_lock = threading.Lock()


def isolation_mode() -> str:
    """"namespaces" (full containment) or "rlimits" (weaker fallback); probed once per process."""
    global _mode
    with _mode_lock:
        if _mode is None:
            if not sys.platform.startswith("linux"):
                raise MimoError(f"the code sandbox needs Linux, not {sys.platform}")
            try:
                probe = _run("print('ok')", "namespaces", "", 30, {"cpu_s": 10, "memory_mb": 512, "max_processes": 8}, 100)
                if probe.stdout != "ok\n":
                    raise MimoError(f"probe printed {probe.stdout!r}, stderr {probe.stderr[-500:]!r}")
                _mode = "namespaces"
            except MimoError as e:
                warnings.warn(f"mimo.eval.sandbox: namespaces unavailable ({e}); falling back to rlimits only, "
                              "which does not block network access or writes outside the working directory")
                _mode = "rlimits"
        return _mode


# ---------------------------------------------------------------- evaluator side


def _run(code: str, mode: str, stdin: str, timeout_s: float, limits: dict, max_output_bytes: int) -> SandboxResult:
    ids = None  # (uid, gid) the code runs as; None keeps the caller's (then a user namespace drops root)
    if os.geteuid() == 0 and (mode == "namespaces" or _reachable_by_others(_INTERPRETER)):
        ids = _fresh_ids()
    with tempfile.TemporaryDirectory(prefix="mimo-sandbox-") as host_dir:
        with open(os.path.join(host_dir, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        with open(os.path.join(host_dir, "stdin.txt"), "w", encoding="utf-8") as f:
            f.write(stdin)
        if ids and mode != "namespaces":
            os.chown(host_dir, *ids)  # the rlimits mode runs the code in host_dir itself
        report_r, report_w = os.pipe()
        cfg = {"mode": mode, "host_dir": host_dir, "ids": ids, "report_fd": report_w, "parent_pid": os.getpid(), **limits}
        start = time.monotonic()
        try:
            with open(os.path.join(host_dir, "stdin.txt"), "rb") as stdin_file:
                proc = subprocess.Popen([sys.executable, "-I", "-B", "-c", _BOOT, json.dumps(cfg)], stdin=stdin_file,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=host_dir,
                                        env=_clean_env(host_dir), start_new_session=True, pass_fds=(report_w,))
        finally:
            os.close(report_w)
        try:
            out, err, timed_out = _collect(proc, start + timeout_s, max_output_bytes)
        finally:
            _stop(proc, mode)
            os.set_blocking(report_r, False)  # a few small lines, all written before their writers exited
            try:
                reports = [json.loads(line) for line in os.read(report_r, 1 << 20).splitlines()]
            except BlockingIOError:
                reports = []
            os.close(report_r)
        duration = time.monotonic() - start
    for report in reports:
        if "setup_error" in report:
            raise MimoError(f"sandbox setup failed: {report['setup_error']}")
    report = reports[-1] if reports else {}
    stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    returncode, status = None, "killed"  # the launcher died without a report (e.g. the code killed it)
    if timed_out or report.get("cpu_limit"):
        timed_out, status = True, "timeout"
    elif "exit" in report:
        returncode = report["exit"]
        last_line = (stderr.strip().splitlines() or [""])[-1]
        status = "ok" if returncode == 0 else "memory" if last_line.startswith("MemoryError") else "error"
    elif "signal" in report:
        returncode = -report["signal"]
    return SandboxResult(returncode, stdout, stderr, timed_out, status, duration)


def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, bytes, bool]:
    """Read stdout/stderr (keeping at most `cap` bytes of each) until both close or the deadline."""
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    chunks = {out_fd: bytearray(), err_fd: bytearray()}
    sel = selectors.DefaultSelector()
    for fd in chunks:
        sel.register(fd, selectors.EVENT_READ)
    drain_until = None  # once the launcher is gone, stray holders of the pipes get a short grace only
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                return bytes(chunks[out_fd]), bytes(chunks[err_fd]), True
            if drain_until is None and _has_exited(proc):
                drain_until = now + 0.5
            if drain_until is not None and now >= drain_until:
                break
            for key, _ in sel.select(min(deadline, drain_until or deadline, now + 0.2) - now):
                data = os.read(key.fd, 1 << 16)
                if not data:
                    sel.unregister(key.fd)
                buf = chunks[key.fd]
                buf += data[: max(0, cap - len(buf))]  # keep reading past the cap so the code never blocks
    finally:
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
    return bytes(chunks[out_fd]), bytes(chunks[err_fd]), False


def _has_exited(proc: subprocess.Popen) -> bool:
    # WNOWAIT leaves the launcher a zombie, so its pid (= the process group id) cannot be reused
    # before _stop has signalled the group.
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped (only a caller's SIGCHLD handling could do that)
        return True


def _stop(proc: subprocess.Popen, mode: str) -> None:
    """Make sure nothing of the run is left alive when this returns."""
    if mode == "namespaces" and not _has_exited(proc):
        # The launcher kills init and exits once the kernel has emptied the PID namespace; killing
        # the launcher directly would return before that is done.
        os.kill(proc.pid, signal.SIGTERM)  # not proc.send_signal: it polls, and so may reap the launcher
        give_up = time.monotonic() + 5
        while not _has_exited(proc) and time.monotonic() < give_up:
            time.sleep(0.005)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the rlimits mode's cleanup, and a backstop for the above
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    give_up = time.monotonic() + 2  # SIGKILL is asynchronous: wait until the group is really gone
    while time.monotonic() < give_up:
        try:
            os.killpg(proc.pid, 0)  # signal 0 only probes, so a reused pid would come to no harm
        except (ProcessLookupError, PermissionError):
            break
        time.sleep(0.005)


def _fresh_ids() -> tuple[int, int] | None:
    """A random (uid, gid), almost surely unused, that this user namespace can switch to.

    Fresh ids make RLIMIT_NPROC count this run's processes only. Under a user namespace (a
    rootless container) only the mapped ids are usable; None if there are too few of them."""
    ids = []
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/self/{name}") as f:
            first, count = max(((int(r[0]), int(r[2])) for r in map(str.split, f)), key=lambda r: r[1])
        top = min(first + count - 3, 2**31 - 2)  # skip nobody (65534 atop a 65536 map), ids read as negative
        bottom = max(top - min(count // 2, 2**30), first + 1)
        if top - bottom < 100:
            return None
        ids.append(bottom + secrets.randbelow(top - bottom + 1))
    return ids[0], ids[1]


def _reachable_by_others(path: str) -> bool:
    """Whether a user other than the owner can reach (search every parent of) the real `path`."""
    path = os.path.realpath(path)
    while path != "/":
        path = os.path.dirname(path)
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
    return True


def _clean_env(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}


# ---------------------------------------------------------------- launcher / init side (trusted)


def _launcher_main() -> None:
    """Entry point of the launcher process (started by `_run` with the config as argv[1])."""
    cfg = json.loads(sys.argv[1])
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != cfg["parent_pid"]:  # the evaluator died before the prctl
            os._exit(1)
        if cfg["mode"] == "namespaces":
            _unshare(_NEW_NAMESPACES | (0 if cfg["ids"] else CLONE_NEWUSER), map_to=0)
        init = os.fork()
        if init == 0:
            _init_main(cfg)
        signal.signal(signal.SIGTERM, lambda *_: os.kill(init, signal.SIGKILL))  # see _stop
        # In a PID namespace this returns once every process in it is gone. WNOWAIT keeps init a
        # zombie, so the handler above can never hit a reused pid; it is disarmed before the reap.
        os.waitid(os.P_PID, init, os.WEXITED | os.WNOWAIT)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.waitpid(init, 0)
        os._exit(0)
    except BaseException:  # noqa: BLE001 - init and the user process are forked in here too: any
        # failure of theirs before exec lands here, in its own process, and must end that process
        os.write(cfg["report_fd"], json.dumps({"setup_error": traceback.format_exc(limit=-3)}).encode() + b"\n")
        os._exit(70)


def _init_main(cfg: dict) -> None:
    """pid 1 of the sandbox: prepare the filesystem, run the user process, report how it ended."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    workdir = _private_filesystem(cfg) if cfg["mode"] == "namespaces" else cfg["host_dir"]
    user = os.fork()
    if user == 0:
        _exec_user(cfg, workdir)
    while True:  # as pid 1 we also reap orphans; stop when the user process itself ends
        pid, status, usage = os.wait4(-1, 0)
        if pid == user:
            break
    report: dict = {"cpu_s": usage.ru_utime + usage.ru_stime}
    if os.WIFSIGNALED(status):
        report["signal"] = sig = os.WTERMSIG(status)
        # RLIMIT_CPU sends SIGXCPU at the soft limit and SIGKILL at the hard one
        report["cpu_limit"] = sig == signal.SIGXCPU or (sig == signal.SIGKILL and report["cpu_s"] >= cfg["cpu_s"])
    else:
        report["exit"] = os.WEXITSTATUS(status)
    if cfg["mode"] != "namespaces" and cfg["ids"]:
        _kill_uid(cfg["ids"][0])  # no PID namespace to empty: kill whatever runs under the run's uid
    os.write(cfg["report_fd"], json.dumps(report).encode() + b"\n")
    os._exit(0)  # in a PID namespace this kills every process left in it


def _exec_user(cfg: dict, workdir: str) -> None:
    """The user process: limits, then an identity without privileges, then exec of the code."""
    os.chdir(workdir)
    cpu = max(1, int(cfg["cpu_s"] + 0.999))
    for limit, value in [(resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_CORE, (0, 0)),
                         (resource.RLIMIT_AS, (cfg["memory_mb"] << 20,) * 2),
                         (resource.RLIMIT_NPROC, (cfg["max_processes"],) * 2),
                         (resource.RLIMIT_FSIZE, (_FILE_MB << 20,) * 2)]:
        resource.setrlimit(limit, value)
    if cfg["mode"] == "namespaces":
        os.setsid()  # its own group, so killpg(0) from the code reaches nothing but the sandbox
    if cfg["ids"]:
        uid, gid = cfg["ids"]
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)  # drops every capability
    elif cfg["mode"] == "namespaces":
        _unshare(CLONE_NEWUSER, map_to=1000)  # not root: a nested user namespace where we are not uid 0
    elif os.geteuid() == 0:
        _drop_capabilities()  # the fallback with no spare uid: still uid 0, but powerless
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which clears it
    os.set_inheritable(cfg["report_fd"], False)  # closed by execve; still there to report a failed exec
    os.execve(_INTERPRETER, [_INTERPRETER, "-I", "-B", "main.py"], _clean_env(workdir))


def _private_filesystem(cfg: dict) -> str:
    """Make this mount namespace read-only except private tmpfs; return the code's working dir."""
    with open(os.path.join(cfg["host_dir"], "main.py"), "rb") as f:
        code = f.read()
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates to the host
    if cfg["ids"]:
        _expose_interpreter()
    for target, flags in _mounts():
        try:
            _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | flags)
        except FileNotFoundError:  # a mount point hidden under another mount
            pass
    # A fresh /proc shows only this PID namespace. It stays writable (a rootless run writes its
    # nested user namespace's id maps there); its system-wide knobs are made read-only.
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for target in [p for p in ("/proc/sys", "/proc/sysrq-trigger") if os.path.exists(p)]:
        _mount(target, target, None, MS_BIND)
        _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for target, size_mb in _TMPFS_MB.items():
        _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size_mb}m,mode=1777")
    os.mkdir(_WORKDIR, 0o700)
    with open(os.path.join(_WORKDIR, "main.py"), "wb") as f:
        f.write(code)
    if cfg["ids"]:
        for path in (_WORKDIR, os.path.join(_WORKDIR, "main.py")):
            os.chown(path, *cfg["ids"])
    return _WORKDIR


def _expose_interpreter() -> None:
    """Let an unprivileged uid reach the interpreter when it lives under a closed directory.

    E.g. pyenv under /root (mode 700): /root is replaced by a tmpfs that holds nothing but the
    interpreter's install tree, bind-mounted back at its own path (reached through an fd opened
    before the tmpfs hid it)."""
    keep = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, os.path.dirname(sys.executable))}
    keep = {p for p in keep if not any(p.startswith(q + "/") for q in keep)}  # binding a parent is enough
    todo = []  # (path, its outermost closed parent, an fd that still reaches the path once that is hidden)
    for path in sorted(keep):
        parents = [path[:i] or "/" for i in range(len(path)) if path[i] == "/"]  # "/", "/a", "/a/b" for /a/b/c
        closed = [d for d in parents if not os.stat(d).st_mode & stat.S_IXOTH]
        if closed and closed[0] != "/":
            todo.append((path, closed[0], os.open(path, os.O_PATH | os.O_DIRECTORY)))
    for hidden in sorted({closed for _, closed, _ in todo}):
        _mount("tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for path, _, fd in todo:
        os.makedirs(path, 0o755, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        os.close(fd)


def _mounts() -> list[tuple[str, int]]:
    """(mount point, flags that a read-only remount must keep) for every mount, from mountinfo."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            options = fields[5].split(",")
            out.append((target, sum(flag for name, flag in _KEPT_MOUNT_FLAGS.items() if name in options)))
    return out


def _unshare(flags: int, map_to: int) -> None:
    """unshare(2); a new user namespace gets our uid/gid mapped to `map_to` (and nothing else)."""
    uid, gid = os.getuid(), os.getgid()
    _libc("unshare", flags)
    if flags & CLONE_NEWUSER:
        for name, text in [("setgroups", "deny"), ("uid_map", f"{map_to} {uid} 1"), ("gid_map", f"{map_to} {gid} 1")]:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)


def _drop_capabilities() -> None:
    """Empty the capability bounding set, so that exec'ing as uid 0 grants no capabilities."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    for cap in range(last_cap + 1):
        _prctl(PR_CAPBSET_DROP, cap)


def _kill_uid(uid: int) -> None:
    """Kill every process running as `uid` (kill(-1) as that uid reaches exactly those)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _libc(name: str, *args) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}{args}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = [None if s is None else s.encode() for s in (source, target, fstype, data)]
    _libc("mount", enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3])


def _prctl(option: int, value: int) -> None:
    _libc("prctl", option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
