//! Host liveness, decided on the leader: every node's load report is its heartbeat. A host
//! not heard from for `not_responding_after` becomes `not-responding`, after `down_after`
//! `down`, and a host heard from again goes back to `connected`. The decision is a pure function
//! of the committed hosts and the leader's observations; the loop around it only proposes.
use std::collections::HashMap;

use tern_consensus::state::{Host, HostId, HostState};
use tern_consensus::Command;

#[derive(Clone, Copy, Debug)]
pub struct LivenessConfig {
    pub not_responding_after_ms: u64,
    pub down_after_ms: u64,
}

/// What the leader observed: when it became leader (a host it has not heard from yet is
/// counted from then, so a new leader does not mark every host down at once) and the last
/// heartbeat of each host, all on the leader's monotonic clock in milliseconds.
pub struct Observations<'a> {
    pub leader_since_ms: u64,
    pub last_beat_ms: &'a HashMap<HostId, u64>,
    pub now_ms: u64,
}

/// `tern_hosts{state}`: how many hosts the committed state has in each state (every node).
pub fn export_metrics(hosts: &tern_consensus::state::OrdMap<HostId, Host>) {
    let states = [
        HostState::Connected,
        HostState::EnteringMaintenance,
        HostState::InMaintenance,
        HostState::NotResponding,
        HostState::Down,
    ];
    for state in states {
        let n = hosts.values().filter(|h| h.state == state).count();
        let label = serde_json::to_value(state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        metrics::gauge!("tern_hosts", "state" => label).set(n as f64);
    }
}

/// The host state changes to commit now.
pub fn decide<'a>(
    hosts: impl IntoIterator<Item = &'a Host>,
    seen: &Observations<'_>,
    cfg: &LivenessConfig,
) -> Vec<Command> {
    let mut out = Vec::new();
    for host in hosts {
        let beat = seen.last_beat_ms.get(&host.id).copied();
        let since = beat
            .unwrap_or(seen.leader_since_ms)
            .max(seen.leader_since_ms);
        let silent_ms = seen.now_ms.saturating_sub(since);
        let heard_since_leading = beat.is_some_and(|b| b >= seen.leader_since_ms);
        let want = if silent_ms >= cfg.down_after_ms {
            HostState::Down
        } else if silent_ms >= cfg.not_responding_after_ms {
            HostState::NotResponding
        } else if heard_since_leading {
            HostState::Connected
        } else {
            continue;
        };
        let change = match (host.state, want) {
            // Maintenance states are the operator's; liveness only overrides them when silent.
            (HostState::EnteringMaintenance | HostState::InMaintenance, HostState::Connected) => {
                false
            }
            (HostState::Down, HostState::NotResponding) => false,
            (current, want) => current != want,
        };
        if change {
            out.push(Command::SetHostState {
                id: host.id,
                state: want,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_consensus::state::Capacity;

    const CFG: LivenessConfig = LivenessConfig {
        not_responding_after_ms: 3_000,
        down_after_ms: 10_000,
    };

    fn host(id: HostId, state: HostState) -> Host {
        Host {
            id,
            address: format!("h{id}"),
            capacity: Capacity::default(),
            cpu_features: vec![],
            state,
            registered_at_ms: 0,
        }
    }

    fn run(
        hosts: &[Host],
        beats: &[(HostId, u64)],
        leader_since_ms: u64,
        now_ms: u64,
    ) -> Vec<Command> {
        let last_beat_ms: HashMap<HostId, u64> = beats.iter().copied().collect();
        let seen = Observations {
            leader_since_ms,
            last_beat_ms: &last_beat_ms,
            now_ms,
        };
        decide(hosts, &seen, &CFG)
    }

    fn set(id: HostId, state: HostState) -> Command {
        Command::SetHostState { id, state }
    }

    #[test]
    fn a_silent_host_goes_not_responding_then_down() {
        let h = [host(1, HostState::Connected), host(2, HostState::Connected)];
        assert!(run(&h, &[(1, 1_000), (2, 1_000)], 0, 3_999).is_empty());
        assert_eq!(
            run(&h, &[(1, 1_000), (2, 3_500)], 0, 4_000),
            vec![set(1, HostState::NotResponding)]
        );
        let h = [
            host(1, HostState::NotResponding),
            host(2, HostState::Connected),
        ];
        assert!(run(&h, &[(1, 1_000), (2, 10_500)], 0, 10_999).is_empty());
        assert_eq!(
            run(&h, &[(1, 1_000), (2, 10_500)], 0, 11_000),
            vec![set(1, HostState::Down)]
        );
    }

    #[test]
    fn a_host_heard_again_is_connected_again() {
        let h = [host(1, HostState::Down), host(2, HostState::NotResponding)];
        assert_eq!(
            run(&h, &[(1, 20_000), (2, 20_000)], 0, 20_100),
            vec![set(1, HostState::Connected), set(2, HostState::Connected)]
        );
    }

    #[test]
    fn a_new_leader_counts_silence_from_when_it_took_over() {
        // Never heard from: nothing until the thresholds pass since the leader started.
        let h = [host(1, HostState::Connected)];
        assert!(run(&h, &[], 50_000, 52_999).is_empty());
        assert_eq!(
            run(&h, &[], 50_000, 53_000),
            vec![set(1, HostState::NotResponding)]
        );
        // A host marked down by an earlier leader stays down until it is heard from.
        let h = [host(1, HostState::Down)];
        assert!(run(&h, &[], 50_000, 50_100).is_empty());
        assert!(run(&h, &[], 50_000, 55_000).is_empty());
    }

    #[test]
    fn maintenance_is_kept_while_the_host_beats_but_not_when_it_dies() {
        let h = [
            host(1, HostState::InMaintenance),
            host(2, HostState::EnteringMaintenance),
        ];
        assert!(run(&h, &[(1, 9_000), (2, 9_000)], 0, 9_500).is_empty());
        assert_eq!(
            run(&h, &[(1, 0), (2, 0)], 0, 10_000),
            vec![set(1, HostState::Down), set(2, HostState::Down)]
        );
    }
}
