//! Entitlements under contention: capacity flows down the pool tree; at each level reservations
//! are served first, the rest is shared in proportion to shares (water-filling), and nobody gets
//! more than it wants (demand raised to its reservation, capped by its limit).
use crate::model::{Alloc, PoolAlloc};

#[derive(Debug, Clone, Copy)]
pub(crate) enum Resource {
    Cpu,
    Memory,
}

/// One node of the tree: the root, a pool or a VM.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    parent: Option<usize>,
    reservation: f64,
    limit: f64,
    shares: f64,
    expandable: bool,
    /// Own demand (VMs only); pools derive theirs from children.
    demand: f64,
    is_vm: bool,
    want: f64,
    eff_reservation: f64,
}

impl Node {
    pub(crate) fn root() -> Node {
        Node {
            parent: None,
            reservation: 0.0,
            limit: f64::INFINITY,
            shares: 1.0,
            expandable: true,
            demand: 0.0,
            is_vm: false,
            want: 0.0,
            eff_reservation: 0.0,
        }
    }
    pub(crate) fn pool(parent: usize, a: &PoolAlloc) -> Node {
        Node {
            parent: Some(parent),
            reservation: a.reservation,
            limit: a.limit.unwrap_or(f64::INFINITY),
            shares: a.shares,
            expandable: a.expandable,
            demand: 0.0,
            is_vm: false,
            want: 0.0,
            eff_reservation: 0.0,
        }
    }
    pub(crate) fn vm(parent: usize, a: &Alloc, demand: f64) -> Node {
        Node {
            parent: Some(parent),
            reservation: a.reservation,
            limit: a.limit.unwrap_or(f64::INFINITY),
            shares: a.shares,
            expandable: false,
            demand,
            is_vm: true,
            want: 0.0,
            eff_reservation: 0.0,
        }
    }
}

/// Entitlement of every node when `capacity` is divided from node 0 (the root) down.
pub(crate) fn divvy_tree(nodes: &mut [Node], capacity: f64) -> Vec<f64> {
    let n = nodes.len();
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, node) in nodes.iter().enumerate() {
        if let Some(p) = node.parent {
            children[p].push(i);
        }
    }
    // Breadth-first order from the root; reversed it is a valid bottom-up order.
    let mut order = Vec::with_capacity(n);
    order.push(0);
    let mut k = 0;
    while k < order.len() {
        let i = order[k];
        order.extend_from_slice(&children[i]);
        k += 1;
    }
    for &i in order.iter().rev() {
        let (want, res) = if nodes[i].is_vm {
            let r = nodes[i].reservation.min(nodes[i].limit);
            (nodes[i].demand.max(r).min(nodes[i].limit), r)
        } else {
            let child_want: f64 = children[i].iter().map(|&c| nodes[c].want).sum();
            let child_res: f64 = children[i].iter().map(|&c| nodes[c].eff_reservation).sum();
            let r = if nodes[i].expandable {
                nodes[i].reservation.max(child_res)
            } else {
                nodes[i].reservation
            }
            .min(nodes[i].limit);
            (child_want.max(r).min(nodes[i].limit), r)
        };
        nodes[i].want = want;
        nodes[i].eff_reservation = res;
    }
    let mut ent = vec![0.0; n];
    ent[0] = capacity.min(nodes[0].want);
    for &i in &order {
        if children[i].is_empty() {
            continue;
        }
        let claims: Vec<Claim> = children[i]
            .iter()
            .map(|&c| Claim {
                reservation: nodes[c].eff_reservation,
                want: nodes[c].want,
                shares: nodes[c].shares,
            })
            .collect();
        let got = divvy(ent[i], &claims);
        for (&c, g) in children[i].iter().zip(got) {
            ent[c] = g;
        }
    }
    ent
}

/// What one sibling asks of its parent's entitlement.
#[derive(Debug, Clone, Copy)]
pub struct Claim {
    pub reservation: f64,
    pub want: f64,
    pub shares: f64,
}

/// Divide `capacity` among siblings: reservations first (scaled down if they do not fit), then
/// the rest in proportion to shares, never above a sibling's `want`.
pub fn divvy(capacity: f64, claims: &[Claim]) -> Vec<f64> {
    let total_res: f64 = claims.iter().map(|c| c.reservation.min(c.want)).sum();
    if total_res >= capacity {
        return claims
            .iter()
            .map(|c| {
                if total_res > 0.0 {
                    c.reservation.min(c.want) * capacity / total_res
                } else {
                    0.0
                }
            })
            .collect();
    }
    let mut out: Vec<f64> = claims.iter().map(|c| c.reservation.min(c.want)).collect();
    let mut rest = capacity - total_res;
    // Without contention everyone gets its want (the water-fill below would serve each
    // sibling its whole extra in turn), so skip its O(n log n) sort. A parent that is not
    // contended is entitled to exactly its children's wants, so the sums are compared with
    // slack for the order they were added in.
    let total_extra: f64 = claims.iter().zip(&out).map(|(c, o)| c.want - o).sum();
    if total_extra <= rest * (1.0 + 1e-12) {
        for (o, c) in out.iter_mut().zip(claims) {
            *o += c.want - *o;
        }
        return out;
    }
    // Water-fill: serve the smallest extra-per-share first; whoever is capped frees capacity.
    let mut open: Vec<usize> = (0..claims.len())
        .filter(|&i| claims[i].want > out[i])
        .collect();
    open.sort_by(|&a, &b| {
        let ka = (claims[a].want - out[a]) / claims[a].shares;
        let kb = (claims[b].want - out[b]) / claims[b].shares;
        ka.total_cmp(&kb).then(a.cmp(&b))
    });
    let mut shares: f64 = open.iter().map(|&i| claims[i].shares).sum();
    for (k, &i) in open.iter().enumerate() {
        let extra = claims[i].want - out[i];
        let fair = rest * claims[i].shares / shares;
        if extra <= fair {
            out[i] += extra;
            rest -= extra;
            shares -= claims[i].shares;
        } else {
            // Everyone left is capped by the fair share, not by its want.
            for &j in &open[k..] {
                out[j] += rest * claims[j].shares / shares;
            }
            break;
        }
    }
    out
}
