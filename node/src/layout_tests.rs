//! Keeps node/'s layout rule true: the module import graph is acyclic, and no module but the
//! API imports the API module. Reads the sources and collects `crate::X` / `super::X` paths,
//! grouping files by their top-level module (`api/vms.rs` belongs to `api`).
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Graph = BTreeMap<String, BTreeSet<String>>;

/// The API module: the HTTP edge, which only it may know.
const API: &str = "api";

/// Top-level module of a file under src/ and how many `super::` reach the crate root from it
/// (`None` for the crate root itself and for this file).
fn module_of(rel: &Path) -> Option<(String, usize)> {
    let parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    match parts.as_slice() {
        [f] if f == "lib" || f == "layout_tests" => None,
        [f] => Some((f.clone(), 1)),
        [dir, f] if f == "mod" => Some((dir.clone(), 1)),
        [dir, rest @ ..] => Some((dir.clone(), rest.len())),
        [] => None,
    }
}

/// First identifiers of the paths after `prefix` in `src`: `crate::a::B` gives `a`,
/// `crate::{a, b::C}` gives `a` and `b`.
fn targets(src: &str, prefix: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = Vec::new();
    for (i, _) in src.match_indices(prefix) {
        let before = src[..i].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue; // part of a longer path, e.g. `super::super::`
        }
        let rest = &src[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push(ident(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            out.push(ident(&item));
        } else {
            out.push(ident(rest));
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

fn strip_comments(src: &str) -> String {
    src.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn rs_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let entries = std::fs::read_dir(dir).expect("read node/src");
    for e in entries {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module graph of node/src: top-level module -> the top-level modules it imports.
fn module_graph() -> Graph {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rs_files(&root, &mut files);
    let modules: BTreeSet<String> = files
        .iter()
        .filter_map(|f| module_of(f.strip_prefix(&root).ok()?))
        .map(|(m, _)| m)
        .collect();
    let mut graph = Graph::new();
    for f in &files {
        let Some((module, depth)) = f.strip_prefix(&root).ok().and_then(module_of) else {
            continue;
        };
        let src = strip_comments(&std::fs::read_to_string(f).expect("read source"));
        let to_root = "super::".repeat(depth);
        let mut refs = targets(&src, "crate::");
        refs.extend(targets(&src, &to_root));
        let edges = graph.entry(module.clone()).or_default();
        for r in refs {
            if r != module && modules.contains(&r) {
                edges.insert(r);
            }
        }
    }
    graph
}

/// A cycle in `graph` as the path of modules around it, if there is one.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        graph: &Graph,
        node: &str,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == node) {
            let mut cycle = stack[i..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(graph, next, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(graph, n, &mut Vec::new(), &mut done))
}

#[test]
fn the_module_graph_has_no_cycle() {
    let graph = module_graph();
    assert!(graph.len() > 10, "too few modules found: {graph:?}");
    assert!(
        graph["controller"].contains("drs"),
        "the scan misses imports: {graph:?}"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!("node/ modules import each other: {}", cycle.join(" -> "));
    }
}

#[test]
fn no_module_imports_the_api() {
    let importers: Vec<String> = module_graph()
        .into_iter()
        .filter(|(m, deps)| m != API && deps.contains(API))
        .map(|(m, _)| m)
        .collect();
    assert!(
        importers.is_empty(),
        "only the API module may know the API: {importers:?} import it"
    );
}

#[test]
fn the_scan_finds_grouped_paths_and_cycles() {
    let src = "use crate::{a, b::{C, D}, c::E};\nuse super::d::F;\nfn x() { super::super::e::g() }";
    assert_eq!(targets(src, "crate::"), ["a", "b", "c"]);
    assert_eq!(targets(src, "super::"), ["d", "super"]);
    assert_eq!(targets(src, "super::super::"), ["e"]);
    let mut g = Graph::new();
    g.entry("x".into()).or_default().insert("y".into());
    g.entry("y".into()).or_default().insert("z".into());
    assert_eq!(find_cycle(&g), None);
    g.entry("z".into()).or_default().insert("x".into());
    assert_eq!(
        find_cycle(&g).map(|c| c.len()),
        Some(4),
        "x -> y -> z -> x is a cycle"
    );
}
