// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Command-line arguments (clap derive only; validation is in `config`).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// vhost-user virtio-blk backend for raw images and User-Mode-Linux COW files.
///
/// Without a subcommand it serves, as the vhost-user backend program
/// conventions (QEMU docs/interop/vhost-user.rst) invoke it:
/// `vhost-user-ubd --socket-path=PATH --blk-file=FILE [--read-only]`.
#[derive(Debug, Parser)]
#[command(
    name = "vhost-user-ubd",
    version,
    about,
    long_about = None,
    args_conflicts_with_subcommands = true,
    after_long_help = EXAMPLES
)]
pub struct Args {
    /// What to do (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Print the backend's capabilities as JSON (`{"type": "block",
    /// "features": [...]}`, the vhost-user backend program conventions) and
    /// exit.
    #[arg(long)]
    pub print_capabilities: bool,
    /// `serve`'s options, for the conventions' invocation without a
    /// subcommand.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// The examples of `--help` and the man page (the README's).
pub const EXAMPLES: &str = "\
Examples:
  # A COW over a shared base (created if missing, like UML does):
  vhost-user-ubd serve --socket /run/vm1.sock --cow vm1.cow --backing /images/base.img --queues 2
  # A raw image, with a control socket:
  vhost-user-ubd serve --socket /run/vm2.sock --control /run/vm2.ctl --raw disk.img
  # The vhost-user backend program conventions:
  vhost-user-ubd --socket-path=/run/vm3.sock --blk-file=vm3.cow --read-only
  # Grow a served raw disk; see what a daemon serves:
  vhost-user-ubd resize --control /run/vm2.ctl 20G
  vhost-user-ubd status --control /run/vm2.ctl
  # Live upgrade: a new instance takes the disk over, the old one exits 0:
  vhost-user-ubd serve --takeover /run/vm2.ctl
  # QEMU:
  qemu-system-x86_64 -machine q35,memory-backend=mem -m 1G \\
    -object memory-backend-memfd,id=mem,size=1G,share=on \\
    -chardev socket,id=vub0,path=/run/vm1.sock,reconnect-ms=10 \\
    -device vhost-user-blk-pci,chardev=vub0,num-queues=2 ...
";

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the man page (roff, generated from these definitions).
    #[command(hide = true)]
    Man,
    /// Serve a disk to a vhost-user frontend (QEMU vhost-user-blk-pci,
    /// cloud-hypervisor, libblkio) until SIGTERM/SIGINT, or until a new
    /// instance takes it over (`serve --takeover`).
    Serve(Box<ServeArgs>),
    /// Create a UML COW file over a backing image (same bytes as `uml_mkcow COW BACKING`).
    Create {
        /// Alignment of the bitmap and data areas (uml_mkcow uses 4096).
        #[arg(long, default_value_t = 4096)]
        alignment: u32,
        /// Bytes one bitmap bit covers (a power of two, 512 to 65536). 4096
        /// makes the bitmap 8x smaller (1 TiB: 32 MiB instead of 256 MiB);
        /// a guest write smaller than a COW sector copies the rest of it
        /// from the backing first. uml_moo honours it; the UML kernel
        /// driver only works with 512.
        #[arg(long, default_value_t = 512)]
        sectorsize: u32,
        /// The COW file to create (must not exist).
        cow: PathBuf,
        /// The read-only backing image.
        backing: PathBuf,
    },
    /// Show a COW file's header, layout, used sectors and backing status.
    Info {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The COW file.
        cow: PathBuf,
    },
    /// Merge a COW file with its backing into a raw image, offline: the
    /// bytes of `uml_moo COW OUT`, written sparse, under a temporary name
    /// renamed at the end. With --in-place, into the backing file itself
    /// (`uml_moo -d COW`), which invalidates every COW made over it.
    Merge {
        /// Write the COW's sectors into its backing file instead of a new
        /// image. Refused while a daemon or UML guest uses the COW or the
        /// backing.
        #[arg(long, conflicts_with_all = ["out", "force"])]
        in_place: bool,
        /// Replace OUT if it exists.
        #[arg(long)]
        force: bool,
        /// Use this backing file instead of the header's (`uml_moo -b`).
        #[arg(long, value_name = "FILE")]
        backing: Option<PathBuf>,
        /// What the backing file is checked for, as `serve --backing-check`
        /// (size+mtime, size or none; --in-place needs a check).
        #[arg(
            long,
            default_value = "size+mtime",
            value_name = "size+mtime|size|none"
        )]
        backing_check: String,
        /// Where `serve` keeps the COW's crash journal: a merge is refused
        /// while one holds writes a daemon completed before it died.
        #[arg(long, default_value = "/dev/shm", value_name = "DIR")]
        crash_journal: PathBuf,
        /// Progress: text (a bar on stderr when it is a terminal) or json
        /// (a line a second on stdout, and a last one with "done": true).
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        output: String,
        /// The COW file.
        cow: PathBuf,
        /// The raw image to write (must not exist, unless --force).
        #[arg(required_unless_present = "in_place")]
        out: Option<PathBuf>,
    },
    /// Show what a running daemon serves, through its control socket.
    Status {
        /// The daemon's --control socket.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        /// Print the daemon's JSON reply.
        #[arg(long)]
        json: bool,
    },
    /// Resize a raw disk while it is served; the guest sees the new
    /// capacity at once (QEMU). SIZE in bytes, or with K, M, G, T (1024).
    Resize {
        /// The daemon's --control socket.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        /// Allow shrinking (cuts off data the guest may still address).
        #[arg(long)]
        force: bool,
        /// The new size.
        size: String,
    },
    /// Copy every sector still read from the backing into the COW while
    /// the guest runs (block job; README "Block jobs"). Afterwards `info`
    /// says the COW no longer reads its backing. Resumable: a flatten
    /// started again skips what is in the COW already. Waits for the job
    /// (exit status 0 only on success) unless --detach; Ctrl-C leaves the
    /// job running, `cancel` stops it.
    Flatten(JobArgs),
    /// Write the served disk as it is at this instant to a new raw image
    /// while the guest keeps writing (copy-before-write; block job). OUT is
    /// created by the daemon (same user), sparse where the disk reads zeros.
    /// Waits for the job unless --detach; Ctrl-C leaves it running.
    Export {
        #[command(flatten)]
        job: JobArgs,
        /// Replace OUT if it exists.
        #[arg(long)]
        force: bool,
        /// The raw image to write.
        out: PathBuf,
    },
    /// Stop the running block job (a flatten keeps what it copied; an
    /// export's unfinished image is removed).
    Cancel {
        /// The daemon's --control socket.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        /// Print the job's final status as text or JSON.
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Check that a COW file can be served: header, layout, backing, locks.
    /// Exit status 0 only when it is usable.
    Check {
        /// Use this backing file instead of the header's.
        #[arg(long)]
        backing: Option<PathBuf>,
        /// What the backing file is checked for, as `serve --backing-check`
        /// (size+mtime, size or none).
        #[arg(
            long,
            default_value = "size+mtime",
            value_name = "size+mtime|size|none"
        )]
        backing_check: String,
        /// Where `serve` keeps the COW's crash journal (to report one left by
        /// a daemon that died).
        #[arg(long, default_value = "/dev/shm", value_name = "DIR")]
        crash_journal: PathBuf,
        /// The COW file.
        cow: PathBuf,
    },
}

/// How the command reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// A progress bar on a terminal, a summary line at the end.
    Text,
    /// One JSON object per second (the job's status), the last one final.
    Json,
}

/// What `flatten` and `export` take.
#[derive(Debug, clap::Args)]
pub struct JobArgs {
    /// The daemon's --control socket.
    #[arg(long, value_name = "PATH")]
    pub control: PathBuf,
    /// Copy at most this many MB (10^6 bytes) per second (an export copies
    /// a chunk a guest write waits for at once).
    #[arg(long, value_name = "MB/s")]
    pub rate: Option<f64>,
    /// Start the job and return.
    #[arg(long)]
    pub detach: bool,
    /// Progress as text (a bar on a terminal) or one JSON line per second.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

/// `serve` options.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("listen").args(["socket", "fd"])))]
#[command(group(clap::ArgGroup::new("image").args(["cow", "raw", "blk_file"])))]
pub struct ServeArgs {
    /// UNIX socket to listen on (replaced if it exists).
    #[arg(long, visible_alias = "socket-path", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Live handover: take the disk, its listening socket and its
    /// arguments over from the instance serving the control socket CTL,
    /// which then exits 0 (live upgrade, a change of settings). Disk
    /// arguments given here must be equal to its; --control defaults to
    /// taking CTL over. See docs/live-upgrade.md.
    #[arg(long, value_name = "CTL")]
    pub takeover: Option<PathBuf>,
    /// Serve on an inherited listening socket (systemd socket activation).
    #[arg(long, value_name = "N")]
    pub fd: Option<i32>,
    /// UML COW file to serve; created over --backing if missing (as UML does).
    #[arg(long, value_name = "FILE")]
    pub cow: Option<PathBuf>,
    /// Backing file of the COW (default: the path in the COW header).
    #[arg(long, value_name = "FILE", requires = "cow")]
    pub backing: Option<PathBuf>,
    /// Raw image to serve.
    #[arg(long, value_name = "FILE")]
    pub raw: Option<PathBuf>,
    /// The disk, as the backend program conventions name it: a UML COW
    /// file is served as --cow, anything else as --raw.
    #[arg(long, value_name = "FILE")]
    pub blk_file: Option<PathBuf>,
    /// Virtqueues offered, the most a frontend may use (QEMU's num-queues
    /// defaults to the vCPU count). A queue costs its io_uring only once the
    /// frontend sends it a request.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub queues: usize,
    /// Largest virtqueue size accepted (power of two).
    #[arg(long, default_value_t = 1024, value_name = "N")]
    pub queue_size: u32,
    /// Serve read-only (VIRTIO_BLK_F_RO; writes fail).
    #[arg(long, visible_alias = "read-only")]
    pub readonly: bool,
    /// Device serial returned by GET_ID (at most 20 bytes; default derived from the file).
    #[arg(long, value_name = "STR")]
    pub serial: Option<String>,
    /// Host cache for the data files: none (O_DIRECT) or writeback (page cache).
    #[arg(long, default_value = "writeback", value_name = "MODE")]
    pub cache: String,
    /// Force writethrough (WCE=0): every write is durable, with its COW bits, when it completes.
    #[arg(long)]
    pub writethrough: bool,
    /// COW: persist bits once this many completed writes await them.
    #[arg(long, default_value_t = 16384, value_name = "N")]
    pub checkpoint_extents: usize,
    /// COW: persist bits once the oldest completed write awaiting them is this old.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub checkpoint_ms: u64,
    /// With --cache none, the interface for data writes: native (Linux AIO,
    /// like QEMU's aio=native; writes into holes allocate in the queue's
    /// thread) or io_uring (hands writes into holes to io-wq threads).
    #[arg(long, default_value = "native", value_name = "MODE")]
    pub aio: String,
    /// Worker threads serving the queues (queue q on thread q mod N); default:
    /// one per queue, at most half the CPUs this process may use.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// COW: directory of the crash journal, or `off`. Completed writes are
    /// recorded there (shared memory, no system call) until their bits are
    /// durable, so that a daemon killed by -9, a panic or the OOM killer
    /// loses none of them: the next daemon on the COW replays it. Needs a
    /// file system with birth times (tmpfs, ext4, xfs, btrfs).
    #[arg(long, default_value = "/dev/shm", value_name = "DIR|off")]
    pub crash_journal: String,
    /// The sandbox entered once the socket is bound and the files are
    /// open: seccomp (every capability dropped, no_new_privs, a system-call
    /// allow-list for every thread; io_uring restricted to its opcodes) or
    /// none.
    #[arg(long, default_value = "seccomp", value_name = "seccomp|none")]
    pub sandbox: String,
    /// What a system call outside the sandbox's list does: kill (the
    /// daemon, SIGSYS) or log (the kernel logs it, the call goes through).
    #[arg(long, default_value = "kill", value_name = "kill|log")]
    pub seccomp: String,
    /// COW: what the backing file is checked for against the header, at
    /// open and once a second while served: size+mtime (as UML does), size
    /// (a base on a network store mounted as a file, whose mtime is the
    /// mount's), or none. Logged at start when not size+mtime.
    #[arg(
        long,
        default_value = "size+mtime",
        value_name = "size+mtime|size|none"
    )]
    pub backing_check: String,
    /// Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), offered
    /// to frontends that take it (QEMU, cloud-hypervisor): a restarted
    /// daemon completes every request exactly once, and requests complete
    /// out of order. `off`: in pop order, which QEMU's rewind to the used
    /// index makes safe without it (not cloud-hypervisor's rewind).
    #[arg(long, default_value = "on", value_name = "on|off")]
    pub inflight: String,
    /// Control socket (status, resize; README "Control socket"), private
    /// to the daemon's user.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Test hook (negative controls only): complete requests out of order
    /// even without inflight tracking, which a daemon crash then punishes.
    #[arg(long, hide = true)]
    pub test_out_of_order: bool,
    /// Test hook: hold each bitmap write's completion (makes R3/R4 observable).
    #[arg(long, default_value_t = 0, hide = true)]
    pub test_bitmap_delay_ms: u64,
    /// The arguments given on the command line (clap ids), as opposed to
    /// defaults: a takeover compares only those with the running instance's.
    #[arg(skip)]
    pub explicit: Vec<String>,
}
