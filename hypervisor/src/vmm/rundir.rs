//! The VMM's run directory: `ctl.sock` (the control socket, mode 0600), `pid` (written once the
//! socket is up, so whoever finds the pid can connect) and `exit.json` (why it ended, written
//! on a clean exit so a supervisor can tell a stop from a crash).
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::protocol::VmmState;
use super::VmmError;

pub const SOCKET: &str = "ctl.sock";
pub const PID: &str = "pid";
pub const EXIT: &str = "exit.json";

/// How a VMM ended, as written to `exit.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub pid: u32,
    pub state: VmmState,
    pub error: Option<String>,
}

#[derive(Debug, Clone)]
pub struct RunDir {
    pub path: PathBuf,
}

/// Whether a process with this pid exists and has not ended (a zombie waiting for its parent
/// to reap it counts as ended).
pub fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state letter follows the command name, which is in parentheses and may contain any.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, None | Some('Z') | Some('X'))
}

/// The pid recorded in `dir`, if the file is there and readable.
pub fn read_pid(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join(PID))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

pub fn read_exit(dir: &Path) -> Option<ExitRecord> {
    let bytes = std::fs::read(dir.join(EXIT)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    drop(f);
    std::fs::rename(&tmp, path)
}

impl RunDir {
    /// Create (mode 0700) and claim `path`, refusing if a live VMM already runs there.
    pub fn claim(path: &Path) -> Result<RunDir, VmmError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|e| VmmError::RunDir(format!("creating {}: {e}", path.display())))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| VmmError::RunDir(format!("{}: {e}", path.display())))?;
        if let Some(pid) = read_pid(path).filter(|&p| p != std::process::id() && alive(p)) {
            return Err(VmmError::RunDir(format!(
                "a VMM (pid {pid}) already runs in {}",
                path.display()
            )));
        }
        for f in [SOCKET, PID, EXIT] {
            let _ = std::fs::remove_file(path.join(f));
        }
        Ok(RunDir {
            path: path.to_path_buf(),
        })
    }

    /// Bind the control socket, readable and writable by its owner only.
    pub fn bind(&self) -> Result<UnixListener, VmmError> {
        let sock = self.path.join(SOCKET);
        let l = UnixListener::bind(&sock)
            .map_err(|e| VmmError::RunDir(format!("binding {}: {e}", sock.display())))?;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| VmmError::RunDir(format!("{}: {e}", sock.display())))?;
        Ok(l)
    }

    pub fn write_pid(&self) -> Result<(), VmmError> {
        write_private(
            &self.path.join(PID),
            format!("{}\n", std::process::id()).as_bytes(),
        )
        .map_err(|e| VmmError::RunDir(format!("writing the pid file: {e}")))
    }

    /// Record a clean exit and remove the socket and pid file.
    pub fn finish(&self, record: &ExitRecord) {
        let bytes = serde_json::to_vec(record).unwrap_or_default();
        if let Err(e) = write_private(&self.path.join(EXIT), &bytes) {
            tracing::warn!("writing {}: {e}", EXIT);
        }
        let _ = std::fs::remove_file(self.path.join(SOCKET));
        let _ = std::fs::remove_file(self.path.join(PID));
    }
}

/// Leave the parent's session and process group, so that signals to the supervisor's group
/// (or its terminal hanging up) do not reach the VM.
pub fn detach() -> std::io::Result<()> {
    // SAFETY: setsid takes no pointers and only changes this process's session.
    let r = unsafe { libc::setsid() };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        // EPERM: already a process-group leader (e.g. started with setsid(1)): nothing to do.
        if e.raw_os_error() != Some(libc::EPERM) {
            return Err(e);
        }
    }
    Ok(())
}

/// Send `SIGKILL` (or `SIGTERM` when `force` is false) to process `pid`.
pub fn signal(pid: u32, force: bool) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| std::io::Error::other(format!("{pid} is not a process id")))?;
    let sig = if force { libc::SIGKILL } else { libc::SIGTERM };
    // SAFETY: kill takes plain integers; a positive pid addresses exactly one process.
    if unsafe { libc::kill(pid, sig) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
