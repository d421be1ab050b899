// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The sandbox a serving daemon enters once its listener is bound and its
//! files are open (virtiofsd is the model): every capability dropped,
//! `no_new_privs`, and a seccomp allow-list for every thread (TSYNC), the
//! ones already running (the COW durability thread) and the ones started
//! later (workers, control clients). The allow-list is what the serving
//! paths use (measured with `strace -f` over boots, handovers, resizes and
//! control commands; README "Sandbox"); `socket` only for `AF_UNIX`. The
//! io_uring rings are restricted to their opcodes in `engine::uring`
//! (operations run in the kernel, out of seccomp's sight).
//!
//! `--sandbox none` skips it; `--seccomp log` logs a syscall outside the
//! list instead of killing the process (to find what a new path needs).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

use super::DaemonError;
use crate::engine::sys;

/// What to enter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Sandbox {
    /// Nothing (`--sandbox none`).
    None,
    /// Capabilities dropped, no_new_privs, the seccomp allow-list.
    #[default]
    Seccomp,
}

/// What a syscall outside the list does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnViolation {
    /// The process is killed (SIGSYS).
    #[default]
    Kill,
    /// The syscall is logged by the kernel and allowed.
    Log,
}

/// The system calls of the serving paths.
const ALLOWED: &[libc::c_long] = &[
    // I/O on descriptors.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_close,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    libc::SYS_ioctl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_sync_file_range,
    libc::SYS_flock,
    libc::SYS_getdents64,
    // Files by name: the crash journal, /proc/self/task, a handover's
    // start from the files, socket files.
    libc::SYS_openat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_umask,
    libc::SYS_getcwd,
    // Memory (guest memory tables, the bitmap's memfd, the allocator).
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_memfd_create,
    // Threads, signals, time.
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_set_tid_address,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_prctl,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_tgkill,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_getrandom,
    libc::SYS_prlimit64,
    libc::SYS_uname,
    // Events.
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_pidfd_open,
    // UNIX sockets (vhost-user, control, handover, sd_notify).
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_socketpair,
    // The I/O engines.
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_io_setup,
    libc::SYS_io_submit,
    libc::SYS_io_getevents,
    libc::SYS_io_destroy,
];

fn filter(on_violation: OnViolation) -> Result<BpfProgram, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    let unix = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        u64::try_from(libc::AF_UNIX).unwrap_or(1),
    )
    .and_then(|c| SeccompRule::new(vec![c]))
    .map_err(|e| e.to_string())?;
    rules.insert(libc::SYS_socket, vec![unix]);
    let mismatch = match on_violation {
        OnViolation::Kill => SeccompAction::KillProcess,
        OnViolation::Log => SeccompAction::Log,
    };
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())?;
    SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
        .and_then(BpfProgram::try_from)
        .map_err(|e| e.to_string())
}

/// Enters the sandbox (every thread of the process).
pub fn enter(sandbox: Sandbox, on_violation: OnViolation) -> Result<(), DaemonError> {
    if sandbox == Sandbox::None {
        log::info!("sandbox: none (--sandbox none)");
        return Ok(());
    }
    let err = |reason: String| DaemonError::Sandbox {
        reason: format!("{reason}; run with --sandbox none where seccomp is not available"),
    };
    sys::drop_capabilities().map_err(|e| err(format!("cannot drop capabilities: {e}")))?;
    let bpf = filter(on_violation).map_err(&err)?;
    seccompiler::apply_filter_all_threads(&bpf)
        .map_err(|e| err(format!("cannot install the seccomp filter: {e}")))?;
    log::info!(
        "sandbox: capabilities dropped, no_new_privs, seccomp allow-list of {} system calls ({} \
         any other)",
        ALLOWED.len() + 1,
        match on_violation {
            OnViolation::Kill => "killing the daemon at",
            OnViolation::Log => "logging",
        }
    );
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_compiles_for_this_architecture_in_both_modes() {
        assert!(!filter(OnViolation::Kill).unwrap().is_empty());
        assert!(!filter(OnViolation::Log).unwrap().is_empty());
        assert!(!ALLOWED.contains(&libc::SYS_execve));
        assert!(!ALLOWED.contains(&libc::SYS_ptrace));
        assert!(
            !ALLOWED.contains(&libc::SYS_socket),
            "socket only with a rule"
        );
    }
}
