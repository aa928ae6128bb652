//! Per-vCPU setup: CPUID (from KVM's supported set, with per-vCPU APIC IDs), the list of
//! MSRs worth saving, the multiboot entry state, and the host feature summary that
//! migration compares.
use crate::error::{kvm, Error, Result};
use kvm_bindings::{kvm_segment, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

/// The CPU features a guest may see here. Migration refuses a destination that lacks any
/// feature of the source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFeatures {
    pub vendor: String,
    /// (leaf, subleaf, eax, ebx, ecx, edx) of the feature leaves 1, 7.0, 0xd.1, 0x80000001.
    pub leaves: Vec<(u32, u32, u32, u32, u32, u32)>,
}

const FEATURE_LEAVES: [(u32, u32); 4] = [(1, 0), (7, 0), (0xd, 1), (0x8000_0001, 0)];

impl CpuFeatures {
    pub(crate) fn from_cpuid(cpuid: &CpuId) -> Self {
        let entries = cpuid.as_slice();
        let vendor = entries
            .iter()
            .find(|e| e.function == 0)
            .map(|e| {
                let mut v = Vec::new();
                for r in [e.ebx, e.edx, e.ecx] {
                    v.extend_from_slice(&r.to_le_bytes());
                }
                String::from_utf8_lossy(&v).into_owned()
            })
            .unwrap_or_default();
        let leaves = FEATURE_LEAVES
            .iter()
            .filter_map(|&(f, i)| {
                entries
                    .iter()
                    .find(|e| e.function == f && e.index == i)
                    .map(|e| {
                        // APIC ID and CPU count bits in leaf 1 EBX are not features.
                        let ebx = if f == 1 { 0 } else { e.ebx };
                        let eax = if f == 1 { e.eax } else { 0 };
                        (f, i, eax, ebx, e.ecx, e.edx)
                    })
            })
            .collect();
        Self { vendor, leaves }
    }

    /// Features `self` (a source) needs that `host` does not have; empty if compatible.
    pub fn missing_on(&self, host: &CpuFeatures) -> Vec<String> {
        let mut missing = Vec::new();
        if self.vendor != host.vendor {
            missing.push(format!("vendor {} (host has {})", self.vendor, host.vendor));
        }
        for &(f, i, _, ebx, ecx, edx) in &self.leaves {
            let h = host
                .leaves
                .iter()
                .find(|l| l.0 == f && l.1 == i)
                .copied()
                .unwrap_or((f, i, 0, 0, 0, 0));
            for (name, need, have) in [("ebx", ebx, h.3), ("ecx", ecx, h.4), ("edx", edx, h.5)] {
                if need & !have != 0 {
                    missing.push(format!("cpuid {f:#x}.{i} {name} bits {:#x}", need & !have));
                }
            }
        }
        missing
    }
}

/// KVM's supported CPUID.
pub(crate) fn supported_cpuid(kvm_sys: &Kvm) -> Result<CpuId> {
    kvm_sys
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))
}

/// KVM's supported CPUID plus the hypervisor timing leaf 0x4000_0010 (TSC and APIC bus
/// frequency in kHz), which the test guest reads first.
pub(crate) fn guest_cpuid(kvm_sys: &Kvm, tsc_khz: u32) -> Result<CpuId> {
    let base = supported_cpuid(kvm_sys)?;
    let mut entries: Vec<kvm_bindings::kvm_cpuid_entry2> = base.as_slice().to_vec();
    if let Some(hv) = entries.iter_mut().find(|e| e.function == 0x4000_0000) {
        hv.eax = hv.eax.max(0x4000_0010);
        entries.retain(|e| e.function != 0x4000_0010);
        entries.push(kvm_bindings::kvm_cpuid_entry2 {
            function: 0x4000_0010,
            eax: tsc_khz,
            ebx: 1_000_000, // KVM's LAPIC timer runs at 1 GHz
            ..Default::default()
        });
    }
    CpuId::from_entries(&entries).map_err(|e| Error::Config(format!("CPUID table: {e:?}")))
}

/// Sets `base` on `vcpu` with its APIC ID patched in.
pub(crate) fn set_cpuid(vcpu: &VcpuFd, base: &CpuId, apic_id: u32, vcpus: u32) -> Result<()> {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (vcpus.min(255) << 16);
                if vcpus > 1 {
                    e.edx |= 1 << 28; // HTT: the logical-count field is valid
                }
            }
            0xb | 0x1f => e.edx = apic_id,
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))
}

/// The MSRs from KVM's index list that this vCPU can actually read (some listed ones fail
/// on some hosts); saved and restored in this order.
pub(crate) fn saveable_msrs(kvm_sys: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>> {
    let list = kvm_sys
        .get_msr_index_list()
        .map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?;
    let mut indices: Vec<u32> = list.as_slice().to_vec();
    loop {
        let (n, total) = read_msrs(vcpu, &indices).map(|v| (v.len(), indices.len()))?;
        if n == total {
            return Ok(indices);
        }
        indices.remove(n); // KVM stops at the first MSR it cannot read
    }
}

/// Reads `indices`; returns as many (index, value) pairs as KVM could read.
pub(crate) fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>> {
    let mut out = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(256) {
        let mut msrs =
            Msrs::new(chunk.len()).map_err(|e| Error::State(format!("MSR buffer: {e:?}")))?;
        for (e, &i) in msrs.as_mut_slice().iter_mut().zip(chunk) {
            e.index = i;
        }
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        if n < chunk.len() {
            break;
        }
    }
    Ok(out)
}

/// Writes MSRs; fails naming the first one KVM refused.
pub(crate) fn write_msrs(vcpu: &VcpuFd, values: &[(u32, u64)]) -> Result<()> {
    for chunk in values.chunks(256) {
        let mut msrs =
            Msrs::new(chunk.len()).map_err(|e| Error::State(format!("MSR buffer: {e:?}")))?;
        for (e, &(i, v)) in msrs.as_mut_slice().iter_mut().zip(chunk) {
            e.index = i;
            e.data = v;
        }
        let n = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if n < chunk.len() {
            return Err(Error::State(format!("KVM refused MSR {:#x}", chunk[n].0)));
        }
    }
    Ok(())
}

fn flat_segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Multiboot entry: 32-bit protected mode, paging off, flat segments, EAX magic, EBX = MBI.
pub(crate) fn set_multiboot_entry(vcpu: &VcpuFd, entry: u32, mbi: u32) -> Result<()> {
    let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    sregs.cs = flat_segment(0x08, 0xb); // execute/read, accessed
    let data = flat_segment(0x10, 0x3); // read/write, accessed
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr0 = (sregs.cr0 | 0x1 | 0x10) & !0x8000_0000; // PE, ET; PG off
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
    let mut regs = vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    regs.rip = u64::from(entry);
    regs.rax = u64::from(crate::multiboot::BOOTLOADER_MAGIC);
    regs.rbx = u64::from(mbi);
    regs.rflags = 0x2;
    // The spec leaves ESP undefined; give guests that call before setting their own stack a
    // usable one in free low memory (QEMU does likewise).
    regs.rsp = 0x7000;
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))
}
