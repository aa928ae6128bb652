//! The state machine in sled: the applied `ClusterState` with its last applied log id and
//! membership, and the latest snapshot. Changes are published to subscribers after each batch.
use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{BasicNode, Entry, EntryPayload, RaftSnapshotBuilder, StoredMembership};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch, Mutex};

use super::{read_err, write_err};
use crate::state::{ClusterState, Request};
use crate::{LogId, NodeId, Response, StorageError, TypeConfig};

const DATA: &[u8] = b"data";
const SNAPSHOT_META: &[u8] = b"snapshot_meta";
const SNAPSHOT_DATA: &[u8] = b"snapshot_data";

/// What is persisted and what a snapshot contains.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct MachineData {
    last_applied: Option<LogId>,
    membership: StoredMembership<NodeId, BasicNode>,
    state: Arc<ClusterState>,
}

/// Decodes snapshot data exactly as `install_snapshot` does.
fn decode_data(bytes: &[u8]) -> Result<MachineData, serde_json::Error> {
    serde_json::from_slice(bytes)
}

/// The replicated state inside a snapshot's data, decoded as installing the snapshot decodes
/// it (for fuzzing and tools).
pub fn decode_snapshot(bytes: &[u8]) -> Result<Arc<ClusterState>, serde_json::Error> {
    decode_data(bytes).map(|d| d.state)
}

/// The latest applied state, as seen by subscribers and readers.
#[derive(Clone, Debug, Default)]
pub struct StateView {
    pub last_applied: Option<LogId>,
    pub state: Arc<ClusterState>,
}

/// One applied command, broadcast to subscribers in log order.
#[derive(Clone, Debug)]
pub struct AppliedEvent {
    pub index: u64,
    pub request: Request,
    pub response: Response,
}

#[derive(Clone)]
pub struct StateMachineStore {
    db: sled::Db,
    tree: sled::Tree,
    data: Arc<Mutex<MachineData>>,
    view: watch::Sender<StateView>,
    events: broadcast::Sender<AppliedEvent>,
}

impl StateMachineStore {
    pub fn open(db: &sled::Db) -> Result<Self, StorageError> {
        let tree = db.open_tree("state_machine").map_err(read_err)?;
        // Only snapshots are persisted: applying does not write the state (serializing the
        // whole state on every apply cost O(state) per write). On start openraft re-applies
        // the committed log after the snapshot, which is never purged before a snapshot
        // covers it. `DATA` is still read for data directories written by older versions.
        let mut data: MachineData = match tree.get(DATA).map_err(read_err)? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(read_err)?,
            None => MachineData::default(),
        };
        if let Some(bytes) = tree.get(SNAPSHOT_DATA).map_err(read_err)? {
            let snap: MachineData = serde_json::from_slice(&bytes).map_err(read_err)?;
            if snap.last_applied > data.last_applied {
                data = snap;
            }
        }
        let (view, _) = watch::channel(StateView {
            last_applied: data.last_applied,
            state: data.state.clone(),
        });
        let (events, _) = broadcast::channel(1024);
        Ok(StateMachineStore {
            db: db.clone(),
            tree,
            data: Arc::new(Mutex::new(data)),
            view,
            events,
        })
    }

    /// The latest applied state (not linearizable by itself: see `ConsensusNode::read`).
    pub fn view(&self) -> StateView {
        self.view.borrow().clone()
    }

    /// Wakes on every applied batch with the newest state.
    pub fn subscribe(&self) -> watch::Receiver<StateView> {
        self.view.subscribe()
    }

    /// Every applied command with its result, in log order.
    pub fn subscribe_events(&self) -> broadcast::Receiver<AppliedEvent> {
        self.events.subscribe()
    }

    fn publish(&self, data: &MachineData) {
        self.view.send_replace(StateView {
            last_applied: data.last_applied,
            state: data.state.clone(),
        });
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let data = self.data.lock().await.clone();
        // Serializing the whole state takes milliseconds: off the async workers, so Raft
        // traffic and client writes on this node are not stalled behind it.
        let (data, bytes) = tokio::task::spawn_blocking(move || {
            let bytes = serde_json::to_vec(&data);
            (data, bytes)
        })
        .await
        .map_err(write_err)?;
        let bytes = bytes.map_err(write_err)?;
        let snapshot_id = match data.last_applied {
            Some(id) => format!(
                "{}-{}-{}",
                id.leader_id.term, id.leader_id.node_id, id.index
            ),
            None => "empty".to_string(),
        };
        let meta = SnapshotMeta {
            last_log_id: data.last_applied,
            last_membership: data.membership,
            snapshot_id,
        };
        self.tree
            .insert(SNAPSHOT_META, serde_json::to_vec(&meta).map_err(write_err)?)
            .map_err(write_err)?;
        self.tree
            .insert(SNAPSHOT_DATA, bytes.clone())
            .map_err(write_err)?;
        self.db.flush_async().await.map_err(write_err)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, BasicNode>), StorageError> {
        let data = self.data.lock().await;
        Ok((data.last_applied, data.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut data = self.data.lock().await;
        let mut responses = Vec::new();
        let mut events = Vec::new();
        for entry in entries {
            data.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => responses.push(Response {
                    result: Ok(crate::Applied::Done),
                }),
                EntryPayload::Membership(m) => {
                    data.membership = StoredMembership::new(Some(entry.log_id), m);
                    responses.push(Response {
                        result: Ok(crate::Applied::Done),
                    });
                }
                EntryPayload::Normal(request) => {
                    let state = Arc::make_mut(&mut data.state);
                    let response = Response {
                        result: state.apply(entry.log_id.index, &request),
                    };
                    events.push(AppliedEvent {
                        index: entry.log_id.index,
                        request,
                        response: response.clone(),
                    });
                    responses.push(response);
                }
            }
        }
        self.publish(&data);
        for event in events {
            // No receivers is fine: nobody is listening yet.
            let _ = self.events.send(event);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let bytes = snapshot.into_inner();
        let mut incoming = decode_data(&bytes).map_err(read_err)?;
        incoming.last_applied = meta.last_log_id;
        incoming.membership = meta.last_membership.clone();
        self.tree
            .insert(SNAPSHOT_META, serde_json::to_vec(meta).map_err(write_err)?)
            .map_err(write_err)?;
        self.tree.insert(SNAPSHOT_DATA, bytes).map_err(write_err)?;
        // An older `DATA` must not win over the installed snapshot on the next start.
        self.tree.remove(DATA).map_err(write_err)?;
        self.db.flush_async().await.map_err(write_err)?;
        let mut data = self.data.lock().await;
        *data = incoming;
        self.publish(&data);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let Some(meta_bytes) = self.tree.get(SNAPSHOT_META).map_err(read_err)? else {
            return Ok(None);
        };
        let Some(bytes) = self.tree.get(SNAPSHOT_DATA).map_err(read_err)? else {
            return Ok(None);
        };
        let meta: SnapshotMeta<NodeId, BasicNode> =
            serde_json::from_slice(&meta_bytes).map_err(read_err)?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes.to_vec())),
        }))
    }
}
