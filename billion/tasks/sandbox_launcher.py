"""The HumanEval sandbox's launcher: a fresh, single-threaded Python (`python -I`, standard library
only) that billion starts with subprocess.Popen (no preexec_fn: billion never forks itself), and
that sets the program's confinement up before it execs it.

    python -I sandbox_launcher.py '<json config>'     # run a program (see billion/tasks/humaneval.py)
    python -I sandbox_launcher.py --probe             # print what confinement this machine allows

In order:

1. as root, it hands the working folder to `nobody` and becomes `nobody` (RLIMIT_NPROC is not
   enforced for root, and the program has no business with root's files);
2. it unshares a new user, network and PID namespace where the kernel allows it without root
   (no network at all: not even loopback is up; and when the PID namespace's first process exits
   or is killed, the kernel kills every process left in it, `setsid` or not);
3. it sets RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_CORE=0 and RLIMIT_NPROC;
4. with namespaces: it forks the namespace's first process (an init that reaps orphans), which
   forks and execs the program and, once the program exits, exits with its status, so that the
   kernel kills whatever the program left behind; without: it execs the program itself.

Each process it makes dies with its parent (PR_SET_PDEATHSIG), so a billion killed outright leaves
nothing running either.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG = 1
NOBODY = 65534

_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(parent: int) -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(137)


def drop_root(paths, needed=()) -> str | None:
    """As root: give `paths` to nobody, make the `needed` files reachable for nobody (see
    open_path), and become nobody. None if done or not root, else why not (then it stays root)."""
    if os.geteuid() != 0:
        return None
    try:
        for path in needed:
            open_path(path)
    except OSError as e:
        return f"cannot make {path} reachable for nobody ({e}): running as root, RLIMIT_NPROC does not apply"
    for path in paths:
        for root, dirs, files in os.walk(path):
            for name in [root] + [os.path.join(root, x) for x in dirs + files]:
                os.lchown(name, NOBODY, NOBODY)
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    return None


MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18


def _mount(source, target, fstype, flags, data=None) -> None:
    enc = lambda x: None if x is None else os.fsencode(x)
    if _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}: {os.strerror(ctypes.get_errno())}")


def _closed_dir(path: str) -> str | None:
    """The first folder on the way to `path` that others may not search (e.g. /root, mode 0700)."""
    parts = os.path.realpath(path).split(os.sep)
    for i in range(1, len(parts) - 1):
        folder = os.sep + os.path.join(*parts[1:i + 1])
        if not os.stat(folder).st_mode & 0o001:
            return folder
    return None


def open_path(path: str) -> None:
    """Where the interpreter lives under a folder nobody may not enter (pyenv under /root): in a
    private mount namespace, hide that folder under an empty tmpfs that all may enter and bind
    back only the one entry on the way, so that the same paths work for nobody (and the rest of
    the folder is out of sight)."""
    for _ in range(4):
        closed = _closed_dir(path)
        if closed is None:
            return
        entry = os.path.relpath(os.path.realpath(path), closed).split(os.sep)[0]
        if not hasattr(open_path, "ns"):
            if _libc.unshare(0x00020000) != 0:  # CLONE_NEWNS
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
            _mount(None, "/", None, MS_REC | MS_PRIVATE)
            open_path.ns = True
        keep = os.open(os.path.join(closed, entry), os.O_RDONLY | os.O_DIRECTORY)
        try:
            _mount("tmpfs", closed, "tmpfs", 0, "mode=0755,size=64k")
            try:
                os.mkdir(os.path.join(closed, entry), 0o755)
                _mount(f"/proc/self/fd/{keep}", os.path.join(closed, entry), None, MS_BIND | MS_REC)
            except OSError:
                _libc.umount2(os.fsencode(closed), 2)  # MNT_DETACH: the folder as it was
                raise
        finally:
            os.close(keep)


def unshare() -> str | None:
    """New user + network + PID namespaces; None if done, else why not."""
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID
    try:
        if hasattr(os, "unshare"):  # Python 3.12+
            os.unshare(flags)
        elif _libc.unshare(flags) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except OSError as e:
        return f"unshare(CLONE_NEWUSER|CLONE_NEWNET|CLONE_NEWPID) failed: {e.strerror or e}"
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        try:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        except OSError:
            pass  # unmapped ids read as 65534 inside; the kernel still checks the real ones
    return None


def set_limits(limits: dict, namespaced: bool) -> None:
    nproc = int(limits["processes"])
    if not namespaced:  # counted over all of this user's processes, not only the program's
        nproc += count_processes(os.getuid())
    for what, value in ((resource.RLIMIT_AS, limits["memory_bytes"]), (resource.RLIMIT_CPU, limits["cpu_s"]),
                        (resource.RLIMIT_FSIZE, limits["file_bytes"]), (resource.RLIMIT_CORE, 0),
                        (resource.RLIMIT_NPROC, nproc)):
        try:
            resource.setrlimit(what, (int(value), int(value)))
        except (ValueError, OSError):
            pass


def count_processes(uid: int) -> int:
    n = 0
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        n += int(line.split()[1]) == uid
                        break
        except (OSError, ValueError):
            continue
    return n


def exec_program(argv, cwd) -> None:
    try:
        os.chdir(cwd)
        os.execv(argv[0], argv)
    except OSError as e:
        print(f"sandbox: cannot run {argv[0]}: {e}", file=sys.stderr)
    os._exit(127)


def status_code(status: int) -> int:
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def init(argv, cwd) -> None:
    """PID 1 of the new namespace: run the program, reap orphans, exit with the program's status
    (and so have the kernel kill everything left in the namespace)."""
    die_with_parent(0)  # our parent is outside the namespace: getppid() reads 0 here
    child = os.fork()
    if child == 0:
        exec_program(argv, cwd)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(1)
        if pid == child:
            os._exit(status_code(status))


def main() -> None:
    if sys.argv[1:] == ["--probe"]:
        parent = os.getppid()
        die_with_parent(parent)
        root = drop_root([], [sys.executable, sys.base_prefix])
        why = unshare()
        print(json.dumps({"namespaces": why is None, "why": why, "uid": os.getuid(), "root": root}))
        return
    cfg = json.loads(sys.argv[1])
    die_with_parent(cfg["parent"])
    drop_root(cfg["chown"], [cfg["argv"][0], sys.base_prefix])
    why = unshare() if cfg.get("namespaces", True) else "namespaces not asked for"
    set_limits(cfg["limits"], why is None)
    if why is not None:
        exec_program(cfg["argv"], cfg["cwd"])
    first = os.fork()  # PID 1 of the new PID namespace
    if first == 0:
        init(cfg["argv"], cfg["cwd"])
    while True:
        try:
            _, status = os.waitpid(first, 0)
        except InterruptedError:
            continue
        os._exit(status_code(status))


if __name__ == "__main__":
    main()
