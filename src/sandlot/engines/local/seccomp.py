"""The seccomp profile of a sandbox: deny by default, allow what ordinary programs use.

Why an allow-list: a syscall the kernel adds tomorrow is denied until we decide otherwise. The
list follows the same policy as Docker's default profile (a fact users rely on: software that runs
under ``docker run`` runs here): kernel-wide knobs (clock, modules, swap, reboot, keyrings, bpf,
perf, kexec, quotas, personality tricks, userfaultfd, io_uring) stay out; namespace creation is
denied (``unshare``, ``setns``, ``clone`` with CLONE_NEW* flags, and ``clone3`` answers ENOSYS so
libc falls back to ``clone``, whose flags seccomp can inspect); mounting needs ``privileged``.
"""

from __future__ import annotations

from typing import Any

SCMP_ARCH = ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
EPERM = 1
ENOSYS = 38

#: CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID |
#: CLONE_NEWNET | CLONE_NEWTIME
CLONE_NAMESPACE_FLAGS = (
    0x00020000
    | 0x02000000
    | 0x04000000
    | 0x08000000
    | 0x10000000
    | 0x20000000
    | 0x40000000
    | 0x00000080
)

ALLOWED = """
accept accept4 access adjtimex alarm arch_prctl bind brk capget capset chdir chmod chown
clock_getres clock_gettime clock_nanosleep close close_range connect copy_file_range creat dup
dup2 dup3 epoll_create epoll_create1 epoll_ctl epoll_pwait epoll_pwait2 epoll_wait eventfd
eventfd2 execve execveat exit exit_group faccessat faccessat2 fadvise64 fallocate fanotify_mark
fchdir fchmod fchmodat fchmodat2 fchown fchownat fcntl fdatasync fgetxattr flistxattr flock fork
fremovexattr fsetxattr fstat fstatfs fsync ftruncate futex futex_waitv futimesat getcpu getcwd
getdents getdents64 getegid geteuid getgid getgroups getitimer getpeername getpgid getpgrp
getpid getppid getpriority getrandom getresgid getresuid getrlimit get_robust_list getrusage
getsid getsockname getsockopt get_thread_area gettid gettimeofday getuid getxattr
inotify_add_watch inotify_init inotify_init1 inotify_rm_watch io_cancel ioctl io_destroy
io_getevents io_pgetevents ioprio_get ioprio_set io_setup io_submit ipc kill landlock_add_rule
landlock_create_ruleset landlock_restrict_self lchown lgetxattr link linkat listen listxattr
llistxattr lremovexattr lseek lsetxattr lstat madvise membarrier memfd_create memfd_secret
mincore mkdir mkdirat mknod mknodat mlock mlock2 mlockall mmap mprotect mq_getsetattr mq_notify
mq_open mq_timedreceive mq_timedsend mq_unlink mremap msgctl msgget msgrcv msgsnd msync munlock
munlockall munmap name_to_handle_at nanosleep newfstatat open openat openat2 pause pidfd_open
pidfd_send_signal pipe pipe2 pkey_alloc pkey_free pkey_mprotect poll ppoll prctl pread64 preadv
preadv2 prlimit64 process_mrelease pselect6 ptrace pwrite64 pwritev pwritev2 read readahead
readlink readlinkat readv recvfrom recvmmsg recvmsg remap_file_pages removexattr rename renameat
renameat2 restart_syscall rmdir rseq rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo
rt_sigreturn rt_sigsuspend rt_sigtimedwait rt_tgsigqueueinfo sched_getaffinity sched_getattr
sched_getparam sched_get_priority_max sched_get_priority_min sched_getscheduler
sched_rr_get_interval sched_setaffinity sched_setattr sched_setparam sched_setscheduler
sched_yield seccomp select semctl semget semop semtimedop sendfile sendmmsg sendmsg sendto
setfsgid setfsuid setgid setgroups setitimer setpgid setpriority setregid setresgid setresuid
setreuid setrlimit set_robust_list setsid setsockopt set_thread_area set_tid_address setuid
setxattr shmat shmctl shmdt shmget shutdown sigaltstack signalfd signalfd4 socket socketpair
splice stat statfs statx symlink symlinkat sync sync_file_range syncfs sysinfo tee tgkill time
timer_create timer_delete timer_getoverrun timer_gettime timer_settime timerfd_create
timerfd_gettime timerfd_settime times tkill truncate umask uname unlink unlinkat utime utimensat
utimes vfork vmsplice wait4 waitid write writev cachestat map_shadow_stack
""".split()

#: Allowed only with ``privileged=True`` (mounting inside the sandbox, chroot tools, namespaces).
PRIVILEGED_EXTRA = """
mount umount2 pivot_root chroot unshare setns sethostname setdomainname fsopen fsconfig fsmount
fspick move_mount open_tree mount_setattr syslog vhangup clone3
""".split()


def seccomp_profile(*, privileged: bool, errno_ret: bool = True) -> dict[str, Any]:
    """The OCI ``linux.seccomp`` object.

    ``errno_ret=False``: for a runtime that answers every denied call with EPERM whatever
    ``errnoRet`` says (runsc's ``--oci-seccomp``, checked in its source and by running it).
    EPERM from ``clone3`` would stop glibc from falling back to ``clone`` (every new thread
    fails), so ``clone3`` is then allowed: its flags are out of seccomp's sight, and a namespace
    it makes is one of gVisor's own kernel (``unshare`` stays denied)."""
    names = sorted(set(ALLOWED) | (set(PRIVILEGED_EXTRA) if privileged else set()))
    if not errno_ret:
        names = sorted({*names, "clone3"})
    syscalls: list[dict[str, Any]] = [{"names": names, "action": "SCMP_ACT_ALLOW"}]
    if privileged:
        syscalls.append({"names": ["clone"], "action": "SCMP_ACT_ALLOW"})
    else:
        # clone is allowed only without namespace flags (argument 0 is the flags word on x86_64).
        syscalls.append(
            {
                "names": ["clone"],
                "action": "SCMP_ACT_ALLOW",
                "args": [
                    {
                        "index": 0,
                        "value": CLONE_NAMESPACE_FLAGS,
                        "valueTwo": 0,
                        "op": "SCMP_CMP_MASKED_EQ",
                    }
                ],
            }
        )
        if errno_ret:
            # ENOSYS, not EPERM: glibc then falls back to clone(), whose flags are checked above.
            syscalls.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS})
    # personality: only the harmless values Docker allows (0, PER_LINUX32, UNAME26 variants).
    syscalls.append(
        {
            "names": ["personality"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": v, "op": "SCMP_CMP_EQ"} for v in (0x0,)],
        }
    )
    for value in (0x0008, 0x20000, 0x20008, 0xFFFFFFFF):
        syscalls.append(
            {
                "names": ["personality"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": value, "op": "SCMP_CMP_EQ"}],
            }
        )
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": EPERM,
        "architectures": SCMP_ARCH,
        "syscalls": syscalls,
    }
