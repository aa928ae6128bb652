//! This host's VMM processes: one `tern vmm` per VM, started in its run directory
//! (`DATA/run/vms/NAME/{ctl.sock,pid,exit.json,vmm.log}`), found again after the node restarts,
//! checked against the committed state, and watched so that a death is noticed within a second.
//!
//! The VMMs leave the node's session, so a restart (or `kill -9`) of the node never touches
//! them. [`verdict`] is the decision alone; [`Supervisor`] does the process I/O.
use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tern_hypervisor::vmm::protocol::validate_name;
use tern_hypervisor::vmm::rundir::{self, alive, read_exit, read_pid, ExitRecord};
use tern_hypervisor::vmm::{Client, VmSpec, VmmState, VmmStatus};

/// How long a new VMM may take to answer on its socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a stopped VMM may take to exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the watcher looks for dead VMMs (a death is noticed within this).
pub const WATCH_EVERY: Duration = Duration::from_millis(200);

/// What the committed state says about a VM, as far as this host is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    pub owner: u64,
    pub epoch: u64,
    pub running: bool,
}

/// What to do with a VMM found running here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    Stop(String),
}

/// Keep a VMM only while the committed state gives its VM to this host at its epoch (a VMM in
/// the middle of a migration is left to the migration, whichever side it is).
pub fn verdict(me: u64, vmm: &VmmStatus, committed: Option<Committed>) -> Verdict {
    let busy = matches!(
        vmm.state,
        VmmState::Migrating | VmmState::AtGate | VmmState::Receiving
    );
    match committed {
        None => Verdict::Stop(format!("vm {} is no longer in the cluster", vmm.name)),
        Some(_) if busy => Verdict::Keep,
        // This node's view lags behind the VMM (it arrived through a commit not applied here).
        Some(c) if c.epoch < vmm.epoch && c.running => Verdict::Keep,
        Some(_) if matches!(vmm.state, VmmState::MigratedAway | VmmState::Handover) => {
            Verdict::Stop("its VM has moved away".into())
        }
        Some(c) if c.owner != me => {
            Verdict::Stop(format!("vm {} belongs to host {} now", vmm.name, c.owner))
        }
        Some(c) if c.epoch != vmm.epoch => Verdict::Stop(format!(
            "vm {} runs epoch {} here but the committed epoch is {}",
            vmm.name, vmm.epoch, c.epoch
        )),
        Some(c) if !c.running => Verdict::Stop(format!("vm {} is stopped", vmm.name)),
        Some(_) => Verdict::Keep,
    }
}

/// How to start one VMM.
#[derive(Debug, Clone)]
pub struct Launch {
    pub spec: VmSpec,
    pub epoch: u64,
    /// The VM's lease file on the datastore (checked by the VMM at boot and every resume).
    pub lease: Option<PathBuf>,
    /// Start empty, as a migration's destination.
    pub receive: bool,
}

/// A VMM that ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Death {
    pub name: String,
    pub pid: u32,
    /// What it wrote on a clean exit; `None`: it was killed or crashed.
    pub exit: Option<ExitRecord>,
}

struct Tracked {
    pid: u32,
    /// Started by this node (reaped with `try_wait`); adopted ones are watched through /proc.
    child: Option<Child>,
}

pub struct Supervisor {
    root: PathBuf,
    binary: PathBuf,
    owner: u64,
    procs: Mutex<HashMap<String, Tracked>>,
    /// VMMs being started (not yet answering): a second start of the same VM is refused.
    starting: Mutex<std::collections::HashSet<String>>,
}

impl Supervisor {
    /// `binary` is the `tern` executable (`std::env::current_exe()` in the node).
    pub fn new(data: &Path, binary: PathBuf, owner: u64) -> Supervisor {
        Supervisor {
            root: data.join("run").join("vms"),
            binary,
            owner,
            procs: Mutex::new(HashMap::new()),
            starting: Mutex::new(Default::default()),
        }
    }

    fn procs(&self) -> MutexGuard<'_, HashMap<String, Tracked>> {
        self.procs.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn run_dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        validate_name(name)?;
        Ok(self.root.join(name))
    }

    /// Names of the VMMs this supervisor tracks.
    pub fn names(&self) -> Vec<String> {
        self.procs().keys().cloned().collect()
    }

    pub fn pid(&self, name: &str) -> Option<u32> {
        self.procs().get(name).map(|t| t.pid)
    }

    /// A client of `name`'s control socket.
    pub fn client(&self, name: &str) -> anyhow::Result<Client> {
        let sock = self.run_dir(name)?.join(rundir::SOCKET);
        Client::connect(&sock, Duration::from_secs(10))
            .with_context(|| format!("connecting to the VMM of {name}"))
    }

    /// Start a VMM and wait until it answers; a VMM that refuses to start (a stale lease, a
    /// bad spec) is reported with its reason.
    pub fn start(&self, launch: &Launch) -> anyhow::Result<u32> {
        let name = &launch.spec.name;
        self.run_dir(name)?;
        {
            let mut starting = self.starting.lock().unwrap_or_else(|p| p.into_inner());
            if self.procs().contains_key(name) || !starting.insert(name.clone()) {
                bail!("a VMM for {name} is already running here");
            }
        }
        let started = self.spawn(launch);
        self.starting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        started
    }

    fn spawn(&self, launch: &Launch) -> anyhow::Result<u32> {
        let name = &launch.spec.name;
        let dir = self.run_dir(name)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("vmm.log"))
            .context("opening vmm.log")?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("vmm")
            .args(["--name", name])
            .arg("--run-dir")
            .arg(&dir)
            .args(["--owner", &self.owner.to_string()])
            .args(["--epoch", &launch.epoch.to_string()]);
        if launch.receive {
            cmd.arg("--receive");
        } else {
            cmd.args(["--memory", &format!("{}M", launch.spec.memory_mib)])
                .args(["--vcpus", &launch.spec.vcpus.to_string()])
                .args(["--workload", &launch.spec.workload]);
            if let Some(d) = &launch.spec.disk {
                cmd.arg("--disk").arg(d);
            }
        }
        if let Some(l) = &launch.lease {
            cmd.arg("--lease").arg(l);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        let pid = child.id();
        let until = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                let why = read_exit(&dir)
                    .and_then(|e| e.error)
                    .unwrap_or_else(|| format!("it exited with {status}"));
                bail!("the VMM of {name} did not start: {why}");
            }
            let answers = read_pid(&dir) == Some(pid)
                && self.client(name).and_then(|mut c| Ok(c.status()?)).is_ok();
            if answers {
                break;
            }
            if Instant::now() >= until {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the VMM of {name} did not answer within {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.procs().insert(
            name.clone(),
            Tracked {
                pid,
                child: Some(child),
            },
        );
        tracing::info!(vm = %name, pid, "VMM started");
        Ok(pid)
    }

    /// Find the VMMs a previous run of this node left: every run directory whose pid is alive
    /// and whose socket answers as that pid. Returns their status.
    pub fn adopt_all(&self) -> Vec<VmmStatus> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if validate_name(&name).is_err() || self.procs().contains_key(&name) {
                continue;
            }
            let Some(pid) = read_pid(&entry.path()).filter(|&p| alive(p)) else {
                continue;
            };
            let status = self.client(&name).and_then(|mut c| Ok(c.status()?));
            match status {
                Ok(s) if s.pid == pid && s.name == name => {
                    self.procs()
                        .insert(name.clone(), Tracked { pid, child: None });
                    tracing::info!(vm = %name, pid, state = ?s.state, "VMM re-adopted");
                    found.push(s);
                }
                Ok(s) => {
                    tracing::warn!(vm = %name, "run directory answers as {}/{}", s.name, s.pid)
                }
                Err(e) => tracing::warn!(vm = %name, pid, "VMM does not answer: {e:#}"),
            }
        }
        found
    }

    /// One look for VMMs that ended since the last: reaps children, checks adopted pids.
    pub fn reap(&self) -> Vec<Death> {
        let mut deaths = Vec::new();
        self.procs().retain(|name, t| {
            let gone = match &mut t.child {
                Some(c) => !matches!(c.try_wait(), Ok(None)),
                None => !alive(t.pid),
            };
            if gone {
                let exit = self
                    .run_dir(name)
                    .ok()
                    .and_then(|d| read_exit(&d))
                    .filter(|e| e.pid == t.pid);
                deaths.push(Death {
                    name: name.clone(),
                    pid: t.pid,
                    exit,
                });
            }
            !gone
        });
        for d in &deaths {
            let clean = d.exit.is_some();
            metrics::counter!("tern_vmm_exits_total", "clean" => clean.to_string()).increment(1);
            if clean {
                tracing::info!(vm = %d.name, pid = d.pid, "VMM exited");
            } else {
                tracing::warn!(vm = %d.name, pid = d.pid, "VMM died");
            }
        }
        deaths
    }

    /// Stop `name`'s VMM: ask it, then kill it if it has not gone within [`STOP_TIMEOUT`].
    pub fn stop(&self, name: &str) -> anyhow::Result<()> {
        let Some(pid) = self.pid(name) else {
            return Ok(());
        };
        if let Err(e) = self.client(name).and_then(|mut c| Ok(c.stop()?)) {
            tracing::warn!(vm = name, "stop request failed ({e:#}); killing pid {pid}");
            let _ = rundir::signal(pid, true);
        }
        let until = Instant::now() + STOP_TIMEOUT;
        while self.procs().contains_key(name) {
            self.reap_one(name);
            if Instant::now() >= until {
                let _ = rundir::signal(pid, true);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn reap_one(&self, name: &str) {
        let mut procs = self.procs();
        let gone = procs.get_mut(name).is_some_and(|t| match &mut t.child {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => !alive(t.pid),
        });
        if gone {
            procs.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_hypervisor::vmm::protocol::Load;

    fn status(state: VmmState, epoch: u64) -> VmmStatus {
        VmmStatus {
            name: "a".into(),
            pid: 1,
            state,
            epoch,
            owner: 1,
            spec: None,
            guest: None,
            load: Load::default(),
            error: None,
        }
    }

    fn c(owner: u64, epoch: u64, running: bool) -> Option<Committed> {
        Some(Committed {
            owner,
            epoch,
            running,
        })
    }

    #[test]
    fn a_vmm_is_kept_only_while_the_state_gives_its_vm_to_this_host_at_its_epoch() {
        let run = status(VmmState::Running, 4);
        assert_eq!(verdict(1, &run, c(1, 4, true)), Verdict::Keep);
        assert!(
            matches!(verdict(1, &run, c(2, 5, true)), Verdict::Stop(r) if r.contains("host 2"))
        );
        assert!(matches!(verdict(1, &run, c(1, 5, true)), Verdict::Stop(r) if r.contains("epoch")));
        assert!(matches!(verdict(1, &run, c(1, 4, false)), Verdict::Stop(_)));
        assert!(matches!(verdict(1, &run, None), Verdict::Stop(_)));
        // Mid-migration VMMs are the migration's business, unless the VM was deleted.
        for s in [VmmState::Migrating, VmmState::AtGate, VmmState::Receiving] {
            assert_eq!(verdict(1, &status(s, 4), c(2, 5, true)), Verdict::Keep);
            assert!(matches!(verdict(1, &status(s, 4), None), Verdict::Stop(_)));
        }
        assert!(matches!(
            verdict(1, &status(VmmState::MigratedAway, 4), c(1, 4, true)),
            Verdict::Stop(_)
        ));
        // A view that has not applied the commit that brought the VM here yet keeps it.
        assert_eq!(verdict(1, &run, c(2, 3, true)), Verdict::Keep);
    }
}
