//! userfaultfd on guest memory, the primitive post-copy migration needs on the destination:
//! every page not yet present is reported when it is first touched (by a vCPU, through KVM,
//! or by the VMM itself) and the toucher sleeps until the page is filled with `UFFDIO_COPY`.
//! Raw ioctls (no maintained crate builds without libclang here); the ABI is the kernel's
//! `linux/userfaultfd.h`.
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::memory::{GuestMemory, PAGE_SIZE};

const UFFD_API: u64 = 0xAA;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffd_msg` (32 bytes): event, then for a page fault flags and address.
#[repr(C)]
#[derive(Default)]
struct UffdMsg {
    event: u8,
    reserved: [u8; 7],
    flags: u64,
    address: u64,
    feat: u64,
}

vmm_sys_util::ioctl_iowr_nr!(UFFDIO_API, 0xAA, 0x3F, UffdioApi);
vmm_sys_util::ioctl_iowr_nr!(UFFDIO_REGISTER, 0xAA, 0x00, UffdioRegister);
vmm_sys_util::ioctl_iowr_nr!(UFFDIO_COPY, 0xAA, 0x03, UffdioCopy);

/// Guest memory registered for missing-page faults. Dropping it unregisters the range
/// (closing the descriptor wakes every faulting thread, which then sees zero pages).
pub struct MissingPages {
    fd: OwnedFd,
    base: u64,
    size: u64,
}

fn os_err(what: &str) -> Error {
    Error::Memory(format!(
        "userfaultfd {what}: {}",
        std::io::Error::last_os_error()
    ))
}

impl MissingPages {
    /// Register all of `mem`: from now on a touch of a page that is not present blocks
    /// until [`MissingPages::fill`] provides it. Pages already present stay as they are.
    pub fn register(mem: &GuestMemory) -> Result<Self> {
        // SAFETY: a plain syscall with flags only; the result is checked.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if raw < 0 {
            return Err(os_err(
                "open (vm.unprivileged_userfaultfd or CAP_SYS_PTRACE?)",
            ));
        }
        // SAFETY: `raw` is a new descriptor this process owns and nothing else holds.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        // SAFETY: UFFDIO_API on a userfaultfd with a properly sized, writable struct.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API(), &mut api) } != 0 {
            return Err(os_err("UFFDIO_API"));
        }
        let (base, size) = (mem.host_addr(), mem.size());
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: base,
                len: size,
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: registers this process's own guest mapping (base..base+size, page
        // aligned, alive as long as `mem`); the struct is properly sized and writable.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER(), &mut reg) } != 0 {
            return Err(os_err("UFFDIO_REGISTER"));
        }
        Ok(MissingPages { fd, base, size })
    }

    /// The guest-physical page address of the next missing-page fault, or `None` when none
    /// came within `timeout`.
    pub fn next_fault(&self, timeout: Duration) -> Result<Option<u64>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        loop {
            // SAFETY: one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n == 0 {
                return Ok(None);
            }
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(os_err("poll"));
            }
            let mut msg = UffdMsg::default();
            // SAFETY: reads at most size_of::<UffdMsg>() bytes into `msg`, which is
            // repr(C) plain data valid for any bit pattern.
            let got = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    (&mut msg as *mut UffdMsg).cast(),
                    std::mem::size_of::<UffdMsg>(),
                )
            };
            if got < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    continue; // another reader took it
                }
                return Err(os_err("read"));
            }
            if got as usize != std::mem::size_of::<UffdMsg>() || msg.event != UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let offset = msg.address.wrapping_sub(self.base);
            if offset >= self.size {
                return Err(Error::Memory(format!(
                    "userfaultfd reported {:#x}, outside guest memory",
                    msg.address
                )));
            }
            return Ok(Some(offset & !(PAGE_SIZE - 1)));
        }
    }

    /// Place `data` (one page) at guest-physical `gpa` and wake whoever waits for it.
    /// Returns false when the page was present already (filled earlier): nothing changed.
    pub fn fill(&self, gpa: u64, data: &[u8]) -> Result<bool> {
        if data.len() as u64 != PAGE_SIZE || !gpa.is_multiple_of(PAGE_SIZE) || gpa >= self.size {
            return Err(Error::Memory(format!(
                "fill of {} bytes at {gpa:#x}: not one page inside guest memory",
                data.len()
            )));
        }
        let mut copy = UffdioCopy {
            dst: self.base + gpa,
            src: data.as_ptr() as u64,
            len: PAGE_SIZE,
            mode: 0,
            copy: 0,
        };
        // SAFETY: dst is one page inside the registered guest mapping (checked above), src
        // is a live, readable page-sized buffer; the kernel copies atomically.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY(), &mut copy) } == 0 {
            return Ok(true);
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EEXIST) => Ok(false),
            _ => Err(os_err("UFFDIO_COPY")),
        }
    }
}
