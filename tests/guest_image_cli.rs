//! `tern guest-image --out FILE` writes exactly the embedded, valid multiboot image.
use std::path::PathBuf;
use std::process::Command;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tern-guest-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn guest_image_writes_the_embedded_image() {
    let dir = scratch("ok");
    let out = dir.join("guest.elf");
    let st = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["guest-image", "--out"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    let written = std::fs::read(&out).unwrap();
    assert_eq!(written, tern_hypervisor::guest_image::IMAGE);
    tern_hypervisor::guest_image::multiboot_header(&written).expect("valid multiboot image");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn guest_image_reports_an_unwritable_path() {
    let dir = scratch("bad");
    let out = dir.join("no-such-dir").join("guest.elf");
    let o = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["guest-image", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cannot write the guest image"),
        "stderr: {err}"
    );
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
