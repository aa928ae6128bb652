//! The ownership lease: a small file in the VM's datastore directory naming the host that owns
//! the VM and the committed ownership epoch. The node writes it (atomically, mode 0600) when it
//! commits or observes ownership; a VMM may boot or resume the VM only when the lease names its
//! host at exactly its epoch, so a VMM left over from an older epoch cannot run the VM.
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The lease file's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub owner: u64,
    pub epoch: u64,
}

/// Why a VMM may not run the VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("cannot read the lease {path}: {reason}")]
    Unreadable { path: String, reason: String },
    #[error("the lease names host {lease_owner} (epoch {lease_epoch}), not this host {owner}")]
    OtherOwner {
        owner: u64,
        lease_owner: u64,
        lease_epoch: u64,
    },
    #[error("stale epoch: this VMM runs epoch {epoch} but the lease is at epoch {lease_epoch}")]
    Stale { epoch: u64, lease_epoch: u64 },
    #[error("the lease is still at epoch {lease_epoch}; this VMM waits for epoch {epoch}")]
    NotYet { epoch: u64, lease_epoch: u64 },
}

impl LeaseError {
    /// Whether waiting could change the answer (the lease has not reached our epoch yet).
    fn may_change(&self) -> bool {
        matches!(
            self,
            LeaseError::NotYet { .. } | LeaseError::Unreadable { .. }
        )
    }
}

/// The decision alone: may `owner` run the VM at `epoch` under `lease`?
pub fn permits(lease: Lease, owner: u64, epoch: u64) -> Result<(), LeaseError> {
    if lease.epoch > epoch {
        return Err(LeaseError::Stale {
            epoch,
            lease_epoch: lease.epoch,
        });
    }
    if lease.epoch < epoch {
        return Err(LeaseError::NotYet {
            epoch,
            lease_epoch: lease.epoch,
        });
    }
    if lease.owner != owner {
        return Err(LeaseError::OtherOwner {
            owner,
            lease_owner: lease.owner,
            lease_epoch: lease.epoch,
        });
    }
    Ok(())
}

pub fn read(path: &Path) -> Result<Lease, LeaseError> {
    let unreadable = |reason: String| LeaseError::Unreadable {
        path: path.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| unreadable(e.to_string()))?;
    if bytes.len() > 4096 {
        return Err(unreadable("larger than 4 KiB".into()));
    }
    serde_json::from_slice(&bytes).map_err(|e| unreadable(e.to_string()))
}

/// Read the lease and check it.
pub fn check(path: &Path, owner: u64, epoch: u64) -> Result<(), LeaseError> {
    permits(read(path)?, owner, epoch)
}

/// Check, waiting up to `wait` while the lease has not caught up with `epoch` (a destination
/// told to resume may be ahead of its node writing the lease). A newer epoch or another owner
/// ends the wait at once.
pub fn wait_for(path: &Path, owner: u64, epoch: u64, wait: Duration) -> Result<(), LeaseError> {
    let until = Instant::now() + wait;
    loop {
        match check(path, owner, epoch) {
            Err(e) if e.may_change() && Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(5))
            }
            r => return r,
        }
    }
}

/// Write the lease atomically (temporary file, fsync, rename), readable by its owner only.
pub fn write(path: &Path, lease: Lease) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&serde_json::to_vec(&lease).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn only_this_owner_at_this_epoch_may_run() {
        let l = Lease { owner: 2, epoch: 5 };
        assert_eq!(permits(l, 2, 5), Ok(()));
        assert!(matches!(permits(l, 2, 4), Err(LeaseError::Stale { .. })));
        assert!(matches!(permits(l, 2, 6), Err(LeaseError::NotYet { .. })));
        assert!(matches!(
            permits(l, 3, 5),
            Err(LeaseError::OtherOwner { .. })
        ));
        let e = permits(l, 2, 4).unwrap_err().to_string();
        assert!(e.contains("stale epoch"), "{e}");
    }

    #[test]
    fn written_atomically_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lease");
        write(&path, Lease { owner: 1, epoch: 7 }).unwrap();
        assert_eq!(read(&path).unwrap(), Lease { owner: 1, epoch: 7 });
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, b"garbage").unwrap();
        assert!(matches!(
            check(&path, 1, 7),
            Err(LeaseError::Unreadable { .. })
        ));
        // A stale epoch is refused at once, not after the wait.
        write(&path, Lease { owner: 1, epoch: 9 }).unwrap();
        let t = Instant::now();
        assert!(wait_for(&path, 1, 7, Duration::from_secs(5)).is_err());
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
