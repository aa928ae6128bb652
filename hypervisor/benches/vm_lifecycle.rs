//! VM lifecycle figures on this host's KVM with the test guest: boot to first progress,
//! pause and resume latency, save and restore of a 1 GiB guest with 256 MiB touched.
//! Run: `cargo bench -p tern-hypervisor --bench vm_lifecycle`
use std::time::{Duration, Instant};
use tern_hypervisor::{guest_image, Vm, VmConfig, VmState, Workload, PAGE_SIZE};

fn vm(memory: u64, vcpus: usize) -> Vm {
    Vm::new(VmConfig {
        memory,
        vcpus,
        serial_log: None,
    })
    .expect("create VM")
}

fn written(vm: &Vm) -> u64 {
    vm.guest_status().map_or(0, |s| s.pages_written)
}

fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "timeout: {what}"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn stats(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{name:<40} n={:<3} min {:>8.3} ms  median {:>8.3} ms  max {:>8.3} ms",
        v.len(),
        ms(v[0]),
        ms(v[v.len() / 2]),
        ms(v[v.len() - 1])
    );
}

fn main() {
    if !Vm::available() {
        println!("SKIP: no /dev/kvm");
        return;
    }
    let w: Workload = "wss=64M,rate=0,pattern=seq".parse().unwrap();

    let (mut create, mut boot) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        let mut v = vm(512 << 20, 1);
        create.push(t.elapsed());
        let t = Instant::now();
        v.boot(guest_image::IMAGE, &w.cmdline()).unwrap();
        wait("first progress", || written(&v) > 0);
        boot.push(t.elapsed());
    }
    stats("Vm::new (512 MiB, 1 vCPU)", create);
    stats("boot to first page written", boot);

    let mut v = vm(512 << 20, 2);
    v.boot(guest_image::IMAGE, &w.cmdline()).unwrap();
    wait("progress", || written(&v) > 1000);
    let (mut pause, mut resume) = (Vec::new(), Vec::new());
    for _ in 0..30 {
        pause.push(v.pause().unwrap());
        let before = v.guest_status().unwrap().heartbeat;
        let t = Instant::now();
        v.resume().unwrap();
        wait("heartbeat after resume", || {
            v.guest_status().is_ok_and(|s| s.heartbeat > before)
        });
        resume.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    stats("pause (2 vCPUs parked)", pause);
    stats("resume to next guest heartbeat", resume);
    drop(v);

    let w: Workload = "wss=256M,rate=0,pattern=seq".parse().unwrap();
    let mut src = vm(1 << 30, 1);
    src.boot(guest_image::IMAGE, &w.cmdline()).unwrap();
    wait("256 MiB written", || {
        written(&src) >= w.wss / PAGE_SIZE + 1000
    });
    src.pause().unwrap();
    let t = Instant::now();
    let blob = src.save_state().unwrap().to_bytes().unwrap();
    let save = t.elapsed();
    let t = Instant::now();
    let touched = src.memory().touched_bitmap().unwrap();
    let scan = t.elapsed();
    let mut dst = vm(1 << 30, 1);
    let t = Instant::now();
    let mut page = [0u8; PAGE_SIZE as usize];
    let mut copied = 0u64;
    for p in 0..src.memory().page_count() {
        if touched[(p / 64) as usize] & (1 << (p % 64)) != 0 {
            src.memory().read_page(p, &mut page).unwrap();
            dst.memory().write_page(p, &page).unwrap();
            copied += 1;
        }
    }
    let copy = t.elapsed();
    let t = Instant::now();
    let state = VmState::from_bytes(&blob).unwrap();
    dst.restore_state(&state).unwrap();
    let restore = t.elapsed();
    let before = written(&dst);
    let t = Instant::now();
    dst.resume().unwrap();
    wait("progress after restore", || written(&dst) > before);
    let first = t.elapsed();
    let st = dst.guest_status().unwrap();
    assert_eq!(st.mismatches, 0);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "save/restore 1 GiB guest, {} MiB touched ({} pages copied):",
        (copied * PAGE_SIZE) >> 20,
        copied
    );
    println!(
        "  save_state + encode        {:>8.3} ms ({} KiB blob)",
        ms(save),
        blob.len() / 1024
    );
    println!("  touched-page scan (mincore) {:>8.3} ms", ms(scan));
    println!(
        "  memory copy                {:>8.3} ms ({:.0} MiB/s)",
        ms(copy),
        (copied * PAGE_SIZE) as f64 / (1 << 20) as f64 / copy.as_secs_f64()
    );
    println!("  decode + restore_state     {:>8.3} ms", ms(restore));
    println!("  resume to next page write  {:>8.3} ms", ms(first));
    println!("  mismatches after restore   {}", st.mismatches);
}
