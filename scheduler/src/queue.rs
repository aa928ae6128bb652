//! The migration queue: slots per source host (outbound), per destination (inbound) and per
//! cluster. High priority reserves its slots at both ends at once or is refused with the reason;
//! normal and low wait and start in priority order; one source never holds every cluster slot.
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueuePriority {
    High,
    Normal,
    Low,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotLimits {
    pub per_source: usize,
    pub per_destination: usize,
    pub per_cluster: usize,
}

impl Default for SlotLimits {
    /// vMotion-like defaults for 10 GbE hosts.
    fn default() -> Self {
        SlotLimits {
            per_source: 4,
            per_destination: 4,
            per_cluster: 16,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    pub vm: String,
    pub from: String,
    pub to: String,
    pub priority: QueuePriority,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Slots are held: start the migration now.
    Started,
    /// Waiting for slots.
    Queued,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum QueueError {
    #[error("high-priority migration of {vm} refused: {reason}")]
    Refused { vm: String, reason: String },
    #[error("request id {0} is already known")]
    DuplicateId(u64),
    #[error("request id {0} is not running")]
    NotRunning(u64),
    #[error("invalid slot limits: {0}")]
    BadLimits(String),
    #[error("vm {0} is already queued or migrating")]
    VmBusy(String),
}

#[derive(Debug, Clone)]
pub struct MigrationQueue {
    limits: SlotLimits,
    running: Vec<Request>,
    waiting: Vec<(u64, Request)>,
    seq: u64,
    out: HashMap<String, usize>,
    inb: HashMap<String, usize>,
}

impl MigrationQueue {
    pub fn new(limits: SlotLimits) -> Result<MigrationQueue, QueueError> {
        if limits.per_source == 0 || limits.per_destination == 0 || limits.per_cluster == 0 {
            return Err(QueueError::BadLimits(
                "every limit must be at least 1".into(),
            ));
        }
        Ok(MigrationQueue {
            limits,
            running: Vec::new(),
            waiting: Vec::new(),
            seq: 0,
            out: HashMap::new(),
            inb: HashMap::new(),
        })
    }

    pub fn limits(&self) -> SlotLimits {
        self.limits
    }

    /// Outbound slots one source may hold: never the whole cluster's, so an evacuation leaves
    /// room for other hosts' migrations.
    pub fn source_cap(&self) -> usize {
        let cluster_share = if self.limits.per_cluster > 1 {
            self.limits.per_cluster - 1
        } else {
            1
        };
        self.limits.per_source.min(cluster_share)
    }

    /// Why `r` cannot start now, if it cannot.
    fn blocked(&self, r: &Request) -> Option<String> {
        let out = self.out.get(&r.from).copied().unwrap_or(0);
        let inb = self.inb.get(&r.to).copied().unwrap_or(0);
        if self.running.len() >= self.limits.per_cluster {
            Some(format!(
                "all {} cluster migration slots are busy",
                self.limits.per_cluster
            ))
        } else if out >= self.source_cap() {
            Some(format!(
                "source {} has no free outbound slot ({out} in use)",
                r.from
            ))
        } else if inb >= self.limits.per_destination {
            Some(format!(
                "destination {} has no free inbound slot ({inb} in use)",
                r.to
            ))
        } else {
            None
        }
    }

    /// Submit a migration. High priority starts now or is refused; others start or wait.
    pub fn submit(&mut self, r: Request) -> Result<Admission, QueueError> {
        if self
            .running
            .iter()
            .chain(self.waiting.iter().map(|w| &w.1))
            .any(|x| x.id == r.id)
        {
            return Err(QueueError::DuplicateId(r.id));
        }
        if self
            .running
            .iter()
            .chain(self.waiting.iter().map(|w| &w.1))
            .any(|x| x.vm == r.vm)
        {
            return Err(QueueError::VmBusy(r.vm));
        }
        match self.blocked(&r) {
            None if r.priority == QueuePriority::High || !self.has_waiting_before(r.priority) => {
                self.start(r);
                Ok(Admission::Started)
            }
            Some(reason) if r.priority == QueuePriority::High => {
                Err(QueueError::Refused { vm: r.vm, reason })
            }
            _ => {
                self.seq += 1;
                self.waiting.push((self.seq, r));
                self.dispatch();
                Ok(Admission::Queued)
            }
        }
    }

    fn has_waiting_before(&self, p: QueuePriority) -> bool {
        self.waiting
            .iter()
            .any(|w| w.1.priority <= p && self.blocked(&w.1).is_none())
    }

    fn start(&mut self, r: Request) {
        *self.out.entry(r.from.clone()).or_default() += 1;
        *self.inb.entry(r.to.clone()).or_default() += 1;
        self.running.push(r);
    }

    /// A running migration ended (success or failure): free its slots and start what fits.
    /// Returns the requests started as a result, in start order.
    pub fn finish(&mut self, id: u64) -> Result<Vec<Request>, QueueError> {
        let pos = self
            .running
            .iter()
            .position(|r| r.id == id)
            .ok_or(QueueError::NotRunning(id))?;
        let r = self.running.swap_remove(pos);
        for (map, key) in [(&mut self.out, &r.from), (&mut self.inb, &r.to)] {
            if let Some(n) = map.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(key);
                }
            }
        }
        Ok(self.dispatch())
    }

    /// Start waiting requests in (priority, arrival) order wherever their slots are free.
    fn dispatch(&mut self) -> Vec<Request> {
        self.waiting
            .sort_by(|a, b| a.1.priority.cmp(&b.1.priority).then(a.0.cmp(&b.0)));
        let mut started = Vec::new();
        let mut k = 0;
        while k < self.waiting.len() {
            if self.blocked(&self.waiting[k].1).is_none() {
                let (_, r) = self.waiting.remove(k);
                self.start(r.clone());
                started.push(r);
            } else {
                k += 1;
            }
        }
        started
    }

    /// Drop a waiting request (not a running one). Returns whether it was waiting.
    pub fn cancel_waiting(&mut self, id: u64) -> bool {
        let before = self.waiting.len();
        self.waiting.retain(|w| w.1.id != id);
        before != self.waiting.len()
    }

    pub fn running(&self) -> &[Request] {
        &self.running
    }

    /// Waiting requests in the order they will be considered.
    pub fn waiting(&self) -> Vec<&Request> {
        let mut w: Vec<&(u64, Request)> = self.waiting.iter().collect();
        w.sort_by(|a, b| a.1.priority.cmp(&b.1.priority).then(a.0.cmp(&b.0)));
        w.into_iter().map(|x| &x.1).collect()
    }

    pub fn outbound(&self, host: &str) -> usize {
        self.out.get(host).copied().unwrap_or(0)
    }

    pub fn inbound(&self, host: &str) -> usize {
        self.inb.get(host).copied().unwrap_or(0)
    }
}
