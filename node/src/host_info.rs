//! What this host offers: CPUs, memory, CPU feature flags (from /proc; empty if unreadable).
use tern_consensus::state::Capacity;

pub struct HostInfo {
    pub capacity: Capacity,
    pub cpu_features: Vec<String>,
}

pub fn probe() -> HostInfo {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let memory_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024);
    let mut cpu_features: Vec<String> = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("flags"))
                .and_then(|l| l.split(':').nth(1))
                .map(|f| f.split_whitespace().map(str::to_string).collect())
        })
        .unwrap_or_default();
    cpu_features.sort();
    HostInfo {
        capacity: Capacity { cpus, memory_mib },
        cpu_features,
    }
}
