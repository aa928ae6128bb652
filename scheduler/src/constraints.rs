//! Hard constraints (never violated by a move) and soft preferences (`should` rules).
use crate::cluster::RuleIx;
use crate::load::LoadState;
use crate::model::{HostRuleMode, HostState};

/// Can VM `v` leave its host at all? The reason if not.
pub(crate) fn movable(s: &LoadState, v: usize) -> Result<(), String> {
    let c = s.c;
    let vm = &c.snap.vms[v];
    if vm.do_not_migrate {
        return Err("marked do-not-migrate".into());
    }
    if let Some(t) = c.in_flight_to[v] {
        return Err(format!("already migrating to {}", c.snap.hosts[t].id));
    }
    let h = &c.snap.hosts[s.vm_host[v]];
    if h.state == HostState::Down {
        return Err(format!(
            "its host {} is down (a restart, not a migration)",
            h.id
        ));
    }
    Ok(())
}

/// Would VM `v` be allowed on host `to`? `with` are VMs moving there together with it.
/// Returns every reason it is not (empty = allowed).
pub(crate) fn violations(s: &LoadState, v: usize, to: usize, with: &[usize]) -> Vec<String> {
    let c = s.c;
    let host = &c.snap.hosts[to];
    let vm = &c.snap.vms[v];
    let mut why = Vec::new();
    if host.state != HostState::Connected {
        why.push(format!("host is {}", host.state.as_str()));
    }
    if s.vm_host[v] == to {
        why.push("the VM already runs here".into());
    }
    let missing: Vec<&str> = vm
        .cpu_baseline
        .iter()
        .filter(|f| !host.cpu_features.contains(*f))
        .map(|f| f.as_str())
        .collect();
    if !missing.is_empty() {
        why.push(format!(
            "CPU lacks features the VM started with: {}",
            missing.join(",")
        ));
    }
    // Others moving along with v claim room on `to` too.
    let others = || with.iter().filter(move |&&w| w != v);
    let group_mem: f64 = others().map(|&w| c.mem_ent[w]).sum();
    let group_res: f64 = others().map(|&w| c.snap.vms[w].cpu.reservation).sum();
    let free_mem = host.memory_mib - s.mem[to] - group_mem;
    if c.mem_ent[v] > free_mem + 1e-6 {
        why.push(format!(
            "memory: needs {:.0} MiB, {:.0} MiB free",
            c.mem_ent[v],
            free_mem.max(0.0)
        ));
    }
    let free_res = host.cpu_mhz - s.cpu_res[to] - group_res;
    if vm.cpu.reservation > free_res + 1e-6 {
        why.push(format!(
            "CPU reservation: needs {:.0} MHz, {:.0} MHz unreserved",
            vm.cpu.reservation,
            free_res.max(0.0)
        ));
    }
    for &r in &c.vm_rules[v] {
        let id = c.snap.rules[r].id();
        match &c.rules[r] {
            RuleIx::VmHost { group, mode } if mode.is_must() => {
                let inside = c.group_has[*group][to];
                let gid = &c.snap.host_groups[*group].id;
                if inside != mode.wants_in_group() {
                    let verb = if inside {
                        "must not run on"
                    } else {
                        "must run on"
                    };
                    why.push(format!("rule {id}: {verb} host group {gid}"));
                }
            }
            RuleIx::VmHost { .. } => {}
            RuleIx::Separate(vms) => {
                for &o in vms {
                    if o != v && !with.contains(&o) && s.vm_host[o] == to {
                        why.push(format!(
                            "rule {id}: must be apart from vm {}",
                            c.snap.vms[o].id
                        ));
                    }
                }
            }
            RuleIx::KeepTogether(vms) => {
                for &o in vms {
                    if o != v && !with.contains(&o) && s.vm_host[o] != to {
                        why.push(format!("rule {id}: must stay with vm {}", c.snap.vms[o].id));
                        break;
                    }
                }
            }
        }
    }
    why
}

/// `should` rules VM `v` would break on host `to`.
pub(crate) fn soft_violations(s: &LoadState, v: usize, to: usize) -> Vec<String> {
    let c = s.c;
    let mut out = Vec::new();
    for &r in &c.vm_rules[v] {
        if let RuleIx::VmHost { group, mode } = &c.rules[r] {
            if mode.is_must() {
                continue;
            }
            let inside = c.group_has[*group][to];
            if inside != mode.wants_in_group() {
                let verb = if *mode == HostRuleMode::ShouldRunOn {
                    "should run on"
                } else {
                    "should not run on"
                };
                out.push(format!(
                    "rule {}: {verb} host group {}",
                    c.snap.rules[r].id(),
                    c.snap.host_groups[*group].id
                ));
            }
        }
    }
    out
}

/// Does VM `v` break a rule where it runs now? (hard, reason) for each.
pub(crate) fn current_rule_breaks(s: &LoadState, v: usize) -> Vec<(bool, String)> {
    let c = s.c;
    let here = s.vm_host[v];
    let mut out = Vec::new();
    for &r in &c.vm_rules[v] {
        let id = c.snap.rules[r].id();
        match &c.rules[r] {
            RuleIx::VmHost { group, mode } => {
                if c.group_has[*group][here] != mode.wants_in_group() {
                    let gid = &c.snap.host_groups[*group].id;
                    let verb = match mode {
                        HostRuleMode::MustRunOn => "must run on",
                        HostRuleMode::ShouldRunOn => "should run on",
                        HostRuleMode::MustNotRunOn => "must not run on",
                        HostRuleMode::ShouldNotRunOn => "should not run on",
                    };
                    out.push((
                        mode.is_must(),
                        format!("rule {id}: {verb} host group {gid}"),
                    ));
                }
            }
            RuleIx::Separate(vms) => {
                // The later-listed VM of a clashing pair is the one that moves.
                let pos = vms.iter().position(|&x| x == v).unwrap_or(0);
                if let Some(&o) = vms[..pos].iter().find(|&&o| s.vm_host[o] == here) {
                    out.push((
                        true,
                        format!("rule {id}: shares a host with vm {}", c.snap.vms[o].id),
                    ));
                }
            }
            RuleIx::KeepTogether(_) => {}
        }
    }
    out
}
