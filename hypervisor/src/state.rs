//! The full VM state as a versioned serde blob (memory travels separately).
use crate::cpu::CpuFeatures;
use crate::devices::DeviceState;
use crate::error::{Error, Result};
use crate::serial::SerialState;
use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change of [`VmState`].
/// 2: device sections (`devices`).
pub const STATE_VERSION: u32 = 2;

/// One vCPU's architectural state, in KVM's own structures.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// Includes the legacy FPU/SSE state.
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// (index, value) for every MSR of KVM's index list this host can read.
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
}

/// Everything but guest RAM needed to continue a VM elsewhere.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub version: u32,
    pub memory_size: u64,
    pub vcpus: Vec<VcpuState>,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    pub serial: SerialState,
    /// Guest TSC frequency, for advancing the TSC by the time spent saved.
    pub tsc_khz: u32,
    /// Host wall-clock time of the save, nanoseconds since the Unix epoch.
    pub saved_at_unix_ns: u64,
    pub cpu_features: CpuFeatures,
    /// One versioned section per MMIO device, in bus order.
    pub devices: Vec<DeviceState>,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("version", &self.version)
            .field("memory_size", &self.memory_size)
            .field("vcpus", &self.vcpus.len())
            .field("tsc_khz", &self.tsc_khz)
            .field("devices", &self.devices.len())
            .finish_non_exhaustive()
    }
}

impl VmState {
    /// Encodes the state (self-describing, versioned).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| Error::State(format!("encode: {e}")))
    }

    /// Decodes and checks the version; garbage gets an error, never a panic.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        #[derive(Deserialize)]
        struct Header {
            version: u32,
        }
        let h: Header =
            serde_json::from_slice(bytes).map_err(|e| Error::State(format!("decode: {e}")))?;
        if h.version != STATE_VERSION {
            return Err(Error::State(format!(
                "state version {} is not supported (expected {STATE_VERSION})",
                h.version
            )));
        }
        serde_json::from_slice(bytes).map_err(|e| Error::State(format!("decode: {e}")))
    }
}

pub(crate) fn now_unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects_garbage_and_wrong_version() {
        assert!(VmState::from_bytes(b"nope").is_err());
        let err = VmState::from_bytes(br#"{"version":99}"#).unwrap_err();
        assert!(err.to_string().contains("version 99"), "{err}");
        assert!(VmState::from_bytes(br#"{"version":1}"#).is_err());
        assert!(VmState::from_bytes(br#"{"version":2}"#).is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = VmState::from_bytes(&bytes);
        }
    }
}
