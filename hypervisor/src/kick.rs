//! Getting a vCPU thread out of KVM_RUN: a real-time signal whose handler sets the thread's
//! `kvm_run.immediate_exit`. A kick that lands before KVM_RUN makes the next KVM_RUN return
//! at once; one that lands inside makes it return with EINTR. Nobody spins.
use kvm_bindings::kvm_run;
use std::cell::Cell;
use std::sync::Once;

thread_local! {
    /// The calling vCPU thread's kvm_run page (null on other threads).
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

fn signal() -> libc::c_int {
    libc::SIGRTMIN() + 3
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // try_with: a const-initialised thread local without destructor is safe to read here.
    let _ = KVM_RUN.try_with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: `p` is this thread's mapped kvm_run page, registered by `register` and
            // valid until `unregister`; a single byte store is async-signal-safe.
            unsafe { std::ptr::addr_of_mut!((*p).immediate_exit).write_volatile(1) };
        }
    });
}

/// Installs the signal handler once per process.
pub(crate) fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; we fill handler and flags. No SA_RESTART so
        // KVM_RUN returns EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(signal(), &sa, std::ptr::null_mut());
        }
    });
}

/// Registers the calling thread's kvm_run page for the handler.
pub(crate) fn register(run: *mut kvm_run) {
    KVM_RUN.with(|p| p.set(run));
}

pub(crate) fn unregister() {
    KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
}

/// Sends the kick to `thread`.
pub(crate) fn kick(thread: libc::pthread_t) {
    // SAFETY: `thread` is a live vCPU thread (joined only after its last kick).
    unsafe { libc::pthread_kill(thread, signal()) };
}
