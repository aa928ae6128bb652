//! Builds the test guest (hypervisor/guest/) from source with the system's gcc, as and ld
//! (binutils) into `$OUT_DIR/guest.elf`, which `guest_image::IMAGE` embeds.

use std::path::PathBuf;
use std::process::Command;

const SOURCES: &[&str] = &["boot.S", "kernel.c", "workload.c", "disk.c"];
const HEADERS: &[&str] = &["guest.h", "disk.h", "layout.h", "link.ld"];

const CFLAGS: &[&str] = &[
    "-m64",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-mcmodel=small",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fcf-protection=none",
    "-fno-builtin",
    "-nostdinc",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
];

fn main() {
    let manifest =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let src = manifest.join("guest");
    for f in SOURCES.iter().chain(HEADERS) {
        println!("cargo:rerun-if-changed=guest/{f}");
    }
    println!("cargo:rerun-if-changed=build.rs");

    for tool in ["gcc", "as", "ld"] {
        if Command::new(tool).arg("--version").output().is_err() {
            fail(&format!(
                "`{tool}` not found: the test guest is built from source with gcc and binutils \
                 (as, ld); install them (Debian: apt-get install gcc binutils)"
            ));
        }
    }

    let mut objects = Vec::new();
    for f in SOURCES {
        let obj = out.join(format!("{f}.o"));
        let mut cmd = Command::new("gcc");
        cmd.args(CFLAGS)
            .arg("-I")
            .arg(&src)
            .arg("-c")
            .arg(src.join(f))
            .arg("-o")
            .arg(&obj);
        run(cmd, f);
        objects.push(obj);
    }
    let image = out.join("guest.elf");
    let mut ld = Command::new("ld");
    ld.args([
        "-m",
        "elf_x86_64",
        "-nostdlib",
        "-static",
        "--build-id=none",
    ])
    .args(["-z", "max-page-size=0x1000", "-z", "noexecstack"])
    .arg("-T")
    .arg(src.join("link.ld"))
    .arg("-o")
    .arg(&image)
    .args(&objects);
    run(ld, "guest.elf");
}

fn run(mut cmd: Command, what: &str) {
    match cmd.output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => fail(&format!(
            "building the test guest ({what}) failed: {:?}\n{}{}",
            cmd,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) => fail(&format!("cannot run {:?}: {e}", cmd.get_program())),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("error: tern-hypervisor build: {msg}");
    std::process::exit(1);
}
