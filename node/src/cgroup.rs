//! Resource pools enforced by the host: a VM's process (or, while VMs still run inside the
//! node, its vCPU threads) goes into a cgroup of its pool, whose CPU weight, CPU quota and
//! memory limit are the pool's. cgroup v1 (`cpu`, `memory` controllers mounted apart) and v2
//! (the unified hierarchy) are both supported, per controller.
//!
//! Tern only touches cgroups it created: a sub-hierarchy `tern/<node>/<pool>/<vm>` under the
//! node's own cgroup in each hierarchy, created on demand and removed when empty.
//!
//! The settings are an I/O-free function of the limits (`pool_settings`); the rest is the
//! file I/O that applies them.
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use tern_consensus::state::ResourcePool;

use super::sched_view::MHZ_PER_CPU;

/// The pool a VM without one belongs to.
pub const DEFAULT_POOL: &str = "default";
/// Pool shares of a normal pool (`tern pool set` default); maps to the cgroup default weight.
pub const NORMAL_SHARES: u32 = 4000;
/// CFS period used for CPU limits.
const PERIOD_US: u64 = 100_000;
/// Smallest quota the kernel accepts.
const MIN_QUOTA_US: u64 = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup hierarchy with the {0} controller is mounted")]
    NoController(&'static str),
    #[error("{0:?} cannot name a cgroup: use 1-64 of [A-Za-z0-9._-], not starting with a dot")]
    BadName(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cgroup v2 cannot hold single threads of a process; place whole processes")]
    ThreadsOnV2,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the host enforces for one pool.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolLimits {
    pub pool: String,
    /// CPU weight against the other pools on this host (pool shares: 4000 is normal).
    pub shares: u32,
    /// CPU time cap, percent of one host CPU (200: two CPUs' worth).
    pub cpu_limit_percent: Option<f64>,
    pub memory_limit_mib: Option<u64>,
}

impl PoolLimits {
    /// The limits of a committed pool; `None`: the default pool (normal shares, no limits).
    pub fn of_pool(pool: Option<&ResourcePool>) -> Self {
        match pool {
            None => PoolLimits {
                pool: DEFAULT_POOL.into(),
                shares: NORMAL_SHARES,
                cpu_limit_percent: None,
                memory_limit_mib: None,
            },
            Some(p) => PoolLimits {
                pool: p.name.clone(),
                shares: p.shares,
                cpu_limit_percent: p.cpu_limit_mhz.map(|mhz| mhz as f64 / MHZ_PER_CPU * 100.0),
                memory_limit_mib: p.memory_limit_mib,
            },
        }
    }
}

impl PoolLimits {
    /// The limits of the pool VM `vm` is in, as committed.
    pub fn of_vm(state: &tern_consensus::ClusterState, vm: &str) -> Self {
        let pool = state
            .vms
            .get(vm)
            .and_then(|v| v.pool.as_ref())
            .and_then(|p| state.pools.get(p));
        Self::of_pool(pool)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    Cpu,
    Memory,
}

impl Resource {
    fn name(self) -> &'static str {
        match self {
            Resource::Cpu => "cpu",
            Resource::Memory => "memory",
        }
    }
}

/// The CPU weight file and value for pool shares (normal shares: the cgroup default).
fn weight(version: Version, shares: u32) -> (&'static str, String) {
    let shares = u64::from(shares);
    match version {
        Version::V1 => (
            "cpu.shares",
            (shares * 1024 / u64::from(NORMAL_SHARES))
                .clamp(2, 262_144)
                .to_string(),
        ),
        Version::V2 => (
            "cpu.weight",
            (shares * 100 / u64::from(NORMAL_SHARES))
                .clamp(1, 10_000)
                .to_string(),
        ),
    }
}

/// The files of a pool's cgroup and what to write in them, in order, for `limits`.
pub fn pool_settings(
    version: Version,
    limits: &PoolLimits,
) -> Vec<(Resource, &'static str, String)> {
    let quota = limits
        .cpu_limit_percent
        .map(|p| ((p / 100.0 * PERIOD_US as f64) as u64).max(MIN_QUOTA_US));
    let bytes = limits.memory_limit_mib.map(|m| m << 20);
    let (wfile, wvalue) = weight(version, limits.shares);
    match version {
        Version::V1 => vec![
            (Resource::Cpu, wfile, wvalue),
            (Resource::Cpu, "cpu.cfs_period_us", PERIOD_US.to_string()),
            (
                Resource::Cpu,
                "cpu.cfs_quota_us",
                quota.map_or("-1".into(), |q| q.to_string()),
            ),
            (
                Resource::Memory,
                "memory.limit_in_bytes",
                bytes.map_or("-1".into(), |b| b.to_string()),
            ),
        ],
        Version::V2 => vec![
            (Resource::Cpu, wfile, wvalue),
            (
                Resource::Cpu,
                "cpu.max",
                format!(
                    "{} {PERIOD_US}",
                    quota.map_or("max".into(), |q| q.to_string())
                ),
            ),
            (
                Resource::Memory,
                "memory.max",
                bytes.map_or("max".into(), |b| b.to_string()),
            ),
        ],
    }
}

fn valid_name(name: &str) -> Result<(), CgroupError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(CgroupError::BadName(name.to_string()))
    }
}

/// One hierarchy tern uses: its version, the resources it controls, and `.../tern/<node>`.
#[derive(Clone, Debug)]
struct Tree {
    version: Version,
    resources: Vec<Resource>,
    base: PathBuf,
}

/// Mounted cgroup hierarchies from `/proc/mounts`: (v1 controller -> mount point) and the v2
/// mount point.
fn parse_mounts(mounts: &str) -> (Vec<(String, PathBuf)>, Option<PathBuf>) {
    let mut v1 = Vec::new();
    let mut v2 = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [_, point, fstype, options, ..] = f.as_slice() else {
            continue;
        };
        match *fstype {
            "cgroup" => {
                for o in options.split(',') {
                    v1.push((o.to_string(), PathBuf::from(point)));
                }
            }
            "cgroup2" => v2 = Some(PathBuf::from(point)),
            _ => {}
        }
    }
    (v1, v2)
}

/// This process's cgroup path for a v1 controller (`Some(ctrl)`) or in v2 (`None`), from
/// `/proc/self/cgroup`.
fn own_path(proc_cgroup: &str, ctrl: Option<&str>) -> Option<String> {
    proc_cgroup.lines().find_map(|line| {
        let mut f = line.splitn(3, ':');
        let (id, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        let hit = match ctrl {
            Some(c) => ctrls.split(',').any(|x| x == c),
            None => id == "0" && ctrls.is_empty(),
        };
        hit.then(|| path.to_string())
    })
}

fn join_own(mount: &Path, own: &str) -> PathBuf {
    mount.join(own.trim_start_matches('/'))
}

/// The hierarchies for cpu and memory: v1 where the controller is mounted on its own, else v2
/// where the unified hierarchy offers it.
fn find_trees(
    mounts: &str,
    proc_cgroup: &str,
    v2_controllers: impl Fn(&Path) -> String,
    node: &str,
) -> Result<Vec<Tree>, CgroupError> {
    let (v1, v2) = parse_mounts(mounts);
    let mut trees = Vec::new();
    let mut on_v2 = Vec::new();
    for r in [Resource::Cpu, Resource::Memory] {
        let v1_mount = v1.iter().find(|(c, _)| c == r.name()).map(|(_, p)| p);
        match (v1_mount, own_path(proc_cgroup, Some(r.name()))) {
            (Some(mount), Some(own)) => trees.push(Tree {
                version: Version::V1,
                resources: vec![r],
                base: join_own(mount, &own).join("tern").join(node),
            }),
            _ => on_v2.push(r),
        }
    }
    if !on_v2.is_empty() {
        let own = own_path(proc_cgroup, None);
        let (Some(mount), Some(own)) = (v2, own) else {
            return Err(CgroupError::NoController(on_v2[0].name()));
        };
        let offered = v2_controllers(&join_own(&mount, &own));
        if let Some(r) = on_v2
            .iter()
            .find(|r| !offered.split_whitespace().any(|c| c == r.name()))
        {
            return Err(CgroupError::NoController(r.name()));
        }
        trees.push(Tree {
            version: Version::V2,
            resources: on_v2,
            base: join_own(&mount, &own).join("tern").join(node),
        });
    }
    Ok(trees)
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io_err(path))
}

/// Create `dir` (and missing parents up to it); in v2, first let each new level's parent hand
/// down the tree's controllers.
fn ensure_dir(tree: &Tree, dir: &Path) -> Result<(), CgroupError> {
    ensure_dir_retrying(tree, dir, 3)
}

fn ensure_dir_retrying(tree: &Tree, dir: &Path, retries: u32) -> Result<(), CgroupError> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        ensure_dir_retrying(tree, parent, retries)?;
        if tree.version == Version::V2 {
            let enable: Vec<String> = tree
                .resources
                .iter()
                .map(|r| format!("+{}", r.name()))
                .collect();
            write(&parent.join("cgroup.subtree_control"), &enable.join(" "))?;
        }
    }
    match fs::create_dir(dir) {
        // A concurrent sweep removed the (then empty) parent: once more from the top.
        Err(e) if e.kind() == io::ErrorKind::NotFound && retries > 0 => {
            ensure_dir_retrying(tree, dir, retries - 1)
        }
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(io_err(dir)(e)),
        _ => Ok(()),
    }
}

/// How much tern's VMs weigh, as a whole, against everything else on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeWeight {
    /// Like one normal task per vCPU placed: what the vCPU threads weighed outside cgroups.
    PerVcpu,
    /// A fixed weight in pool shares units (4000 is one normal task).
    Fixed(u32),
}

/// This node's cgroups, one tree per hierarchy in use.
#[derive(Clone, Debug)]
pub struct Cgroups {
    trees: Vec<Tree>,
    weight: NodeWeight,
    /// vCPUs of the VMs placed so far and not released.
    vcpus: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

/// The name of node `id`'s sub-hierarchy: unique per data directory (several nodes may share
/// a host), stable across restarts.
pub fn node_name(id: u64, data: &Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data.canonicalize()
        .unwrap_or_else(|_| data.to_path_buf())
        .hash(&mut h);
    format!("node-{id}-{:08x}", h.finish() as u32)
}

/// The hierarchies of this host as seen from this process, for node `node`.
fn host_trees(node: &str) -> Result<Vec<Tree>, CgroupError> {
    let mounts = fs::read_to_string("/proc/mounts").map_err(io_err(Path::new("/proc/mounts")))?;
    let own =
        fs::read_to_string("/proc/self/cgroup").map_err(io_err(Path::new("/proc/self/cgroup")))?;
    find_trees(
        &mounts,
        &own,
        |dir| fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default(),
        node,
    )
}

/// Remove every empty cgroup under tern's sub-hierarchies on this host (left by VMs or nodes
/// that were killed). A cgroup that holds tasks or children stays: the kernel refuses to remove
/// it, so a running VM's cgroup is never touched. Returns how many were removed.
pub fn sweep_empty() -> usize {
    let Ok(trees) = host_trees("sweep") else {
        return 0;
    };
    fn sweep(dir: &Path) -> usize {
        let Ok(entries) = fs::read_dir(dir) else {
            return 0;
        };
        entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| sweep(&e.path()) + usize::from(fs::remove_dir(e.path()).is_ok()))
            .sum()
    }
    trees
        .iter()
        .filter_map(|t| t.base.parent())
        .map(sweep)
        .sum()
}

/// A VM's cgroups (one leaf per hierarchy); `release` removes them once the VM is gone.
#[derive(Debug)]
pub struct VmCgroup {
    leaves: Vec<PathBuf>,
    /// The node's cgroups and this VM's vCPUs, given back on release.
    owner: Option<(Cgroups, u32)>,
}

impl Cgroups {
    /// Find the hierarchies. `node` names this node's sub-hierarchy and must be unique on this
    /// host and stable across restarts of the node. Nothing is created until a VM is placed.
    pub fn open(node: &str, weight: NodeWeight) -> Result<Cgroups, CgroupError> {
        valid_name(node)?;
        let trees = host_trees(node)?;
        Ok(Cgroups {
            trees,
            weight,
            vcpus: Default::default(),
        })
    }

    /// Set the node's CPU weight for the vCPUs placed now, and tern/'s to the sum of its
    /// nodes' (several nodes may share a host).
    fn reweigh(&self) -> Result<(), CgroupError> {
        let vcpus = self.vcpus.load(std::sync::atomic::Ordering::SeqCst);
        let shares = match self.weight {
            NodeWeight::Fixed(s) => s,
            NodeWeight::PerVcpu => NORMAL_SHARES.saturating_mul(vcpus.max(1)),
        };
        for t in self
            .trees
            .iter()
            .filter(|t| t.resources.contains(&Resource::Cpu))
        {
            let (file, value) = weight(t.version, shares);
            if t.base.is_dir() {
                write(&t.base.join(file), &value)?;
            }
            let Some(tern) = t.base.parent() else {
                continue;
            };
            let sum: u64 = fs::read_dir(tern)
                .map_err(io_err(tern))?
                .flatten()
                .filter_map(|e| fs::read_to_string(e.path().join(file)).ok())
                .filter_map(|v| v.trim().parse::<u64>().ok())
                .sum();
            let max = if t.version == Version::V1 {
                262_144
            } else {
                10_000
            };
            write(&tern.join(file), &sum.clamp(1, max).to_string())?;
        }
        Ok(())
    }

    /// The cgroup directories of pool `pool` (one per hierarchy).
    pub fn pool_dirs(&self, pool: &str) -> Vec<PathBuf> {
        self.trees.iter().map(|t| t.base.join(pool)).collect()
    }

    /// Create the pool's and the VM's cgroups and apply the pool's limits.
    fn prepare(&self, vm: &str, limits: &PoolLimits) -> Result<Vec<(&Tree, PathBuf)>, CgroupError> {
        valid_name(vm)?;
        valid_name(&limits.pool)?;
        let mut leaves = Vec::new();
        for t in &self.trees {
            let pool_dir = t.base.join(&limits.pool);
            let leaf = pool_dir.join(vm);
            ensure_dir(t, &leaf)?;
            for (r, file, value) in pool_settings(t.version, limits) {
                if t.resources.contains(&r) {
                    write(&pool_dir.join(file), &value)?;
                }
            }
            leaves.push((t, leaf));
        }
        Ok(leaves)
    }

    /// Put process `pid` (a VM's process, with `vcpus` vCPUs) in its pool's cgroups with the
    /// pool's limits. This is what the node calls for each VMM process it starts.
    pub fn place(
        &self,
        vm: &str,
        pid: u32,
        vcpus: u32,
        limits: &PoolLimits,
    ) -> Result<VmCgroup, CgroupError> {
        let leaves = self.prepare(vm, limits)?;
        let placed = self.placed(leaves.iter().map(|(_, l)| l.clone()).collect(), vcpus)?;
        for leaf in &placed.leaves {
            write(&leaf.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(placed)
    }

    /// Count the VM's vCPUs in the node's weight; the handle gives them back.
    fn placed(&self, leaves: Vec<PathBuf>, vcpus: u32) -> Result<VmCgroup, CgroupError> {
        self.vcpus
            .fetch_add(vcpus, std::sync::atomic::Ordering::SeqCst);
        let placed = VmCgroup {
            leaves,
            owner: Some((self.clone(), vcpus)),
        };
        self.reweigh()?;
        Ok(placed)
    }

    /// Put threads `tids` of this process (a VM's vCPU threads, while VMs run inside the node)
    /// in their pool's CPU cgroup. Memory is charged per process, so only CPU applies; cgroup
    /// v2 holds whole processes only.
    pub fn place_threads(
        &self,
        vm: &str,
        tids: &[i32],
        limits: &PoolLimits,
    ) -> Result<VmCgroup, CgroupError> {
        let cpu = self
            .trees
            .iter()
            .find(|t| t.resources.contains(&Resource::Cpu))
            .ok_or(CgroupError::NoController("cpu"))?;
        if cpu.version == Version::V2 {
            return Err(CgroupError::ThreadsOnV2);
        }
        let only_cpu = Cgroups {
            trees: vec![cpu.clone()],
            ..self.clone()
        };
        let leaves = only_cpu.prepare(vm, limits)?;
        let placed = only_cpu.placed(
            leaves.iter().map(|(_, l)| l.clone()).collect(),
            tids.len() as u32,
        )?;
        for leaf in &placed.leaves {
            for tid in tids {
                write(&leaf.join("tasks"), &tid.to_string())?;
            }
        }
        Ok(placed)
    }
}

/// Run `spawn` (which creates a VM inside this process) and return with it the ids of the
/// vCPU threads it started. Spawns are serialized so that each sees only its own threads.
pub fn with_new_vcpu_threads<T>(spawn: impl FnOnce() -> T) -> (T, Vec<i32>) {
    static SPAWNING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = SPAWNING.lock().unwrap_or_else(|p| p.into_inner());
    let before = vcpu_threads();
    let out = spawn();
    let new = vcpu_threads()
        .into_iter()
        .filter(|t| !before.contains(t))
        .collect();
    (out, new)
}

/// Threads of this process named `vcpuN` (the hypervisor names its vCPU threads so).
fn vcpu_threads() -> Vec<i32> {
    let Ok(tasks) = fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter(|t| fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("vcpu")))
        .filter_map(|t| t.file_name().to_str()?.parse().ok())
        .collect()
}

impl VmCgroup {
    /// The VM's cgroup directories (one per hierarchy).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.leaves
    }

    /// Remove the VM's cgroups, then its pool's and the node's where now empty (`tern/` itself,
    /// shared by the nodes of this host, stays). Call once the VM's process (or threads) has
    /// exited: the kernel refuses to remove a cgroup that still holds tasks.
    pub fn release(mut self) -> Result<(), CgroupError> {
        self.remove()
    }

    fn remove(&mut self) -> Result<(), CgroupError> {
        let mut first_error = None;
        for leaf in std::mem::take(&mut self.leaves) {
            if let Err(e) = fs::remove_dir(&leaf) {
                first_error.get_or_insert(io_err(&leaf)(e));
                continue;
            }
            // Pool, then node: each goes only if nothing else is left in it.
            for dir in leaf.ancestors().skip(1).take(2) {
                if fs::remove_dir(dir).is_err() {
                    break;
                }
            }
        }
        if let Some((cgroups, vcpus)) = self.owner.take() {
            cgroups
                .vcpus
                .fetch_sub(vcpus, std::sync::atomic::Ordering::SeqCst);
            cgroups.reweigh()?;
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Best effort, for a VM dropped without `release` (its tasks must be gone by then).
impl Drop for VmCgroup {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(shares: u32, cpu: Option<f64>, mem: Option<u64>) -> PoolLimits {
        PoolLimits {
            pool: "p".into(),
            shares,
            cpu_limit_percent: cpu,
            memory_limit_mib: mem,
        }
    }

    #[test]
    fn settings_map_shares_quota_and_memory_for_both_versions() {
        let l = limits(12_000, Some(20.0), Some(256));
        assert_eq!(
            pool_settings(Version::V1, &l),
            vec![
                (Resource::Cpu, "cpu.shares", "3072".to_string()),
                (Resource::Cpu, "cpu.cfs_period_us", "100000".to_string()),
                (Resource::Cpu, "cpu.cfs_quota_us", "20000".to_string()),
                (
                    Resource::Memory,
                    "memory.limit_in_bytes",
                    (256u64 << 20).to_string()
                ),
            ]
        );
        assert_eq!(
            pool_settings(Version::V2, &l),
            vec![
                (Resource::Cpu, "cpu.weight", "300".to_string()),
                (Resource::Cpu, "cpu.max", "20000 100000".to_string()),
                (Resource::Memory, "memory.max", (256u64 << 20).to_string()),
            ]
        );
        let free = limits(NORMAL_SHARES, None, None);
        let v1 = pool_settings(Version::V1, &free);
        assert_eq!(v1[0].2, "1024");
        assert_eq!(v1[2].2, "-1");
        assert_eq!(v1[3].2, "-1");
        let v2 = pool_settings(Version::V2, &free);
        assert_eq!(v2[0].2, "100");
        assert_eq!(v2[1].2, "max 100000");
        assert_eq!(v2[2].2, "max");
        // Extremes stay within what the kernel accepts.
        assert_eq!(
            pool_settings(Version::V1, &limits(1, Some(0.01), None))[0].2,
            "2"
        );
        assert_eq!(
            pool_settings(Version::V1, &limits(1, Some(0.01), None))[2].2,
            "1000"
        );
        assert_eq!(
            pool_settings(Version::V2, &limits(u32::MAX, None, None))[0].2,
            "10000"
        );
    }

    #[test]
    fn pool_mhz_limit_becomes_percent_of_a_cpu() {
        let pool = ResourcePool {
            name: "gold".into(),
            cpu_reservation_mhz: 0,
            cpu_limit_mhz: Some(400),
            memory_reservation_mib: 0,
            memory_limit_mib: Some(512),
            shares: 8000,
        };
        let l = PoolLimits::of_pool(Some(&pool));
        assert_eq!(l.cpu_limit_percent, Some(400.0 / MHZ_PER_CPU * 100.0));
        assert_eq!(l.memory_limit_mib, Some(512));
        assert_eq!(PoolLimits::of_pool(None).pool, DEFAULT_POOL);
    }

    const V1_MOUNTS: &str = "tmpfs /sys/fs/cgroup tmpfs rw 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";
    const V1_SELF: &str = "4:memory:/process_api/abc\n2:cpuacct:/\n1:cpu:/\n0::/\n";

    #[test]
    fn v1_controllers_win_and_nest_under_our_own_cgroup() {
        let trees = find_trees(V1_MOUNTS, V1_SELF, |_| String::new(), "n1").unwrap();
        assert_eq!(trees.len(), 2);
        assert_eq!(trees[0].version, Version::V1);
        assert_eq!(trees[0].base, Path::new("/sys/fs/cgroup/cpu/tern/n1"));
        assert_eq!(
            trees[1].base,
            Path::new("/sys/fs/cgroup/memory/process_api/abc/tern/n1")
        );
    }

    #[test]
    fn pure_v2_uses_the_unified_tree_when_it_offers_the_controllers() {
        let mounts = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n";
        let own = "0::/system.slice/tern.service\n";
        let trees = find_trees(mounts, own, |_| "cpuset cpu io memory pids".into(), "n1").unwrap();
        assert_eq!(trees.len(), 1);
        assert_eq!(trees[0].version, Version::V2);
        assert_eq!(trees[0].resources, [Resource::Cpu, Resource::Memory]);
        assert_eq!(
            trees[0].base,
            Path::new("/sys/fs/cgroup/system.slice/tern.service/tern/n1")
        );
        let err = find_trees(mounts, own, |_| "cpu pids".into(), "n1").unwrap_err();
        assert!(matches!(err, CgroupError::NoController("memory")), "{err}");
    }

    #[test]
    fn names_that_could_escape_the_tree_are_refused() {
        for bad in ["", "..", "a/b", ".x", "../../etc"] {
            assert!(valid_name(bad).is_err(), "{bad:?}");
        }
        assert!(valid_name("gold-1.a_b").is_ok());
    }
}
