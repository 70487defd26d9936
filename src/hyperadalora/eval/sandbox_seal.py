"""Seals the sandboxed child's file system, then drops every capability it has.

Not imported by the package: its text runs at the start of the sandboxed child (see
:mod:`hyperadalora.eval.containment`), which is then root of its own user namespace (``unshare
--map-root-user``) and alone in a private mount namespace. :func:`seal`:

1. covers each directory in ``hide`` (the home directories) with an empty tmpfs, putting back
   only the ``keep`` directories under it (the Python installation);
2. makes every mount read-only, recursively, then the working directory writable again;
3. drops all capabilities for good (bounding set emptied, ``SECBIT_NOROOT`` locked,
   ``no_new_privs``), so nothing it runs afterwards can undo 1-2.

Linux >= 5.12 (``mount_setattr``); any failure raises, and the caller must not run the program.
"""

import ctypes
import os

_MS_BIND, _MS_REC, _MS_MOVE, _MS_NOSUID, _MS_NODEV = 4096, 16384, 8192, 2, 4
_MOUNT_ATTR_RDONLY, _AT_RECURSIVE, _AT_FDCWD = 0x1, 0x8000, -100
_SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added in Linux 5.12)
_PR_CAPBSET_DROP, _PR_SET_SECUREBITS, _PR_SET_NO_NEW_PRIVS = 24, 28, 38
_SECUREBITS_ALL_LOCKED = 0xFF  # noroot, no_setuid_fixup, keep_caps (+ their locks)
_CAP_VERSION_3 = 0x20080522


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _call(libc, name, *args):
    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}{args[:2]!r}: {os.strerror(errno)}")


def _set_read_only(libc, path, read_only, recursive):
    attr = _MountAttr(_MOUNT_ATTR_RDONLY if read_only else 0, 0 if read_only else _MOUNT_ATTR_RDONLY, 0, 0)
    flags = _AT_RECURSIVE if recursive else 0
    if libc.syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, os.fsencode(path), flags, ctypes.byref(attr),
                    ctypes.sizeof(attr)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount_setattr({path!r}): {os.strerror(errno)}")


def _hide(libc, home, keep, stage):
    """An empty tmpfs over ``home``, with the ``keep`` directories under it put back."""
    kept = [k for k in keep if k.startswith(home.rstrip("/") + "/")]
    staged = []
    for i, path in enumerate(kept):  # bind them aside first: the tmpfs will cover their paths
        spot = os.path.join(stage, f"keep{i}")
        os.mkdir(spot)
        _call(libc, "mount", os.fsencode(path), os.fsencode(spot), None, _MS_BIND | _MS_REC, None)
        staged.append((spot, path))
    _call(libc, "mount", b"tmpfs", os.fsencode(home), b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=0755,size=64k")
    for spot, path in staged:
        os.makedirs(path, exist_ok=True)
        _call(libc, "mount", os.fsencode(spot), os.fsencode(path), None, _MS_MOVE, None)
        os.rmdir(spot)


def _drop_capabilities(libc):
    _call(libc, "prctl", _PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    _call(libc, "prctl", _PR_SET_SECUREBITS, _SECUREBITS_ALL_LOCKED, 0, 0, 0)
    for cap in range(64):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break  # past the last capability this kernel knows
    header = (ctypes.c_uint32 * 2)(_CAP_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable: twice 32 bits, all zero
    _call(libc, "capset", header, data)
    with open("/proc/self/status", encoding="ascii") as f:
        effective = next(line.split()[1] for line in f if line.startswith("CapEff:"))
    if int(effective, 16) != 0:
        raise OSError(f"capabilities left after dropping them: {effective}")


def seal(config):
    """Seals the file system and drops capabilities (see the module docstring).

    Args:
        config: ``{"workdir": str, "hide": [directories], "keep": [directories]}``.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = libc.mount.restype = libc.prctl.restype = libc.capset.restype = ctypes.c_int
    workdir = os.path.realpath(config["workdir"])
    _call(libc, "mount", os.fsencode(workdir), os.fsencode(workdir), None, _MS_BIND, None)
    for home in config["hide"]:
        _hide(libc, home, config["keep"], workdir)
    _set_read_only(libc, "/", True, recursive=True)
    _set_read_only(libc, workdir, False, recursive=False)
    os.chdir(workdir)  # the old working directory is the one under the bind mount, now read-only
    _drop_capabilities(libc)

