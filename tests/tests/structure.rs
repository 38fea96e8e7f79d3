//! The shape of the code, checked: no two modules of a crate import each other, and no
//! function outside tests is longer than [`MAX_FUNCTION_LINES`]. Both are read from the
//! sources as text (no build needed), so a failure names the file and line to look at.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Longest function body allowed outside tests, in lines from `fn` to its closing brace.
const MAX_FUNCTION_LINES: usize = 100;

/// The source roots of the crates, relative to the repository.
const CRATE_ROOTS: &[&str] = &[
    "bpf/build/src",
    "bpf/common/src",
    "bpf/xdp/src",
    "daemon/src",
    "proto/src",
    "tests/harness/src",
    "tests/src",
    "tests/stun/src",
    "turn-control/core/src",
    "turn-control/src",
    "xdp-agent/skel/src",
    "xdp-agent/src",
];

fn repository() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/..")).to_path_buf()
}

/// Every `.rs` file below `dir`, sorted.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The top-level module a file of a crate root belongs to (`eventloop.rs` and
/// `bench/raw.rs` -> `eventloop`, `bench`); `None` for the crate roots themselves and for
/// the separate crates under `bin/`.
fn module_of(root: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(root).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    if first == "bin" || first == "main.rs" || first == "lib.rs" {
        return None;
    }
    Some(first.trim_end_matches(".rs").to_owned())
}

/// The text of `source` without its `#[cfg(test)]` modules.
fn without_test_modules(source: &str) -> Vec<(usize, &str)> {
    let lines: Vec<&str> = source.lines().collect();
    let mut kept = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() == "#[cfg(test)]" {
            // Skip the item that follows: a `mod x;` line, or a braced block.
            let mut depth = 0i32;
            let mut opened = false;
            i += 1;
            while i < lines.len() {
                let line = lines[i];
                depth += braces(line);
                opened |= line.contains('{');
                i += 1;
                if (opened && depth <= 0) || (!opened && line.trim_end().ends_with(';')) {
                    break;
                }
            }
            continue;
        }
        kept.push((i + 1, lines[i]));
        i += 1;
    }
    kept
}

/// Opening minus closing braces on a line, ignoring those inside string and char literals
/// and after a `//` comment.
fn braces(line: &str) -> i32 {
    let mut depth = 0;
    let mut in_string = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if in_string => {
                chars.next();
            }
            '"' => in_string = !in_string,
            '/' if !in_string && chars.peek() == Some(&'/') => break,
            '\'' if !in_string => {
                // A char literal such as '{' (a lifetime has no closing quote nearby).
                let rest: String = chars.clone().take(3).collect();
                if rest.len() >= 2 && rest.chars().nth(1) == Some('\'') {
                    chars.next();
                    chars.next();
                }
            }
            '{' if !in_string => depth += 1,
            '}' if !in_string => depth -= 1,
            _ => {}
        }
    }
    depth
}

/// The name of the function a line starts, if it starts one.
fn is_fn_start(line: &str) -> Option<&str> {
    const QUALIFIERS: &[&str] = &[
        "pub(crate) ",
        "pub(super) ",
        "pub ",
        "const ",
        "async ",
        "unsafe ",
        "extern \"C\" ",
    ];
    let mut rest = line.trim_start();
    while let Some(r) = QUALIFIERS.iter().find_map(|q| rest.strip_prefix(q)) {
        rest = r;
    }
    let name = rest.strip_prefix("fn ")?;
    let end = name.find(|c: char| !(c.is_alphanumeric() || c == '_'))?;
    Some(&name[..end])
}

/// Functions longer than the limit: (name, first line, length).
fn long_functions(source: &str) -> Vec<(String, usize, usize)> {
    let lines = without_test_modules(source);
    let mut found = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let (start, line) = lines[i];
        let Some(name) = is_fn_start(line) else {
            i += 1;
            continue;
        };
        let mut depth = 0;
        let mut opened = false;
        let mut j = i;
        while j < lines.len() {
            let text = lines[j].1;
            depth += braces(text);
            opened |= braces_open(text);
            if opened && depth <= 0 {
                break;
            }
            // A declaration without a body (trait method, extern item).
            if !opened && text.trim_end().ends_with(';') {
                break;
            }
            j += 1;
        }
        let end = lines.get(j).map_or(start, |(n, _)| *n);
        let length = end + 1 - start;
        if opened && length > MAX_FUNCTION_LINES {
            found.push((name.to_owned(), start, length));
        }
        // Nested functions are counted as part of their parent.
        i = j + 1;
    }
    found
}

fn braces_open(line: &str) -> bool {
    braces(line) > 0 || (line.contains('{') && line.contains('}'))
}

/// The other top-level modules of the same crate that `source` names through `crate::`.
fn imported_modules(source: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (_, line) in without_test_modules(source) {
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let end = after
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            if end > 0 {
                out.insert(after[..end].to_owned());
            }
            // `use crate::{a, b::c}` names several modules.
            if let Some(group) = after.strip_prefix('{') {
                let group = group.split('}').next().unwrap_or_default();
                for item in group.split(',') {
                    let item = item.trim();
                    let end = item
                        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                        .unwrap_or(item.len());
                    if end > 0 {
                        out.insert(item[..end].to_owned());
                    }
                }
            }
            rest = &after[end..];
        }
    }
    out
}

#[test]
fn no_two_modules_import_each_other() {
    let repo = repository();
    let mut cycles = Vec::new();
    for root in CRATE_ROOTS {
        let root = repo.join(root);
        let mut imports: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in sources(&root) {
            let Some(module) = module_of(&root, &file) else {
                continue;
            };
            let source = std::fs::read_to_string(&file).expect("readable source");
            let mut named = imported_modules(&source);
            named.remove(&module);
            imports.entry(module).or_default().extend(named);
        }
        for (module, named) in &imports {
            for other in named {
                if module < other
                    && imports
                        .get(other)
                        .is_some_and(|theirs| theirs.contains(module))
                {
                    cycles.push(format!("{}: {module} <-> {other}", root.display()));
                }
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "modules that import each other:\n{}",
        cycles.join("\n")
    );
}

#[test]
fn no_function_outside_tests_is_longer_than_the_limit() {
    let repo = repository();
    let mut long = Vec::new();
    for root in CRATE_ROOTS {
        for file in sources(&repo.join(root)) {
            if file.to_string_lossy().ends_with("_tests.rs") {
                continue;
            }
            let source = std::fs::read_to_string(&file).expect("readable source");
            for (name, line, length) in long_functions(&source) {
                long.push(format!(
                    "{}:{line}: fn {name} is {length} lines",
                    file.strip_prefix(&repo).unwrap_or(&file).display()
                ));
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FUNCTION_LINES} lines:\n{}",
        long.join("\n")
    );
}

#[test]
fn the_checks_see_what_they_look_for() {
    let cyclic = "use crate::tcp::TcpEvent;\nfn f() { crate::{udp, metrics::name}; }\n";
    assert_eq!(
        imported_modules(cyclic),
        ["metrics", "tcp", "udp"].map(String::from).into()
    );
    let mut long = String::from("pub fn long() {\n");
    for _ in 0..MAX_FUNCTION_LINES {
        long.push_str("    let _ = \"}\";\n");
    }
    long.push_str("}\nfn short() {}\n#[cfg(test)]\nmod tests {\n    fn also_long() {\n");
    for _ in 0..MAX_FUNCTION_LINES {
        long.push_str("        let _ = '{';\n");
    }
    long.push_str("    }\n}\n");
    let found = long_functions(&long);
    assert_eq!(found, vec![("long".to_owned(), 1, MAX_FUNCTION_LINES + 2)]);
}
