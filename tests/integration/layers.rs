//! The library's layers point one way: cli → runner → report/suite → backend/measure →
//! model → scheme → tensor, with the leaf utilities (error, files, hash, profile,
//! interrupt, inputs) open to all. Read from every `crate::` path in the sources, tests
//! included, so a wrong-way import fails here before it tangles the modules.

use std::collections::BTreeMap;
use std::path::Path;

use crate::support::root;

/// Each top-level module's layer: a module may reach lower layers, never a higher one nor
/// the other module of its own layer (report and suite, backend and measure stay apart).
const LAYERS: [(&str, u32); 15] = [
    ("cli", 7),
    ("runner", 6),
    ("report", 5),
    ("suite", 5),
    ("backend", 4),
    ("measure", 4),
    ("model", 3),
    ("scheme", 2),
    ("tensor", 1),
    ("error", 0),
    ("files", 0),
    ("hash", 0),
    ("profile", 0),
    ("interrupt", 0),
    ("inputs", 0),
];

fn layer(name: &str) -> Option<u32> {
    LAYERS.iter().find(|(n, _)| *n == name).map(|(_, l)| *l)
}

/// The top-level modules named by the `crate::` paths of `source`, grouped imports
/// (`crate::{a::b, c}`) included.
fn reached(source: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        rest = &group[i..];
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && (c.is_alphabetic() || c == '_') => {
                        let ident: String =
                            group[i..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                        out.push(ident);
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.push(rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect());
        }
    }
    out
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn imports_follow_the_layers() {
    let src = root().join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut wrong: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let top = relative.iter().next().unwrap().to_string_lossy().trim_end_matches(".rs").to_string();
        let Some(from) = layer(&top) else { continue }; // lib.rs, main.rs, bin/
        let text = std::fs::read_to_string(&file).unwrap();
        // The CUDA backend is reached through backend/ (its device type and placement).
        if top != "backend" && text.contains("crate::backend::cuda") {
            wrong.entry(relative.display().to_string()).or_default().push("backend::cuda".into());
        }
        for to in reached(&text) {
            let Some(target) = layer(&to) else { continue };
            let upward = target > from || (target == from && to != top && from > 0);
            if upward {
                wrong.entry(relative.display().to_string()).or_default().push(to);
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the layers (file → modules): {wrong:#?}");
}

#[test]
fn grouped_and_inline_paths_are_both_read() {
    let text = "use crate::{error::Result, model::{a, b}, tensor};\nlet x = crate::scheme::lookup(y);";
    assert_eq!(reached(text), ["error", "model", "tensor", "scheme"]);
}
