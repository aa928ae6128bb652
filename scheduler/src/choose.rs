//! Picking a destination for VMs that must move: the legal host that leaves the cluster most
//! balanced (so an evacuation spreads its VMs instead of piling them onto one host).
use crate::constraints::{soft_violations, violations};
use crate::load::LoadState;
use std::collections::BTreeMap;

/// Score penalty per broken `should` rule: a preference outweighs a modest imbalance gain.
pub(crate) const SOFT_PENALTY: f64 = 0.1;

/// Best host for `group` (moving together from their current host), or why none fits.
pub(crate) fn best_host(s: &LoadState, group: &[usize]) -> Result<usize, String> {
    let c = s.c;
    let from = s.vm_host[group[0]];
    let dc: f64 = group.iter().map(|&v| c.cpu_ent[v]).sum();
    let dm: f64 = group.iter().map(|&v| c.mem_ent[v]).sum();
    let has_rules = group.iter().any(|&v| !c.vm_rules[v].is_empty());
    let mut scored: Vec<(f64, usize)> = (0..c.snap.hosts.len())
        .filter(|&h| s.usable(h) && h != from)
        .map(|h| {
            let mut score = s.imbalance_if(dc, dm, Some(from), h);
            if has_rules {
                let soft: usize = group.iter().map(|&v| soft_violations(s, v, h).len()).sum();
                score += SOFT_PENALTY * soft as f64;
            }
            (score, h)
        })
        .collect();
    scored.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    for &(_, h) in &scored {
        if group.iter().all(|&v| violations(s, v, h, group).is_empty()) {
            return Ok(h);
        }
    }
    Err(explain_no_host(s, group))
}

/// "no host fits: 12 hosts: memory ...; 3 hosts: rule r1 ..." (most common reasons first).
pub(crate) fn explain_no_host(s: &LoadState, group: &[usize]) -> String {
    let c = s.c;
    let from = s.vm_host[group[0]];
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for h in 0..c.snap.hosts.len() {
        if h == from {
            continue;
        }
        let first = group
            .iter()
            .find_map(|&v| violations(s, v, h, group).into_iter().next());
        if let Some(r) = first {
            // Numbers differ per host; group reasons by their wording before the first digit.
            let key = r
                .split(|ch: char| ch.is_ascii_digit())
                .next()
                .unwrap_or(&r)
                .trim_end()
                .to_string();
            *counts.entry(key).or_default() += 1;
        }
    }
    if counts.is_empty() {
        return "no other host in the cluster".into();
    }
    let mut v: Vec<(String, usize)> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let parts: Vec<String> = v
        .iter()
        .take(4)
        .map(|(r, n)| format!("{n} host(s): {r}"))
        .collect();
    format!("no host fits ({})", parts.join("; "))
}
