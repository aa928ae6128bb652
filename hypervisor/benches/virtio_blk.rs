//! virtio-blk against the physical limit: the test guest's disk workload (4 KiB random write +
//! flush, and 1 MiB sequential writes) on a raw image, against a host process doing the very
//! same operations on the same file (same writes, fdatasyncs, superblock + table writes and
//! read-backs), alternating, in one run. Prints medians, ranges and guest/host ratios.
//!
//! Run: `cargo bench -p tern-hypervisor --bench virtio_blk -- [--dir DATASTORE] [--secs 3]
//! [--reps 3]` (the image is created in DATASTORE, default the system temp dir, and removed).
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};
use tern_hypervisor::devices::virtio::blk::create_image;
use tern_hypervisor::devices::virtio::DiskConfig;
use tern_hypervisor::disk_workload::{disk_word, DiskIo, DiskWorkload};
use tern_hypervisor::{guest_image, Vm, VmConfig, Workload};

const DISK: u64 = 64 << 20;

struct Case {
    name: &'static str,
    io: DiskIo,
    flush_every: u32,
    /// Report bytes/s (MiB/s) instead of writes/s.
    throughput: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "4 KiB random write + flush",
        io: DiskIo::Random,
        flush_every: 1,
        throughput: false,
    },
    Case {
        name: "1 MiB sequential writes (flush per 16 MiB)",
        io: DiskIo::Seq,
        flush_every: 16,
        throughput: true,
    },
];

fn disk_workload(c: &Case) -> DiskWorkload {
    DiskWorkload {
        bytes: DISK,
        iops: 0,
        io: c.io,
        flush_every: c.flush_every,
    }
}

/// Guest: blocks written per second over `secs`, after a warm-up of two flush cycles.
fn guest(path: &Path, c: &Case, secs: u64) -> f64 {
    let mut vm = Vm::new(VmConfig {
        memory: 64 << 20,
        vcpus: 1,
        serial_log: None,
    })
    .expect("create VM");
    vm.attach_disk(&DiskConfig {
        path: path.to_path_buf(),
        read_only: false,
    })
    .expect("attach disk");
    let w = Workload {
        wss: 4096,
        rate: 1,
        disk: disk_workload(c),
        ..Workload::default()
    };
    vm.boot(guest_image::IMAGE, &w.cmdline()).expect("boot");
    let disk = |vm: &Vm| vm.guest_status().map(|s| s.disk).unwrap_or_default();
    let start = Instant::now();
    while disk(&vm).flushed_gen < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "guest made no disk progress"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let (d0, t0) = (disk(&vm), Instant::now());
    std::thread::sleep(Duration::from_secs(secs));
    let (d1, t1) = (disk(&vm), Instant::now());
    vm.pause().expect("pause");
    vm.shutdown();
    assert_eq!(
        (d1.mismatches, d1.io_errors),
        (0, 0),
        "guest disk errors: {d1:?}"
    );
    (d1.written - d0.written) as f64 / (t1 - t0).as_secs_f64()
}

fn fill(buf: &mut [u8], first: u64, gen: u64) {
    for (k, block) in buf.chunks_mut(4096).enumerate() {
        let b = first + k as u64;
        let mut words = [0u64; 512];
        words[0] = b;
        words[1] = gen;
        for (w, v) in words.iter_mut().enumerate().take(511).skip(2) {
            *v = disk_word(b, gen, w as u64);
        }
        let x = words[..511].iter().fold(0, |x, v| x ^ v);
        words[511] = splitmix(x);
        for (dst, w) in block.chunks_mut(8).zip(words) {
            dst.copy_from_slice(&w.to_le_bytes());
        }
    }
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Host: the guest's flush cycles, done by this process on the same file with pwrite,
/// fdatasync and pread. Blocks written per second.
fn host(path: &Path, c: &Case, secs: u64) -> f64 {
    let f: File = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open image");
    let total = DISK / 4096;
    let table = (total + 1023) / 1025;
    let data = total - 1 - table;
    let per_req = if c.throughput { 256 } else { 1 };
    let mut meta = vec![0u8; ((1 + table) * 4096) as usize];
    let mut wbuf = vec![0u8; per_req as usize * 4096];
    let mut rbuf = wbuf.clone();
    let (mut seq, mut prng, mut gen, mut written) = (0u64, 0x9e37_79b9_7f4a_7c15u64, 1u64, 0u64);
    let mut cycle = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        for _ in 0..c.flush_every {
            let first = if c.throughput {
                let f0 = seq;
                seq = if f0 + per_req >= data {
                    0
                } else {
                    f0 + per_req
                };
                f0
            } else {
                prng ^= prng << 13;
                prng ^= prng >> 7;
                prng ^= prng << 17;
                prng % data
            };
            let n = per_req.min(data - first);
            fill(&mut wbuf[..(n * 4096) as usize], first, gen);
            f.write_all_at(&wbuf[..(n * 4096) as usize], (1 + table + first) * 4096)
                .expect("write");
            for k in 0..n {
                let e = (first + k) as usize * 4;
                meta[4096 + e..4096 + e + 4].copy_from_slice(&(gen as u32).to_le_bytes());
            }
            written += n;
            cycle.push((first, n));
        }
        f.sync_data().expect("fdatasync");
        meta[24..32].copy_from_slice(&gen.to_le_bytes());
        f.write_all_at(&meta, 0).expect("write table");
        f.sync_data().expect("fdatasync");
        for (first, n) in cycle.drain(..) {
            let len = (n * 4096) as usize;
            f.read_exact_at(&mut rbuf[..len], (1 + table + first) * 4096)
                .expect("read back");
            fill(&mut wbuf[..len], first, gen);
            assert!(rbuf[..len] == wbuf[..len], "host read back other data");
        }
        gen += 1;
    }
    written as f64 / start.elapsed().as_secs_f64()
}

fn median_range(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let dir = arg("--dir").map_or_else(std::env::temp_dir, Into::into);
    let secs: u64 = arg("--secs").and_then(|s| s.parse().ok()).unwrap_or(3);
    let reps: usize = arg("--reps").and_then(|s| s.parse().ok()).unwrap_or(3);
    if !Vm::available() {
        println!("SKIP: no /dev/kvm");
        return;
    }
    let tmp = tempfile::tempdir_in(&dir).expect("temp dir in the datastore");
    let path = tmp.path().join("bench-disk.img");
    println!(
        "virtio-blk vs host on {} ({} MiB image, {secs} s per run, {reps} runs each, alternating)",
        dir.display(),
        DISK >> 20
    );
    for c in CASES {
        let (mut g, mut h) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            let _ = std::fs::remove_file(&path);
            create_image(&path, DISK).expect("create image");
            g.push(guest(&path, c, secs));
            h.push(host(&path, c, secs));
        }
        let scale = |v: &mut Vec<f64>| {
            if c.throughput {
                v.iter_mut()
                    .for_each(|x| *x = *x * 4096.0 / f64::from(1 << 20));
            }
        };
        scale(&mut g);
        scale(&mut h);
        let unit = if c.throughput { "MiB/s" } else { "writes/s" };
        let (gm, g0, g1) = median_range(&mut g);
        let (hm, h0, h1) = median_range(&mut h);
        println!(
            "{:<44} guest {gm:>9.1} [{g0:.1}..{g1:.1}] {unit}   host {hm:>9.1} [{h0:.1}..{h1:.1}] {unit}   guest/host {:.2}",
            c.name,
            gm / hm
        );
    }
}
