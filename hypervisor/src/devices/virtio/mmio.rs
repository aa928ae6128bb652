//! The virtio-mmio transport, virtio 1.x "modern" register layout (version 2): feature
//! negotiation, queue setup, notify, interrupt status/ack, configuration generation and
//! device status including reset. One 4 KiB region and one interrupt line per device.
use super::VirtioDevice;
use crate::devices::{DeviceState, MmioDevice};
use crate::error::{Error, Result};
use crate::memory::GuestMemory;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// Vendor ID: `TERN` in ASCII.
const VENDOR_ID: u32 = 0x5445_524e;
/// Version of [`TransportState`] in the state section.
const STATE_VERSION: u32 = 1;

/// One virtio device behind the virtio-mmio register file.
pub struct VirtioMmio {
    dev: Box<dyn VirtioDevice>,
    mem: Arc<GuestMemory>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
}

/// One queue's state in the section (virtio-queue's `QueueState` is not serde).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct QueueSnapshot {
    max_size: u16,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    next_avail: u16,
    next_used: u16,
    event_idx: bool,
}

/// The transport's state section: everything the guest driver set up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TransportState {
    device_type: u32,
    device_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    queues: Vec<QueueSnapshot>,
}

impl VirtioMmio {
    pub fn new(dev: Box<dyn VirtioDevice>, mem: Arc<GuestMemory>) -> Result<Self> {
        let queues = dev
            .queue_max_sizes()
            .iter()
            .map(|&n| {
                Queue::new(n).map_err(|e| Error::Config(format!("{} queue: {e}", dev.kind())))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            dev,
            mem,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
        })
    }

    fn device_features(&self) -> u64 {
        self.dev.features() | 1 << VIRTIO_F_VERSION_1
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt_status = 0;
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only while the queue is off and the driver is between
    /// FEATURES_OK and DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0
            && self
                .queues
                .get(self.queue_sel as usize)
                .is_some_and(|q| !q.ready())
    }

    fn read_reg(&self, reg: u32) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match reg {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.dev.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, reg: u32, v: u32) {
        let allowed = self.queue_config_allowed();
        match reg {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                // Only while negotiating, and never a bit the device did not offer.
                if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                    let shift = match self.driver_features_sel {
                        0 => 0,
                        1 => 32,
                        _ => return,
                    };
                    let mask = 0xffff_ffffu64 << shift;
                    self.driver_features =
                        (self.driver_features & !mask) | (u64::from(v) << shift) & mask;
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM if allowed => {
                if let Some(q) = self.selected_queue() {
                    // virtio-queue keeps the old size when the new one is invalid; QueueReady
                    // then refuses an invalid queue.
                    q.set_size(v as u16);
                }
            }
            VIRTIO_MMIO_QUEUE_READY => self.set_queue_ready(v == 1),
            VIRTIO_MMIO_QUEUE_DESC_LOW if allowed => {
                self.set_addr(|q, lo| q.set_desc_table_address(lo, None), v)
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH if allowed => {
                self.set_addr(|q, hi| q.set_desc_table_address(None, hi), v)
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW if allowed => {
                self.set_addr(|q, lo| q.set_avail_ring_address(lo, None), v)
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH if allowed => {
                self.set_addr(|q, hi| q.set_avail_ring_address(None, hi), v)
            }
            VIRTIO_MMIO_QUEUE_USED_LOW if allowed => {
                self.set_addr(|q, lo| q.set_used_ring_address(lo, None), v)
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH if allowed => {
                self.set_addr(|q, hi| q.set_used_ring_address(None, hi), v)
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(v),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !v,
            VIRTIO_MMIO_STATUS => self.set_status(v),
            _ => tracing::debug!(
                device = self.dev.kind(),
                reg,
                "ignoring virtio-mmio write (read-only, unknown, or not allowed now)"
            ),
        }
    }

    fn set_addr(&mut self, f: impl FnOnce(&mut Queue, Option<u32>), v: u32) {
        if let Some(q) = self.selected_queue() {
            f(q, Some(v));
        }
    }

    fn set_queue_ready(&mut self, ready: bool) {
        let driver_ok = self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0;
        let features_ok = self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0;
        let mem = self.mem.clone();
        let Some(q) = self.selected_queue() else {
            return;
        };
        if !ready {
            q.set_ready(false);
        } else if features_ok && !driver_ok {
            // virtio-queue checks the rings only on a ready queue; a queue whose rings are not
            // all inside guest memory stays off.
            q.set_ready(true);
            if !q.is_valid(mem.device_view()) {
                q.set_ready(false);
            }
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // The driver may only add bits; FEATURES_OK sticks only for an acceptable set.
        let added = v & !self.status;
        let mut status = self.status | v;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device_features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if ok {
                self.dev.set_driver_features(self.driver_features);
            } else {
                status &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 && status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            status &= !VIRTIO_CONFIG_S_DRIVER_OK;
        }
        self.status = status;
    }

    fn notify(&mut self, index: u32) {
        let live = VIRTIO_CONFIG_S_DRIVER_OK;
        let dead = VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET;
        if self.status & live == 0 || self.status & dead != 0 {
            return;
        }
        let mem = self.mem.clone();
        let Some(q) = self.queues.get_mut(index as usize) else {
            return;
        };
        if !q.ready() {
            return;
        }
        if self.dev.process_queue(index as usize, q, mem.device_view()) {
            self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
        }
    }

    fn state(&self) -> TransportState {
        TransportState {
            device_type: self.dev.device_type(),
            device_features: self.device_features(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self
                .queues
                .iter()
                .map(|q| QueueSnapshot {
                    max_size: q.max_size(),
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                    event_idx: q.event_idx_enabled(),
                })
                .collect(),
        }
    }

    fn set_state(&mut self, st: TransportState) -> Result<()> {
        let bad = |what: String| Error::State(format!("{} section: {what}", self.dev.kind()));
        if st.device_type != self.dev.device_type() {
            return Err(bad(format!("device type {}", st.device_type)));
        }
        if st.device_features != self.device_features() {
            return Err(bad(format!(
                "saved device features {:#x}, this device offers {:#x} (different disk options?)",
                st.device_features,
                self.device_features()
            )));
        }
        if st.driver_features & !st.device_features != 0 {
            return Err(bad("driver features beyond the device's".into()));
        }
        if st.queues.len() != self.queues.len() {
            return Err(bad(format!("{} queues", st.queues.len())));
        }
        let mut queues = Vec::with_capacity(st.queues.len());
        for (s, q) in st.queues.iter().zip(&self.queues) {
            if s.max_size != q.max_size() {
                return Err(bad(format!("queue max size {}", s.max_size)));
            }
            let state = virtio_queue::QueueState {
                max_size: s.max_size,
                next_avail: s.next_avail,
                next_used: s.next_used,
                event_idx_enabled: s.event_idx,
                size: s.size,
                ready: s.ready,
                desc_table: s.desc_table,
                avail_ring: s.avail_ring,
                used_ring: s.used_ring,
            };
            let nq = Queue::try_from(state).map_err(|e| bad(format!("queue: {e}")))?;
            if nq.ready() && !nq.is_valid(self.mem.device_view()) {
                return Err(bad("a ready queue lies outside guest memory".into()));
            }
            queues.push(nq);
        }
        if st.driver_features & (1 << VIRTIO_F_VERSION_1) != 0 {
            self.dev.set_driver_features(st.driver_features);
        }
        self.queues = queues;
        self.device_features_sel = st.device_features_sel;
        self.driver_features_sel = st.driver_features_sel;
        self.driver_features = st.driver_features;
        self.queue_sel = st.queue_sel;
        self.status = st.status;
        self.interrupt_status = st.interrupt_status;
        self.config_generation = st.config_generation;
        Ok(())
    }
}

impl MmioDevice for VirtioMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.dev
                .read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        // Registers are 32 bits wide and read whole (virtio-mmio 4.2.2.2).
        let v = if data.len() == 4 && offset.is_multiple_of(4) {
            self.read_reg(offset as u32)
        } else {
            0
        };
        let b = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&b[..n]);
        data[n..].iter_mut().for_each(|x| *x = 0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.dev
                .write_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_reg(offset as u32, v);
    }

    fn irq_level(&self) -> bool {
        self.interrupt_status != 0
    }

    fn save(&self) -> Result<DeviceState> {
        Ok(DeviceState {
            id: String::new(),
            version: STATE_VERSION,
            data: serde_json::to_value(self.state())
                .map_err(|e| Error::State(format!("encode {}: {e}", self.dev.kind())))?,
        })
    }

    fn restore(&mut self, state: &DeviceState) -> Result<()> {
        if state.version != STATE_VERSION {
            return Err(Error::State(format!(
                "{} section version {} is not supported (expected {STATE_VERSION})",
                self.dev.kind(),
                state.version
            )));
        }
        let st: TransportState = serde_json::from_value(state.data.clone())
            .map_err(|e| Error::State(format!("decode {}: {e}", self.dev.kind())))?;
        self.set_state(st)
    }

    fn kind(&self) -> &'static str {
        self.dev.kind()
    }
}
