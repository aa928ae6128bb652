//! Applying moves to a snapshot (what the simulator and the tests do after a plan).
use crate::model::Snapshot;
use crate::plan::Move;
use crate::SchedError;
use std::collections::HashMap;

impl Snapshot {
    /// Move each VM to its destination and stamp it with `now_s` (starting its cooldown).
    /// All-or-nothing: an unknown VM or host changes nothing.
    pub fn apply(&mut self, moves: &[Move]) -> Result<(), SchedError> {
        let vm_ix: HashMap<&str, usize> = self
            .vms
            .iter()
            .enumerate()
            .map(|(i, v)| (v.id.as_str(), i))
            .collect();
        let mut plan = Vec::with_capacity(moves.len());
        for m in moves {
            let v = *vm_ix
                .get(m.vm.as_str())
                .ok_or_else(|| SchedError::UnknownVm(m.vm.clone()))?;
            if !self.hosts.iter().any(|h| h.id == m.to) {
                return Err(SchedError::UnknownHost(m.to.clone()));
            }
            plan.push((v, m.to.clone()));
        }
        for (v, to) in plan {
            self.vms[v].host = to;
            self.vms[v].last_migrated_s = Some(self.now_s);
        }
        Ok(())
    }
}
