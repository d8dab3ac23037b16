//! What the daemon needs from the host: its instance lock, a bpffs for the pins, enough file
//! descriptors, and systemd's readiness protocol.

use anyhow::{bail, Context as _, Result};
use std::path::Path;
use tracing::warn;

/// Takes an exclusive lock on `state_dir/xdplb.lock`, or says which daemon holds it.
pub(super) fn lock_instance(state_dir: &Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating daemon.state_dir {}", state_dir.display()))?;
    let path = state_dir.join("xdplb.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "another `xdplb run` already uses state_dir {} (lock {}): stop it first",
            state_dir.display(),
            path.display()
        );
    }
    Ok(file)
}

/// Pinning needs bpffs. Under /sys/fs/bpf it is mounted if missing (as systemd would);
/// elsewhere the operator must have mounted one. Pins on a bpffs that only this process's
/// mount namespace sees (e.g. under `ip netns exec`, which remounts /sys) vanish when the
/// daemon exits, and with them the attachment: that case is refused with what to do.
pub(super) fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let bpffs = Path::new("/sys/fs/bpf");
    let create = || {
        std::fs::create_dir_all(pin_dir)
            .with_context(|| format!("creating daemon.pin_dir {}", pin_dir.display()))
    };
    if !pin_dir.starts_with(bpffs) {
        create()?;
        if !is_bpffs(pin_dir)? {
            bail!(
                "daemon.pin_dir {} is not on a bpf filesystem: run `mount -t bpf bpf {}` first",
                pin_dir.display(),
                pin_dir.display()
            );
        }
        return Ok(());
    }
    if bpffs.exists() && is_bpffs(bpffs)? {
        return create();
    }
    if private_mount_namespace() {
        bail!(
            "/sys/fs/bpf is not mounted in this mount namespace (as under `ip netns exec`): \
             pins there would vanish when xdplb exits. Mount a bpffs outside /sys and point \
             daemon.pin_dir at it (`mount -t bpf bpf /run/xdplb/bpf`)"
        );
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status()
        .context("running mount -t bpf")?;
    if !status.success() || !is_bpffs(bpffs)? {
        bail!("bpffs is not mounted on /sys/fs/bpf and mounting it failed: run `mount -t bpf bpf /sys/fs/bpf`");
    }
    create()
}

fn is_bpffs(path: &Path) -> Result<bool> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: statfs fills the zeroed struct or fails.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut fs) } != 0 {
        bail!(
            "statfs {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(fs.f_type as i64 == BPF_FS_MAGIC)
}

/// Whether this process runs in another mount namespace than init.
fn private_mount_namespace() -> bool {
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    ns("self") != ns("1")
}

/// Raises the soft limit on open files to the hard one: health checks, admin and metrics
/// connections and BPF objects all hold descriptors, and the default soft limit (1,024) is
/// low for a thousand checked backends.
pub(super) fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 || limit.rlim_cur >= limit.rlim_max
        {
            return;
        }
        let before = limit.rlim_cur;
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            warn!(
                before,
                "raising the open-files limit failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Tells systemd (`Type=notify`) where the daemon stands; a no-op outside systemd.
pub(super) fn notify_systemd(state: sd_notify::NotifyState) {
    if let Err(e) = sd_notify::notify(&[state]) {
        warn!("sd_notify: {e}");
    }
}
