//! The built-in test guest (source in `hypervisor/guest/`, contract in `guest/ABI.md`), built
//! from source by this crate's build script, and the multiboot v1 header checks a loader needs.

/// The guest image: an ELF64 file carrying a multiboot v1 header with the address fields
/// (flag bit 16), so a loader can place it without parsing ELF.
pub static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.elf"));

const MULTIBOOT_MAGIC: u32 = 0x1BAD_B002;
const SEARCH_LIMIT: usize = 8192;
const FLAG_ADDRESS_FIELDS: u32 = 1 << 16;

/// The fields of a multiboot v1 header that has valid address fields (flag bit 16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultibootHeader {
    /// File offset of the header.
    pub offset: usize,
    pub flags: u32,
    pub header_addr: u32,
    pub load_addr: u32,
    pub load_end_addr: u32,
    pub bss_end_addr: u32,
    pub entry_addr: u32,
}

impl MultibootHeader {
    /// File offset of the byte that loads at `load_addr`.
    pub fn load_offset(&self) -> usize {
        self.offset - (self.header_addr - self.load_addr) as usize
    }

    /// The bytes to copy to `load_addr` (the rest up to `bss_end_addr` is zeroed).
    pub fn load_bytes<'a>(&self, image: &'a [u8]) -> &'a [u8] {
        let start = self.load_offset();
        &image[start..start + (self.load_end_addr - self.load_addr) as usize]
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("no multiboot v1 header in the first 8 KiB")]
    NoHeader,
    #[error("multiboot header checksum is wrong")]
    BadChecksum,
    #[error("multiboot header lacks the address fields (flag bit 16)")]
    NoAddressFields,
    #[error("multiboot header addresses are inconsistent: {0}")]
    BadAddresses(&'static str),
}

fn u32_at(image: &[u8], off: usize) -> Option<u32> {
    let b = image.get(off..off + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Finds and checks the multiboot v1 header of `image` the way a multiboot loader would.
pub fn multiboot_header(image: &[u8]) -> Result<MultibootHeader, ImageError> {
    let limit = image.len().min(SEARCH_LIMIT);
    let offset = (0..limit.saturating_sub(11))
        .step_by(4)
        .find(|&o| u32_at(image, o) == Some(MULTIBOOT_MAGIC))
        .ok_or(ImageError::NoHeader)?;
    let field = |i: usize| u32_at(image, offset + 4 * i);
    let (magic, flags, checksum) = match (field(0), field(1), field(2)) {
        (Some(m), Some(f), Some(c)) => (m, f, c),
        _ => return Err(ImageError::NoHeader),
    };
    if magic.wrapping_add(flags).wrapping_add(checksum) != 0 {
        return Err(ImageError::BadChecksum);
    }
    if flags & FLAG_ADDRESS_FIELDS == 0 {
        return Err(ImageError::NoAddressFields);
    }
    let addr = |i: usize| field(i).ok_or(ImageError::BadAddresses("header truncated"));
    let h = MultibootHeader {
        offset,
        flags,
        header_addr: addr(3)?,
        load_addr: addr(4)?,
        load_end_addr: addr(5)?,
        bss_end_addr: addr(6)?,
        entry_addr: addr(7)?,
    };
    if h.header_addr < h.load_addr || (h.header_addr - h.load_addr) as usize > offset {
        return Err(ImageError::BadAddresses(
            "header_addr outside the loaded range",
        ));
    }
    if h.load_end_addr <= h.header_addr {
        return Err(ImageError::BadAddresses(
            "load_end_addr not after the header",
        ));
    }
    if h.load_offset() + (h.load_end_addr - h.load_addr) as usize > image.len() {
        return Err(ImageError::BadAddresses(
            "loaded range extends past the file",
        ));
    }
    if h.bss_end_addr != 0 && h.bss_end_addr < h.load_end_addr {
        return Err(ImageError::BadAddresses(
            "bss_end_addr before load_end_addr",
        ));
    }
    if h.entry_addr < h.load_addr || h.entry_addr >= h.load_end_addr {
        return Err(ImageError::BadAddresses(
            "entry_addr outside the loaded code",
        ));
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::STATUS_ADDR;

    #[test]
    fn built_image_is_a_valid_multiboot_image() {
        let h = multiboot_header(IMAGE).expect("IMAGE has a valid multiboot header");
        assert!(h.offset < SEARCH_LIMIT && h.offset.is_multiple_of(4));
        assert_eq!(h.load_addr, 0x0010_0000, "ABI: loaded at 1 MiB");
        assert_ne!(h.flags & (1 << 1), 0, "ABI: memory info requested");
        let end = if h.bss_end_addr != 0 {
            h.bss_end_addr
        } else {
            h.load_end_addr
        };
        assert!(
            u64::from(end) <= STATUS_ADDR,
            "image overlaps the status page"
        );
        // The loaded bytes start with the ELF program's first segment: they must be the bytes
        // the ELF header says sit at load_addr, so ELF and multiboot loaders agree.
        assert_eq!(&IMAGE[..4], b"\x7fELF");
        let phoff = u64::from_le_bytes(IMAGE[32..40].try_into().unwrap()) as usize;
        let seg_off = u64::from_le_bytes(IMAGE[phoff + 8..phoff + 16].try_into().unwrap());
        let seg_paddr = u64::from_le_bytes(IMAGE[phoff + 24..phoff + 32].try_into().unwrap());
        assert_eq!(seg_paddr, u64::from(h.load_addr));
        assert_eq!(seg_off as usize, h.load_offset());
        assert_eq!(
            h.load_bytes(IMAGE).len(),
            (h.load_end_addr - h.load_addr) as usize
        );
        let entry = u64::from_le_bytes(IMAGE[24..32].try_into().unwrap());
        assert_eq!(entry, u64::from(h.entry_addr));
    }

    fn header_image(fields: [u32; 8]) -> Vec<u8> {
        let mut v = vec![0u8; 64];
        for f in fields.iter() {
            v.extend_from_slice(&f.to_le_bytes());
        }
        v.resize(4096, 0);
        v
    }

    fn good_fields() -> [u32; 8] {
        let flags = (1 << 16) | 2;
        let sum = 0u32.wrapping_sub(MULTIBOOT_MAGIC.wrapping_add(flags));
        [
            MULTIBOOT_MAGIC,
            flags,
            sum,
            0x10_0000 + 64,
            0x10_0000,
            0x10_0800,
            0x10_1000,
            0x10_0100,
        ]
    }

    #[test]
    fn synthetic_header_parses() {
        let h = multiboot_header(&header_image(good_fields())).unwrap();
        assert_eq!(h.offset, 64);
        assert_eq!(h.load_offset(), 0);
        assert_eq!(h.entry_addr, 0x10_0100);
    }

    #[test]
    fn bad_headers_are_rejected() {
        assert_eq!(multiboot_header(&[0u8; 100]), Err(ImageError::NoHeader));
        assert_eq!(multiboot_header(&[]), Err(ImageError::NoHeader));
        let mut f = good_fields();
        f[2] ^= 1;
        assert_eq!(
            multiboot_header(&header_image(f)),
            Err(ImageError::BadChecksum)
        );
        let mut f = good_fields();
        f[1] = 2;
        f[2] = 0u32.wrapping_sub(MULTIBOOT_MAGIC + 2);
        assert_eq!(
            multiboot_header(&header_image(f)),
            Err(ImageError::NoAddressFields)
        );
        let mut f = good_fields();
        f[4] = 0x0F_0000; // header would sit 64 KiB into the file
        assert!(matches!(
            multiboot_header(&header_image(f)),
            Err(ImageError::BadAddresses(_))
        ));
        let mut f = good_fields();
        f[5] = 0x20_0000; // loaded range past the end of the file
        assert!(matches!(
            multiboot_header(&header_image(f)),
            Err(ImageError::BadAddresses(_))
        ));
        let mut f = good_fields();
        f[7] = 0x30_0000;
        assert!(matches!(
            multiboot_header(&header_image(f)),
            Err(ImageError::BadAddresses(_))
        ));
        // A header beyond the first 8 KiB is not found.
        let mut v = vec![0u8; 8192];
        v.extend_from_slice(&header_image(good_fields()));
        assert_eq!(multiboot_header(&v), Err(ImageError::NoHeader));
    }

    #[test]
    fn truncated_header_never_panics() {
        let full = header_image(good_fields());
        for len in 0..full.len().min(200) {
            let _ = multiboot_header(&full[..len]);
        }
    }
}
