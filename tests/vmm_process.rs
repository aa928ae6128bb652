//! End-to-end: `tern vmm` processes on real KVM, driven through their control sockets.
mod support;
use support::{kvm_or_skip, wait_for};

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tern_hypervisor::vmm::lease::{self, Lease};
use tern_hypervisor::vmm::protocol::{encode_request, read_frame, write_frame, Tuning};
use tern_hypervisor::vmm::{Client, ClientError, GateDecision, Request, Response, VmmState};

const WORKLOAD: &str = "wss=16M,rate=5000,pattern=random,duty=50";

/// A `tern vmm` process; killed (by pid) if still alive when dropped.
struct VmmProc {
    child: Child,
    dir: PathBuf,
}

impl VmmProc {
    fn start(dir: &Path, name: &str, extra: &[&str]) -> VmmProc {
        let child = Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["vmm", "--name", name, "--run-dir"])
            .arg(dir)
            .args(["--memory", "128M", "--workload", WORKLOAD])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tern vmm");
        VmmProc {
            child,
            dir: dir.to_path_buf(),
        }
    }

    /// Wait until the control socket answers.
    fn ready(self) -> VmmProc {
        let sock = self.dir.join("ctl.sock");
        wait_for("the VMM's control socket", Duration::from_secs(20), || {
            Client::connect(&sock, Duration::from_secs(5))
                .and_then(|mut c| c.status())
                .ok()
        });
        self
    }

    fn client(&self) -> Client {
        Client::connect(&self.dir.join("ctl.sock"), Duration::from_secs(10)).expect("connect")
    }

    fn exit_code(&mut self) -> (i32, String) {
        let status = wait_for("the VMM to exit", Duration::from_secs(20), || {
            self.child.try_wait().ok().flatten()
        });
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        (status.code().unwrap_or(-1), err)
    }
}

impl Drop for VmmProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pages_written(c: &mut Client) -> u64 {
    c.status().unwrap().guest.map_or(0, |g| g.pages_written)
}

/// Wait until the guest has written more pages than `than`.
fn progresses(c: &mut Client, than: u64) -> u64 {
    wait_for("guest progress", Duration::from_secs(20), || {
        let n = pages_written(c);
        (n > than).then_some(n)
    })
}

#[test]
fn vmm_status_pause_resume_stop() {
    if !kvm_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let lease_path = tmp.path().join("lease");
    lease::write(&lease_path, Lease { owner: 7, epoch: 3 }).unwrap();
    let vmm = VmmProc::start(
        &dir,
        "alpha",
        &[
            "--owner",
            "7",
            "--epoch",
            "3",
            "--lease",
            lease_path.to_str().unwrap(),
        ],
    )
    .ready();
    let sock = dir.join("ctl.sock");
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let pid: u32 = std::fs::read_to_string(dir.join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, vmm.child.id());

    let mut c = vmm.client();
    let st = c.status().unwrap();
    assert_eq!(st.state, VmmState::Running);
    assert_eq!((st.owner, st.epoch, st.name.as_str()), (7, 3, "alpha"));
    let n = progresses(&mut c, 0);
    // Load figures arrive from the once-a-second sampler.
    wait_for("load figures", Duration::from_secs(10), || {
        let l = c.status().unwrap().load;
        (l.vcpu_cpu_ns > 0 && l.touched_bytes > 0).then_some(())
    });

    c.pause().unwrap();
    assert_eq!(c.status().unwrap().state, VmmState::Paused);
    let held = pages_written(&mut c);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(pages_written(&mut c), held, "a paused guest wrote pages");
    assert!(held >= n);
    // Pausing twice is refused with a reason, and changes nothing.
    let e = c.pause().unwrap_err();
    assert!(e.to_string().contains("Paused"), "{e}");

    c.resume().unwrap();
    progresses(&mut c, held);
    let g = c.status().unwrap().guest.unwrap();
    assert_eq!(g.mismatches, 0);

    // A second VMM cannot take over a run directory whose VMM is alive.
    let mut second = VmmProc::start(&dir, "alpha", &[]);
    let (code, err) = second.exit_code();
    assert_ne!(code, 0);
    assert!(err.contains("already runs"), "{err}");

    c.stop().unwrap();
    let mut vmm = vmm;
    let (code, err) = vmm.exit_code();
    assert_eq!(code, 0, "{err}");
    assert!(!sock.exists(), "the socket outlived the VMM");
    let exit: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("exit.json")).unwrap()).unwrap();
    assert_eq!(exit["state"], "stopped");
}

#[test]
fn vmm_with_a_stale_epoch_refuses_to_run() {
    if !kvm_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let lease_path = tmp.path().join("lease");
    lease::write(&lease_path, Lease { owner: 1, epoch: 5 }).unwrap();
    let lease_arg = lease_path.to_str().unwrap();
    for (owner, epoch, why) in [("1", "4", "stale epoch"), ("2", "5", "names host 1")] {
        let dir = tmp.path().join(format!("run-{owner}-{epoch}"));
        let mut vmm = VmmProc::start(
            &dir,
            "beta",
            &["--owner", owner, "--epoch", epoch, "--lease", lease_arg],
        );
        let (code, err) = vmm.exit_code();
        assert_ne!(code, 0);
        assert!(err.contains(why), "{err}");
        let exit: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("exit.json")).unwrap()).unwrap();
        assert_eq!(exit["state"], "failed");
        assert!(exit["error"].as_str().unwrap().contains(why));
        assert!(!dir.join("ctl.sock").exists());
    }
}

/// Send raw bytes as one connection; return the reply frame's JSON, if any came back.
fn raw(sock: &Path, bytes: &[u8]) -> Option<serde_json::Value> {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let body = read_frame(&mut s).ok()??;
    Some(serde_json::from_slice(&body).unwrap())
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_frame(&mut out, body).unwrap();
    out
}

#[test]
fn malformed_control_messages_get_errors_and_the_vmm_keeps_running() {
    if !kvm_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let vmm = VmmProc::start(&dir, "gamma", &[]).ready();
    let sock = dir.join("ctl.sock");
    let mut c = vmm.client();
    let before = progresses(&mut c, 0);

    let cases: [(&str, Vec<u8>, &str); 6] = [
        ("garbage", framed(b"\x00\xffnot json"), "malformed"),
        (
            "unknown version",
            framed(br#"{"version":99,"request":{"op":"status"}}"#),
            "version 99",
        ),
        (
            "unknown op",
            framed(br#"{"version":1,"request":{"op":"format_disk"}}"#),
            "malformed",
        ),
        (
            "bad field",
            framed(br#"{"version":1,"request":{"op":"wait_gate","timeout_ms":-1}}"#),
            "malformed",
        ),
        ("huge length", vec![0xff, 0xff, 0xff, 0xff, b'{'], "exceeds"),
        (
            "gate with no migration",
            framed(&encode_request(&Request::Gate {
                decision: GateDecision::Committed,
            })),
            "no switchover",
        ),
    ];
    for (what, bytes, expect) in cases {
        let reply = raw(&sock, &bytes).unwrap_or_else(|| panic!("{what}: no reply"));
        let err = reply["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: {reply}"));
        assert!(err.contains(expect), "{what}: {err}");
        assert_eq!(reply["version"], 1);
    }
    // A truncated frame (length says 100, 5 bytes come) is answered and ends that connection.
    for bytes in [&[0, 0, 0, 100, b'{', b'"', b'v', b'e', b'r'][..], &[0, 0]] {
        let reply = raw(&sock, bytes).expect("a reply to a truncated frame");
        assert!(reply["error"].is_string(), "{reply}");
    }

    // A malformed message does not end a connection whose frames can still be trusted.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(&framed(b"[1,2,3]")).unwrap();
    let r: serde_json::Value =
        serde_json::from_slice(&read_frame(&mut s).unwrap().unwrap()).unwrap();
    assert!(r["error"].is_string());
    s.write_all(&framed(&encode_request(&Request::Status)))
        .unwrap();
    let r: serde_json::Value =
        serde_json::from_slice(&read_frame(&mut s).unwrap().unwrap()).unwrap();
    assert_eq!(r["ok"]["kind"], "status");

    // Wrong-state requests are refused with a reason too.
    assert!(matches!(c.resume(), Err(ClientError::Refused(_))));
    assert!(matches!(c.cancel(), Err(ClientError::Refused(_))));
    let expected = c.status().unwrap().spec.unwrap();
    let recv = c.call(&Request::Receive {
        listen: "127.0.0.1:0".parse().unwrap(),
        token: String::new(),
        expected: Box::new(expected),
        epoch: 1,
        accept_timeout_ms: None,
    });
    assert!(matches!(recv, Err(ClientError::Refused(_))), "{recv:?}");

    // Still running, still verifying, nothing changed.
    let st = c.status().unwrap();
    assert_eq!(st.state, VmmState::Running);
    assert_eq!(st.epoch, 0);
    progresses(&mut c, before);
    assert_eq!(c.status().unwrap().guest.unwrap().mismatches, 0);
    c.stop().unwrap();
}

/// Start a receiving VMM for `spec` and return it with the address it listens on.
fn receiver(
    dir: &Path,
    lease_path: &Path,
    spec: &tern_hypervisor::vmm::VmSpec,
    epoch: u64,
) -> (VmmProc, std::net::SocketAddr) {
    let dest = VmmProc::start(
        dir,
        &spec.name,
        &[
            "--receive",
            "--owner",
            "2",
            "--lease",
            lease_path.to_str().unwrap(),
        ],
    )
    .ready();
    let reply = dest
        .client()
        .call(&Request::Receive {
            listen: "127.0.0.1:0".parse().unwrap(),
            token: "secret".into(),
            expected: Box::new(spec.clone()),
            epoch,
            accept_timeout_ms: Some(20_000),
        })
        .unwrap();
    let Response::Listening { addr } = reply else {
        panic!("{reply:?}")
    };
    (dest, addr)
}

fn migrate_out(c: &mut Client, addr: std::net::SocketAddr) {
    let r = c
        .call(&Request::MigrateOut {
            dest: addr,
            token: "secret".into(),
            tuning: Tuning::default(),
        })
        .unwrap();
    assert_eq!(r, Response::Done);
}

fn at_gate(c: &mut Client) {
    let m = c.wait_gate(Duration::from_secs(30)).unwrap();
    assert!(m.gate_pending, "{m:?}");
    assert_eq!(c.status().unwrap().state, VmmState::AtGate);
    // While the gate waits, cancel is refused: only the supervisor's decision ends it.
    assert!(c.cancel().is_err());
}

#[test]
fn live_migration_between_vmm_processes_waits_for_the_gate() {
    if !kvm_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let lease_path = tmp.path().join("lease");
    lease::write(&lease_path, Lease { owner: 1, epoch: 0 }).unwrap();
    let src = VmmProc::start(
        &tmp.path().join("src"),
        "delta",
        &["--owner", "1", "--lease", lease_path.to_str().unwrap()],
    )
    .ready();
    let mut c = src.client();
    progresses(&mut c, 0);
    let spec = c.status().unwrap().spec.unwrap();

    // Refused at the gate: the source resumes and its guest keeps verifying.
    let (mut dest, addr) = receiver(&tmp.path().join("dst1"), &lease_path, &spec, 1);
    migrate_out(&mut c, addr);
    at_gate(&mut c);
    let held = pages_written(&mut c);
    c.gate(GateDecision::Unknown).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        c.status().unwrap().state,
        VmmState::AtGate,
        "unknown must stay paused"
    );
    assert_eq!(pages_written(&mut c), held);
    c.gate(GateDecision::Refused {
        reason: "commit refused".into(),
        epoch: None,
    })
    .unwrap();
    let m = c.wait_gate(Duration::from_secs(10)).unwrap();
    assert!(
        m.finished && m.error.as_deref().unwrap_or("").contains("commit refused"),
        "{m:?}"
    );
    assert_eq!(c.status().unwrap().state, VmmState::Running);
    progresses(&mut c, held);
    assert_eq!(c.status().unwrap().guest.unwrap().mismatches, 0);
    // The destination never ran the VM.
    let d = wait_for(
        "the destination to give up",
        Duration::from_secs(20),
        || {
            let s = dest.client().status().ok()?;
            (s.state == VmmState::Failed).then_some(s)
        },
    );
    assert!(d.guest.is_none());
    dest.client().stop().unwrap();
    assert_eq!(dest.exit_code().0, 1);

    // Committed: the destination resumes (once its lease says so) with the source's memory.
    let (dest, addr) = receiver(&tmp.path().join("dst2"), &lease_path, &spec, 1);
    migrate_out(&mut c, addr);
    at_gate(&mut c);
    let at_pause = pages_written(&mut c);
    lease::write(&lease_path, Lease { owner: 2, epoch: 1 }).unwrap();
    c.gate(GateDecision::Committed).unwrap();
    let m = c.wait_gate(Duration::from_secs(20)).unwrap();
    assert!(m.finished && m.error.is_none(), "{m:?}");
    assert!(m.stats.unwrap().bytes > 0);
    let st = c.status().unwrap();
    assert_eq!(st.state, VmmState::MigratedAway);
    assert!(st.guest.is_none());

    let mut d = dest.client();
    let ds = wait_for("the destination to run", Duration::from_secs(20), || {
        let s = d.status().ok()?;
        (s.state == VmmState::Running).then_some(s)
    });
    assert_eq!((ds.owner, ds.epoch), (2, 1));
    let g = ds.guest.unwrap();
    assert!(
        g.pages_written >= at_pause,
        "{} < {at_pause}",
        g.pages_written
    );
    progresses(&mut d, g.pages_written);
    let g = d.status().unwrap().guest.unwrap();
    assert_eq!(g.mismatches, 0);
    assert!(g.pages_verified > 0);
    d.stop().unwrap();
    c.stop().unwrap();
}

#[test]
fn vmm_outlives_its_parents_process_group() {
    if !kvm_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    // A stand-in for `tern node`: a shell in its own process group that starts the VMM.
    let mut parent = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} vmm --name eps --run-dir {} --memory 128M --workload {WORKLOAD} \
             >/dev/null 2>&1 & sleep 600",
            env!("CARGO_BIN_EXE_tern"),
            dir.display()
        ))
        .process_group(0)
        .spawn()
        .unwrap();
    let pid: u32 = wait_for("the VMM's pid file", Duration::from_secs(20), || {
        std::fs::read_to_string(dir.join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    });
    let _reap = KillOnDrop(pid);
    let sock = dir.join("ctl.sock");
    let mut c = Client::connect(&sock, Duration::from_secs(10)).unwrap();
    let n = progresses(&mut c, 0);
    let group = format!("-{}", parent.id());
    let killed = Command::new("kill")
        .args(["-9", "--", &group])
        .status()
        .unwrap();
    assert!(killed.success());
    let _ = parent.wait();
    // The VM runs on, untouched.
    progresses(&mut c, n);
    assert_eq!(c.status().unwrap().pid, pid);
    c.stop().unwrap();
    wait_for("the VMM to exit", Duration::from_secs(20), || {
        (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    });
}

/// Kills a process this test started indirectly (by pid), should the test fail before it ends.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if Path::new(&format!("/proc/{}", self.0)).exists() {
            let _ = Command::new("kill")
                .args(["-9", &self.0.to_string()])
                .status();
        }
    }
}
