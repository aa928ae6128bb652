//! What comes from a guest or describes one: workload strings (`wss=256M,rate=...`) and the
//! status page the test guest writes into its memory.
use crate::{refuse, Outcome};
use tern_hypervisor::workload::parse_size;
use tern_hypervisor::{GuestStatus, Workload};

/// A workload string: parsed, checked, and it must survive its own rendering.
pub fn workload(data: &[u8]) -> Outcome {
    let text = std::str::from_utf8(data).map_err(refuse)?;
    let _ = parse_size(text);
    let w: Workload = text.parse().map_err(refuse)?;
    w.min_memory();
    w.cmdline();
    let rendered = w.to_string();
    let back: Workload = rendered
        .parse()
        .unwrap_or_else(|e| panic!("workload {rendered:?} (from {text:?}) does not parse: {e}"));
    assert_eq!(back, w, "workload changed through {rendered:?}");
    Ok(())
}

/// The guest's status page (the first 0x200 bytes; shorter input is zero-padded).
pub fn status_page(data: &[u8]) -> Outcome {
    let mut page = [0u8; 0x200];
    let n = data.len().min(page.len());
    page[..n].copy_from_slice(&data[..n]);
    GuestStatus::parse(&page).map_err(refuse)?;
    Ok(())
}
