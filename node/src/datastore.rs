//! The shared datastore: one directory per VM with its config and virtual disk, the same path
//! on every node (like shared storage). The node running a VM holds an exclusive lock on it.
//!
//! Only root touches a VM's files: directories are 0700 and files 0600, created that way and
//! fixed when the datastore is opened, so that no other local user can read a disk, take its
//! lock or block it.
use std::fs::{DirBuilder, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use fs2::FileExt;
use serde::{Deserialize, Serialize};
use tern_hypervisor::vmm::lease::{self, Lease};

/// Disk size of a VM whose config predates `disk_mib` (what every disk was then).
const LEGACY_DISK_MIB: u64 = 64;
/// Disk size of a new VM unless its spec says otherwise (`tern vm create --disk`).
pub const DEFAULT_DISK_MIB: u64 = 1024;
/// Largest disk a VM may have: 16 TiB.
pub const MAX_DISK_MIB: u64 = 16 << 20;
/// Mode of the datastore's directories and files: root only.
const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

fn make_dir(path: &Path) -> anyhow::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
        .with_context(|| format!("creating {}", path.display()))?;
    set_mode(path, DIR_MODE)
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("restricting {}", path.display()))
}

/// Open options for a datastore file, created root-only.
fn file_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE);
    o
}

/// Make `dir` and everything under it root-only (a datastore written by an older version, or
/// touched by hand).
fn restrict_tree(dir: &Path) -> anyhow::Result<()> {
    set_mode(dir, DIR_MODE)?;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            restrict_tree(&entry.path())?;
        } else if kind.is_file() {
            set_mode(&entry.path(), FILE_MODE)?;
        }
    }
    Ok(())
}

/// What a node needs to boot a VM; written once at creation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub workload: String,
    /// Size of `disk.img` (raw, sparse), MiB.
    #[serde(default = "legacy_disk_mib")]
    pub disk_mib: u64,
    /// What the node does when the VM's process dies.
    #[serde(default)]
    pub restart: RestartPolicy,
}

/// What happens when a VM's VMM process dies on its host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestartPolicy {
    /// Cold-boot it again from its datastore files on the same host.
    #[default]
    Always,
    /// Leave it stopped (the committed state says so).
    Never,
}

impl std::str::FromStr for RestartPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(RestartPolicy::Always),
            "never" => Ok(RestartPolicy::Never),
            _ => Err(format!("restart policy {s:?} is not `always` or `never`")),
        }
    }
}

fn legacy_disk_mib() -> u64 {
    LEGACY_DISK_MIB
}

/// `Datastore::create` found the VM's directory already there.
#[derive(Debug)]
pub struct DirExists {
    pub dir: PathBuf,
}

impl std::fmt::Display for DirExists {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "datastore directory {} already exists (another create of this name is in progress, \
             or one was interrupted: if the vm is not in `tern vm list`, remove the directory)",
            self.dir.display()
        )
    }
}

impl std::error::Error for DirExists {}

#[derive(Clone, Debug)]
pub struct Datastore {
    root: PathBuf,
}

/// Held while a node runs the VM; dropping it releases the lock.
#[derive(Debug)]
pub struct VmLock {
    _file: File,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.')
}

impl Datastore {
    pub fn open(root: &Path) -> anyhow::Result<Datastore> {
        make_dir(root).with_context(|| format!("creating datastore {}", root.display()))?;
        make_dir(&root.join("vms"))?;
        restrict_tree(root)?;
        Ok(Datastore {
            root: root.to_path_buf(),
        })
    }

    fn dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        anyhow::ensure!(
            valid_name(name),
            "vm name {name:?} must be 1-64 of [A-Za-z0-9._-], not starting with a dot"
        );
        Ok(self.root.join("vms").join(name))
    }

    /// Create a new VM's directory, config and disk file. The directory is created
    /// exclusively: when it already exists (another create of the same name, or files left by
    /// an interrupted one) this fails with `DirExists` and touches nothing, so a create that
    /// loses a race never removes the winner's files.
    pub fn create(&self, cfg: &VmConfig) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1..=MAX_DISK_MIB).contains(&cfg.disk_mib),
            "disk size {} MiB is out of range (1 MiB to 16 TiB)",
            cfg.disk_mib
        );
        let dir = self.dir(&cfg.name)?;
        match DirBuilder::new().mode(DIR_MODE).create(&dir) {
            Ok(()) => set_mode(&dir, DIR_MODE)?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(DirExists { dir }.into());
            }
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
        let written = self.write_new(&dir, cfg);
        if written.is_err() {
            // The directory is this call's own: nothing else can have used it yet.
            let _ = std::fs::remove_dir_all(&dir);
        }
        written
    }

    fn write_new(&self, dir: &Path, cfg: &VmConfig) -> anyhow::Result<()> {
        let tmp = dir.join("config.json.tmp");
        let mut f = file_options()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        std::io::Write::write_all(&mut f, &serde_json::to_vec_pretty(cfg)?)?;
        std::fs::rename(&tmp, dir.join("config.json"))?;
        let disk = file_options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("disk.img"))?;
        disk.set_len(cfg.disk_mib << 20)?;
        Ok(())
    }

    pub fn config(&self, name: &str) -> anyhow::Result<VmConfig> {
        let path = self.dir(name)?.join("config.json");
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// The VM's disk image (attached as virtio-blk by its VMM).
    pub fn disk_path(&self, name: &str) -> anyhow::Result<PathBuf> {
        Ok(self.dir(name)?.join("disk.img"))
    }

    /// The VM's ownership lease (see `tern_hypervisor::vmm::lease`).
    pub fn lease_path(&self, name: &str) -> anyhow::Result<PathBuf> {
        Ok(self.dir(name)?.join("lease"))
    }

    /// The lease as it stands (`None`: none written yet, or unreadable).
    pub fn lease(&self, name: &str) -> Option<Lease> {
        lease::read(&self.lease_path(name).ok()?).ok()
    }

    /// Record that `owner` runs the VM at the committed `epoch`. Never moves the lease back:
    /// a node whose view lags cannot hand the VM to an older epoch (refused with the reason);
    /// the same lease again is a no-op.
    pub fn write_lease(&self, name: &str, owner: u64, epoch: u64) -> anyhow::Result<()> {
        let path = self.lease_path(name)?;
        match lease::read(&path) {
            Ok(l) if l.epoch > epoch => anyhow::bail!(
                "the lease of {name} is at epoch {} (host {}), newer than {epoch}",
                l.epoch,
                l.owner
            ),
            Ok(l) if l.epoch == epoch && l.owner != owner => anyhow::bail!(
                "the lease of {name} gives epoch {epoch} to host {}, not {owner}",
                l.owner
            ),
            Ok(l) if l.epoch == epoch => return Ok(()),
            _ => {}
        }
        lease::write(&path, Lease { owner, epoch })
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Take the VM's exclusive lock, failing at once if another process holds it.
    pub fn lock(&self, name: &str) -> anyhow::Result<VmLock> {
        let path = self.dir(name)?.join("lock");
        let file = file_options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        file.try_lock_exclusive()
            .with_context(|| format!("{name} is locked by another node"))?;
        Ok(VmLock { _file: file })
    }

    /// Take the lock, retrying for up to `wait` (the previous holder is letting go).
    pub fn lock_within(&self, name: &str, wait: std::time::Duration) -> anyhow::Result<VmLock> {
        let until = std::time::Instant::now() + wait;
        loop {
            match self.lock(name) {
                Ok(l) => return Ok(l),
                Err(e) if std::time::Instant::now() >= until => return Err(e),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
    }

    pub fn remove(&self, name: &str) -> anyhow::Result<()> {
        let dir = self.dir(name)?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_is_exclusive_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let ds = Datastore::open(dir.path()).unwrap();
        let cfg = VmConfig {
            name: "a".into(),
            memory_mib: 64,
            vcpus: 1,
            workload: "wss=8M".into(),
            disk_mib: 1024,
            restart: Default::default(),
        };
        ds.create(&cfg).unwrap();
        // Sparse: the full size, almost no blocks.
        let disk = std::fs::metadata(dir.path().join("vms/a/disk.img")).unwrap();
        assert_eq!(disk.len(), 1 << 30);
        assert!(std::os::unix::fs::MetadataExt::blocks(&disk) < 64);
        // Sizes out of range are refused and create nothing.
        for bad in [0, MAX_DISK_MIB + 1] {
            let cfg = VmConfig {
                name: "b".into(),
                disk_mib: bad,
                restart: Default::default(),
                ..cfg.clone()
            };
            let e = ds.create(&cfg).unwrap_err();
            assert!(e.to_string().contains("out of range"), "{e}");
            assert!(!dir.path().join("vms/b").exists());
        }
        // A config written before disk sizes existed reads as the old 64 MiB.
        let old: VmConfig =
            serde_json::from_str(r#"{"name":"o","memory_mib":64,"vcpus":1,"workload":"wss=8M"}"#)
                .unwrap();
        assert_eq!(old.disk_mib, 64);
        assert_eq!(ds.config("a").unwrap(), cfg);
        let l = ds.lock("a").unwrap();
        assert!(ds.lock("a").is_err());
        drop(l);
        assert!(ds.lock("a").is_ok());
    }

    /// `cmd` run as the unprivileged user nobody: (succeeded, stderr).
    fn as_nobody(cmd: &mut std::process::Command) -> (bool, String) {
        use std::os::unix::process::CommandExt;
        let out = cmd.uid(65534).gid(65534).output().expect("spawn as nobody");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    #[test]
    fn a_local_user_can_neither_read_nor_lock_nor_take_vm_files() {
        let top = tempfile::tempdir().unwrap();
        // Let anyone reach the datastore, so only its own modes protect it.
        std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let root = top.path().join("ds");
        // A VM written loosely (as by an older version): the open fixes it.
        let loose = root.join("vms").join("old");
        std::fs::create_dir_all(&loose).unwrap();
        std::fs::write(loose.join("disk.img"), b"x").unwrap();
        for p in [&root, &root.join("vms"), &loose] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::set_permissions(
            loose.join("disk.img"),
            std::fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        let ds = Datastore::open(&root).unwrap();
        ds.create(&VmConfig {
            name: "a".into(),
            memory_mib: 64,
            vcpus: 1,
            workload: "wss=8M".into(),
            disk_mib: 16,
            restart: Default::default(),
        })
        .unwrap();
        let _held = ds.lock("a").unwrap();
        let vm = root.join("vms").join("a");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        for d in [&root, &root.join("vms"), &vm, &loose] {
            assert_eq!(mode(d), 0o700, "{}", d.display());
        }
        for f in ["config.json", "disk.img", "lock"] {
            assert_eq!(mode(&vm.join(f)), 0o600, "{f}");
        }
        assert_eq!(mode(&loose.join("disk.img")), 0o600);
        for file in [vm.join("lock"), vm.join("disk.img"), loose.join("disk.img")] {
            // flock(1) opens the file and takes a shared lock: what blocked a switchover.
            let (ok, err) = as_nobody(
                std::process::Command::new("flock")
                    .args(["--nonblock", "--shared"])
                    .arg(&file)
                    .arg("true"),
            );
            assert!(
                !ok && err.contains("Permission denied"),
                "flock {file:?}: {err}"
            );
            let (ok, err) = as_nobody(std::process::Command::new("cat").arg(&file));
            assert!(
                !ok && err.contains("Permission denied"),
                "read {file:?}: {err}"
            );
        }
        // Nor replace or add files in the VM's directory.
        let (ok, err) = as_nobody(
            std::process::Command::new("mv")
                .arg(vm.join("disk.img"))
                .arg(top.path().join("stolen.img")),
        );
        assert!(!ok && err.contains("Permission denied"), "mv: {err}");
        assert!(vm.join("disk.img").exists());
    }

    #[test]
    fn a_second_create_of_a_name_fails_and_leaves_the_first_ones_files() {
        let dir = tempfile::tempdir().unwrap();
        let ds = Datastore::open(dir.path()).unwrap();
        let first = VmConfig {
            name: "a".into(),
            memory_mib: 64,
            vcpus: 1,
            workload: "wss=8M".into(),
            disk_mib: 16,
            restart: Default::default(),
        };
        ds.create(&first).unwrap();
        let second = VmConfig {
            memory_mib: 128,
            ..first.clone()
        };
        let err = ds.create(&second).unwrap_err();
        assert!(err.is::<DirExists>(), "{err:#}");
        assert_eq!(ds.config("a").unwrap(), first);
        assert!(dir.path().join("vms/a/disk.img").exists());
    }

    #[test]
    fn hostile_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ds = Datastore::open(dir.path()).unwrap();
        for bad in ["", "..", "../x", "a/b", ".hidden"] {
            assert!(ds.lock(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_lease_never_moves_back_nor_changes_hands_at_one_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let ds = Datastore::open(dir.path()).unwrap();
        std::fs::create_dir(dir.path().join("vms/a")).unwrap();
        ds.write_lease("a", 1, 0).unwrap();
        ds.write_lease("a", 1, 0).unwrap(); // the same again: a no-op
        ds.write_lease("a", 2, 1).unwrap();
        assert_eq!(ds.lease("a"), Some(Lease { owner: 2, epoch: 1 }));
        // A node whose view lags (owner 1 at epoch 0) cannot take it back.
        let e = ds.write_lease("a", 1, 0).unwrap_err().to_string();
        assert!(e.contains("newer"), "{e}");
        let e = ds.write_lease("a", 1, 1).unwrap_err().to_string();
        assert!(e.contains("not 1"), "{e}");
        assert_eq!(ds.lease("a"), Some(Lease { owner: 2, epoch: 1 }));
        let mode = std::fs::metadata(ds.lease_path("a").unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(ds.write_lease("../x", 1, 5).is_err());
    }
}
