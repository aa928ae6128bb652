//! Multiboot v1 loading: place the image (a.out-kludge address fields, else ELF32 program
//! headers), write the multiboot info (MBI) with memory sizes and the command line.
use crate::error::{Error, Result};
use crate::memory::GuestMemory;

const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// Value of EAX at entry.
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
const FLAG_ADDRESS_FIELDS: u32 = 1 << 16;
/// Header must be in the first 8 KiB, 4-byte aligned.
const SEARCH_LEN: usize = 8192;

/// Where the MBI and command line go (low memory, below the image at 1 MiB).
pub const MBI_ADDR: u64 = 0x9000;
const CMDLINE_ADDR: u64 = 0x9100;
const CMDLINE_MAX: usize = 0x0f00 - 1;

/// Result of loading: where to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    pub entry: u32,
    pub mbi: u32,
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Image(msg.into())
}

/// Loads `image` into `mem` and writes the MBI with `cmdline`.
pub fn load(mem: &GuestMemory, image: &[u8], cmdline: &str) -> Result<Loaded> {
    let (hdr_off, flags) = (0..image.len().min(SEARCH_LEN).saturating_sub(11))
        .step_by(4)
        .find_map(|off| {
            let magic = u32_at(image, off)?;
            let flags = u32_at(image, off + 4)?;
            let sum = u32_at(image, off + 8)?;
            (magic == HEADER_MAGIC && magic.wrapping_add(flags).wrapping_add(sum) == 0)
                .then_some((off, flags))
        })
        .ok_or_else(|| bad("no multiboot v1 header in the first 8 KiB"))?;
    if flags & 0xffff & !0x7 != 0 {
        return Err(bad(format!(
            "unsupported required multiboot flags {flags:#x}"
        )));
    }
    let entry = if flags & FLAG_ADDRESS_FIELDS != 0 {
        load_address_fields(mem, image, hdr_off)?
    } else {
        load_elf32(mem, image)?
    };
    if cmdline.len() > CMDLINE_MAX || cmdline.contains('\0') {
        return Err(bad(format!(
            "command line must be at most {CMDLINE_MAX} bytes without NUL"
        )));
    }
    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    mem.write(CMDLINE_ADDR, &c)?;
    let mut mbi = [0u8; 0x60];
    let put = |mbi: &mut [u8; 0x60], off: usize, v: u32| {
        mbi[off..off + 4].copy_from_slice(&v.to_le_bytes())
    };
    put(&mut mbi, 0, (1 << 0) | (1 << 2)); // mem_* and cmdline valid
    put(&mut mbi, 4, 640);
    put(&mut mbi, 8, ((mem.size() - 0x10_0000) / 1024) as u32);
    put(&mut mbi, 16, CMDLINE_ADDR as u32);
    mem.write(MBI_ADDR, &mbi)?;
    Ok(Loaded {
        entry,
        mbi: MBI_ADDR as u32,
    })
}

fn load_address_fields(mem: &GuestMemory, image: &[u8], hdr_off: usize) -> Result<u32> {
    let field =
        |i: usize| u32_at(image, hdr_off + 12 + 4 * i).ok_or_else(|| bad("truncated header"));
    let (header_addr, load_addr, load_end, bss_end, entry) =
        (field(0)?, field(1)?, field(2)?, field(3)?, field(4)?);
    let file_start = (hdr_off as u64)
        .checked_sub(u64::from(header_addr.wrapping_sub(load_addr)))
        .filter(|_| header_addr >= load_addr)
        .ok_or_else(|| bad("header_addr below load_addr"))?;
    let load_len = if load_end == 0 {
        (image.len() as u64)
            .checked_sub(file_start)
            .ok_or_else(|| bad("load range outside the file"))?
    } else {
        u64::from(load_end)
            .checked_sub(u64::from(load_addr))
            .ok_or_else(|| bad("load_end_addr below load_addr"))?
    };
    let end = file_start + load_len;
    if end > image.len() as u64 {
        return Err(bad("load range outside the file"));
    }
    let start = u64::from(load_addr);
    if start < 0x10_0000 {
        return Err(bad("image loads below 1 MiB"));
    }
    fits(mem, start, load_len)?;
    mem.write(start, &image[file_start as usize..end as usize])?;
    if bss_end != 0 {
        let bss_start = start + load_len;
        let bss_len = u64::from(bss_end)
            .checked_sub(bss_start)
            .ok_or_else(|| bad("bss_end_addr below the loaded end"))?;
        fits(mem, bss_start, bss_len)?;
        zero(mem, bss_start, bss_len)?;
    }
    if !(start..start + load_len.max(1)).contains(&u64::from(entry)) {
        return Err(bad(format!("entry {entry:#x} outside the loaded image")));
    }
    Ok(entry)
}

fn load_elf32(mem: &GuestMemory, image: &[u8]) -> Result<u32> {
    if image.get(0..4) != Some(b"\x7fELF") || image.get(4) != Some(&1) || image.get(5) != Some(&1) {
        return Err(bad(
            "multiboot header without address fields and not a little-endian ELF32",
        ));
    }
    let u16_at = |o: usize| {
        image
            .get(o..o + 2)
            .map(|s| u16::from_le_bytes([s[0], s[1]]))
            .ok_or_else(|| bad("truncated ELF header"))
    };
    let word = |o: usize| u32_at(image, o).ok_or_else(|| bad("truncated ELF header"));
    let entry = word(24)?;
    let phoff = word(28)? as usize;
    let phentsize = u16_at(42)? as usize;
    let phnum = u16_at(44)? as usize;
    if phentsize < 32 {
        return Err(bad("ELF program header entries too small"));
    }
    for i in 0..phnum {
        let ph = phoff
            .checked_add(i * phentsize)
            .ok_or_else(|| bad("program header offset overflow"))?;
        if word(ph)? != 1 {
            continue; // not PT_LOAD
        }
        let (off, paddr, filesz, memsz) = (
            word(ph + 4)?,
            word(ph + 12)?,
            word(ph + 16)?,
            word(ph + 20)?,
        );
        if filesz > memsz {
            return Err(bad("segment file size exceeds memory size"));
        }
        let data = image
            .get(off as usize..(off as usize).saturating_add(filesz as usize))
            .ok_or_else(|| bad("segment outside the file"))?;
        fits(mem, u64::from(paddr), u64::from(memsz))?;
        mem.write(u64::from(paddr), data)?;
        zero(
            mem,
            u64::from(paddr) + u64::from(filesz),
            u64::from(memsz - filesz),
        )?;
    }
    Ok(entry)
}

fn fits(mem: &GuestMemory, addr: u64, len: u64) -> Result<()> {
    if addr.checked_add(len).is_none_or(|e| e > mem.size()) {
        return Err(bad(format!(
            "image range {addr:#x}+{len:#x} does not fit in {} MiB of guest memory",
            mem.size() >> 20
        )));
    }
    Ok(())
}

fn zero(mem: &GuestMemory, addr: u64, len: u64) -> Result<()> {
    let chunk = [0u8; 4096];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(4096);
        mem.write(addr + done, &chunk[..n as usize])?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects_garbage() {
        let mem = GuestMemory::new(crate::memory::MIN_MEMORY).unwrap();
        let err = load(&mem, b"not an image", "").unwrap_err().to_string();
        assert!(err.contains("no multiboot"), "{err}");
    }

    proptest! {
        #[test]
        fn never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..256), flags: u32) {
            let mem = GuestMemory::new(crate::memory::MIN_MEMORY).unwrap();
            let mut hdr = Vec::new();
            hdr.extend_from_slice(&HEADER_MAGIC.to_le_bytes());
            hdr.extend_from_slice(&flags.to_le_bytes());
            hdr.extend_from_slice(&(0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags)).to_le_bytes());
            hdr.append(&mut bytes);
            let _ = load(&mem, &hdr, "x=1");
        }
    }
}
