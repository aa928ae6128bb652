//! Bad snapshots are rejected with an error naming what is wrong.
use tern_scheduler::{Cluster, SnapshotError};

fn err(text: &str) -> String {
    match Cluster::from_json(text) {
        Ok(_) => panic!("accepted a bad snapshot: {text}"),
        Err(e) => e.to_string(),
    }
}

const HOST: &str = r#"{"id":"h1","cpu_mhz":1000,"memory_mib":4096}"#;

#[test]
fn malformed_json_gives_its_position() {
    let e = Cluster::from_json("{\n  \"hosts\": [\n    {\"id\": }\n").unwrap_err();
    match e {
        SnapshotError::Json { line, .. } => assert_eq!(line, 3),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_host_is_named() {
    let e = err(&format!(
        r#"{{"hosts":[{HOST}],"vms":[{{"id":"v1","host":"h9","memory_mib":512}}]}}"#
    ));
    assert!(
        e.contains("vm \"v1\"") && e.contains("unknown host id \"h9\""),
        "{e}"
    );
}

#[test]
fn duplicate_ids_are_named() {
    let e = err(&format!(r#"{{"hosts":[{HOST},{HOST}],"vms":[]}}"#));
    assert!(e.contains("duplicate host id \"h1\""), "{e}");
    let e = err(&format!(
        r#"{{"hosts":[{HOST}],"vms":[{{"id":"v","host":"h1","memory_mib":1}},{{"id":"v","host":"h1","memory_mib":1}}]}}"#
    ));
    assert!(e.contains("duplicate vm id \"v\""), "{e}");
}

#[test]
fn negative_capacity_is_rejected() {
    let e = err(r#"{"hosts":[{"id":"h1","cpu_mhz":-5,"memory_mib":4096}],"vms":[]}"#);
    assert!(
        e.contains("host \"h1\"") && e.contains("cpu_mhz is -5"),
        "{e}"
    );
    let e = err(r#"{"hosts":[{"id":"h1","cpu_mhz":5,"memory_mib":0}],"vms":[]}"#);
    assert!(e.contains("memory_mib must be greater than zero"), "{e}");
}

#[test]
fn unknown_field_is_named() {
    let e = err(&format!(r#"{{"hosts":[{HOST}],"vms":[],"hostz":[]}}"#));
    assert!(e.contains("hostz") && e.contains("line 1"), "{e}");
}

#[test]
fn rules_pools_and_in_flight_are_checked() {
    let base = format!(r#""hosts":[{HOST}],"vms":[{{"id":"v1","host":"h1","memory_mib":1}}]"#);
    let e = err(&format!(
        r#"{{{base},"rules":[{{"kind":"separate","id":"r","vms":["v1","v2"]}}]}}"#
    ));
    assert!(
        e.contains("rule \"r\"") && e.contains("unknown vm id \"v2\""),
        "{e}"
    );
    let e = err(&format!(
        r#"{{{base},"rules":[{{"kind":"vm_host","id":"r","vms":["v1"],"group":"g","mode":"must_run_on"}}]}}"#
    ));
    assert!(e.contains("unknown host group id \"g\""), "{e}");
    let e = err(&format!(
        r#"{{{base},"pools":[{{"id":"a","parent":"b"}},{{"id":"b","parent":"a"}}]}}"#
    ));
    assert!(e.contains("cycle"), "{e}");
    let e = err(&format!(
        r#"{{{base},"in_flight":[{{"vm":"v1","to":"h1"}}]}}"#
    ));
    assert!(e.contains("already runs on"), "{e}");
    let e = err(&format!(
        r#"{{"hosts":[{HOST}],"vms":[{{"id":"v1","host":"h1","memory_mib":1,"cpu":{{"reservation":10,"limit":5}}}}]}}"#
    ));
    assert!(e.contains("reservation 10 is above its limit 5"), "{e}");
}
