//! One DRS pass: mandatory moves first (maintenance, hard rules, overcommit), then `should`
//! rules, then greedy load balancing with a cost-benefit filter.
use crate::choose::best_host;
use crate::cluster::{Cluster, RuleIx};
use crate::constraints::{current_rule_breaks, movable, soft_violations, violations};
use crate::evacuate::{evacuate_into, make_move, together_on};
use crate::load::LoadState;
use crate::model::HostState;
use crate::plan::{balance_priority, Config, Move, MoveKind, Plan, Unresolved};
use crate::SchedError;

/// Hosts considered per resource at each end of the load order in one greedy step.
const CANDIDATE_HOSTS: usize = 3;

/// Plan one balancing pass over `cluster`.
pub fn balance(cluster: &Cluster, cfg: &Config) -> Result<Plan, SchedError> {
    cfg.validate()?;
    let mut s = LoadState::new(cluster);
    let before = s.imbalance();
    let mut moves = Vec::new();
    let mut unresolved = Vec::new();
    mandatory(&mut s, cfg, &mut moves, &mut unresolved);
    preferences(&mut s, cfg, &mut moves);
    let stop = balance_loop(&mut s, cfg, &mut moves);
    Ok(Plan {
        threshold: cfg.threshold,
        target_imbalance: cfg.target_imbalance(),
        imbalance_before: before,
        imbalance_after: s.imbalance(),
        moves,
        unresolved,
        stop_reason: stop,
    })
}

fn mandatory(
    s: &mut LoadState,
    cfg: &Config,
    moves: &mut Vec<Move>,
    unresolved: &mut Vec<Unresolved>,
) {
    let c = s.c;
    for h in 0..c.snap.hosts.len() {
        if c.snap.hosts[h].state == HostState::EnteringMaintenance {
            let (m, u) = evacuate_into(s, h, cfg, MoveKind::Maintenance);
            moves.extend(m);
            unresolved.extend(u);
        }
    }
    // Hard rules broken where a VM runs now.
    for v in 0..c.snap.vms.len() {
        if !s.usable(s.vm_host[v]) {
            continue;
        }
        let hard: Vec<String> = current_rule_breaks(s, v)
            .into_iter()
            .filter(|b| b.0)
            .map(|b| b.1)
            .collect();
        if hard.is_empty() {
            continue;
        }
        fix(
            s,
            cfg,
            v,
            &[v],
            MoveKind::RuleViolation,
            hard.join("; "),
            moves,
            unresolved,
        );
    }
    // Keep-together rules split across hosts: gather on the host holding most members.
    for (r, rule) in c.rules.iter().enumerate() {
        let RuleIx::KeepTogether(members) = rule else {
            continue;
        };
        let mut count: Vec<(usize, usize)> = Vec::new();
        for &m in members {
            let h = s.vm_host[m];
            match count.iter_mut().find(|e| e.0 == h) {
                Some(e) => e.1 += 1,
                None => count.push((h, 1)),
            }
        }
        if count.len() < 2 {
            continue;
        }
        count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let target = count[0].0;
        let id = c.snap.rules[r].id();
        for &m in members {
            if s.vm_host[m] == target {
                continue;
            }
            let reason = format!(
                "rule {id}: must run with the other members on {}",
                c.snap.hosts[target].id
            );
            let why = movable(s, m).err().or_else(|| {
                let v = violations(s, m, target, members);
                (!v.is_empty()).then(|| v.join("; "))
            });
            match why {
                None => moves.push(make_move(
                    s,
                    m,
                    target,
                    1,
                    MoveKind::RuleViolation,
                    reason,
                    cfg,
                )),
                Some(w) => unresolved.push(Unresolved {
                    vm: c.snap.vms[m].id.clone(),
                    host: c.snap.hosts[s.vm_host[m]].id.clone(),
                    reason: format!("{reason}, but cannot: {w}"),
                }),
            }
        }
    }
    // Hosts whose memory or CPU reservations exceed capacity: shed smallest VMs that fix it.
    for h in 0..c.snap.hosts.len() {
        if !s.usable(h) {
            continue;
        }
        let host = &c.snap.hosts[h];
        let over =
            |s: &LoadState| s.mem[h] > host.memory_mib + 1e-6 || s.cpu_res[h] > host.cpu_mhz + 1e-6;
        if !over(s) {
            continue;
        }
        let mut vms = s.host_vms[h].clone();
        vms.sort_by(|&a, &b| c.mem_ent[b].total_cmp(&c.mem_ent[a]).then(a.cmp(&b)));
        for v in vms {
            if !over(s) {
                break;
            }
            if movable(s, v).is_err() {
                continue;
            }
            let group = together_on(s, v, h);
            if group.len() > 1 {
                continue;
            }
            let reason = format!(
                "host {} over capacity: memory {:.0}/{:.0} MiB, CPU reserved {:.0}/{:.0} MHz",
                host.id, s.mem[h], host.memory_mib, s.cpu_res[h], host.cpu_mhz
            );
            if let Ok(to) = best_host(s, &group) {
                moves.push(make_move(s, v, to, 1, MoveKind::Overcommit, reason, cfg));
            }
        }
        if over(s) {
            unresolved.push(Unresolved {
                vm: String::new(),
                host: host.id.clone(),
                reason: "host stays over capacity: no VM on it can move to a host with room".into(),
            });
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn fix(
    s: &mut LoadState,
    cfg: &Config,
    v: usize,
    group: &[usize],
    kind: MoveKind,
    reason: String,
    moves: &mut Vec<Move>,
    unresolved: &mut Vec<Unresolved>,
) {
    let c = s.c;
    let host = c.snap.hosts[s.vm_host[v]].id.clone();
    if let Err(why) = movable(s, v) {
        unresolved.push(Unresolved {
            vm: c.snap.vms[v].id.clone(),
            host,
            reason: format!("{reason}, but {why}"),
        });
        return;
    }
    match best_host(s, group) {
        Ok(to) => moves.push(make_move(s, v, to, 1, kind, reason, cfg)),
        Err(why) => unresolved.push(Unresolved {
            vm: c.snap.vms[v].id.clone(),
            host,
            reason: format!("{reason}, but {why}"),
        }),
    }
}

/// `should` rules: move a VM only to a host where it breaks none (priority 2).
fn preferences(s: &mut LoadState, cfg: &Config, moves: &mut Vec<Move>) {
    let c = s.c;
    if cfg.threshold < 2 {
        return;
    }
    for v in 0..c.snap.vms.len() {
        if moves.len() >= cfg.max_moves {
            return;
        }
        if c.vm_rules[v].is_empty() || !s.usable(s.vm_host[v]) || movable(s, v).is_err() {
            continue;
        }
        let vm = &c.snap.vms[v];
        if cfg
            .migration_secs(vm.memory_mib, vm.dirty_rate_mib_s)
            .is_none()
        {
            continue;
        }
        let soft = soft_violations(s, v, s.vm_host[v]);
        if soft.is_empty() || together_on(s, v, s.vm_host[v]).len() > 1 {
            continue;
        }
        if let Ok(to) = best_host(s, &[v]) {
            if soft_violations(s, v, to).is_empty() {
                moves.push(make_move(
                    s,
                    v,
                    to,
                    2,
                    MoveKind::Preference,
                    soft.join("; "),
                    cfg,
                ));
            }
        }
    }
}

/// Greedy balancing: each step takes the best-scoring legal move among the VMs of the most
/// loaded hosts towards the least loaded ones, until the target is met or no move pays.
fn balance_loop(s: &mut LoadState, cfg: &Config, moves: &mut Vec<Move>) -> String {
    let c = s.c;
    let Some(target) = cfg.target_imbalance() else {
        return "threshold 1: mandatory moves only".into();
    };
    let nh = c.snap.hosts.len();
    let mut per_host = vec![0usize; nh];
    let mut hosts: Vec<usize> = (0..nh).filter(|&h| s.usable(h)).collect();
    loop {
        let cur = s.imbalance();
        if cur <= target {
            return format!("imbalance {cur:.4} is at or below the target {target:.4}");
        }
        if moves.len() >= cfg.max_moves {
            return format!("reached the limit of {} moves per pass", cfg.max_moves);
        }
        hosts.retain(|&h| per_host[h] < cfg.max_moves_per_host);
        if hosts.len() < 2 {
            return "every host reached its move limit".into();
        }
        let sources = extremes(s, &hosts, true);
        let dests = extremes(s, &hosts, false);
        let mut best: Option<(f64, f64, usize, usize)> = None; // (net, after, vm, to)
        for &src in &sources {
            for &v in &s.host_vms[src] {
                let vm = &c.snap.vms[v];
                if c.in_flight_to[v].is_some() || vm.do_not_migrate {
                    continue;
                }
                if let Some(t) = vm.last_migrated_s {
                    if c.snap.now_s - t < cfg.cooldown_s {
                        continue;
                    }
                }
                let Some(secs) = cfg.migration_secs(vm.memory_mib, vm.dirty_rate_mib_s) else {
                    continue;
                };
                let cost = cfg.move_cost(secs);
                for &d in &dests {
                    if d == src {
                        continue;
                    }
                    let after = s.imbalance_if(c.cpu_ent[v], c.mem_ent[v], Some(src), d);
                    let gain = cur - after;
                    let net = gain - cost;
                    if gain <= 1e-9 || net <= 0.0 || balance_priority(gain) > cfg.threshold {
                        continue;
                    }
                    let better = match best {
                        None => true,
                        Some((bn, _, bv, bd)) => net > bn || (net == bn && (v, d) < (bv, bd)),
                    };
                    if better
                        && violations(s, v, d, &[]).is_empty()
                        && soft_violations(s, v, d).len() <= soft_violations(s, v, src).len()
                    {
                        best = Some((net, after, v, d));
                    }
                }
            }
        }
        let Some((_, after, v, d)) = best else {
            return format!(
                "no legal move gains more than it costs (imbalance {cur:.4}, target {target:.4})"
            );
        };
        let src = s.vm_host[v];
        let gain = cur - after;
        let reason = format!(
            "balance: {} load {:.0}% -> {} load {:.0}%",
            c.snap.hosts[src].id,
            100.0 * s.load(src),
            c.snap.hosts[d].id,
            100.0 * s.load(d)
        );
        moves.push(make_move(
            s,
            v,
            d,
            balance_priority(gain),
            MoveKind::Balance,
            reason,
            cfg,
        ));
        per_host[src] += 1;
        per_host[d] += 1;
    }
}

/// The most (or least) loaded hosts by CPU, by memory and combined: a handful of candidates.
fn extremes(s: &LoadState, hosts: &[usize], top: bool) -> Vec<usize> {
    let k = CANDIDATE_HOSTS.min(hosts.len());
    let mut out: Vec<usize> = Vec::with_capacity(3 * k);
    let keys: [&dyn Fn(usize) -> f64; 3] = [&|h| s.load_cpu(h), &|h| s.load_mem(h), &|h| s.load(h)];
    let mut buf = hosts.to_vec();
    for key in keys {
        let cmp = |a: &usize, b: &usize| {
            let o = key(*a).total_cmp(&key(*b)).then(a.cmp(b));
            if top {
                o.reverse()
            } else {
                o
            }
        };
        if k < buf.len() {
            buf.select_nth_unstable_by(k - 1, cmp);
        }
        let mut first: Vec<usize> = buf[..k].to_vec();
        first.sort_by(cmp);
        for h in first {
            if !out.contains(&h) {
                out.push(h);
            }
        }
    }
    out
}
