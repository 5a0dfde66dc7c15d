//! The house rules that the compiler does not check, read from the source: the
//! domain is a leaf, only the outer shell reads the configuration, the lower
//! modules point down only, and no source file grows past what a newcomer can read.
//! `ARCHITECTURE.md` draws the layers these rules keep.

use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap_or_else(|e| panic!("{}: {e}", folder.display())) {
            let path = entry.unwrap_or_else(|e| panic!("{}: {e}", folder.display())).path();
            if path.is_dir() {
                folders.push(path);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The code of a file without its comments (a doc comment may name any module).
fn code_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines().filter(|line| !line.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n")
}

/// `crate::<module>` and `pushmatch::<module>` paths (and `tonic`) that `path` names.
fn names(path: &Path, module: &str) -> bool {
    let code = code_of(path);
    if module == "tonic" {
        return code.contains("tonic::") || code.contains("use tonic");
    }
    [format!("crate::{module}"), format!("pushmatch::{module}")].iter().any(|needle| {
        code.match_indices(needle.as_str()).any(|(at, _)| {
            let next = code[at + needle.len()..].chars().next();
            !next.is_some_and(|c| c.is_alphanumeric() || c == '_')
        })
    })
}

fn relative(path: &Path) -> String {
    path.strip_prefix(src()).unwrap_or(path).display().to_string()
}

/// Each module that must not name the others listed beside it.
const FORBIDDEN: &[(&str, &[&str])] = &[
    ("domain", &["api", "broker", "config", "demo", "pb", "phone", "push", "server", "store", "telemetry", "tls", "tonic"]),
    ("push", &["api", "broker", "config", "server", "store", "tls"]),
    ("store", &["api", "broker", "config", "push", "server", "tls"]),
    ("telemetry", &["api", "broker", "config", "push", "server", "store", "tls"]),
    ("tls", &["api", "broker", "config", "push", "server", "store"]),
    ("broker", &["api", "config", "server", "tls", "pb"]),
    ("api", &["config", "server", "store"]),
];

#[test]
fn lower_modules_name_no_outer_module() {
    let mut breaches = Vec::new();
    for (module, outer) in FORBIDDEN {
        let root = src().join(module);
        let mut files = if root.is_dir() { rust_files(&root) } else { Vec::new() };
        files.push(src().join(format!("{module}.rs")));
        for file in files.iter().filter(|f| f.exists()) {
            for name in outer.iter().filter(|name| names(file, name)) {
                breaches.push(format!("{} names {name}", relative(file)));
            }
        }
    }
    assert!(breaches.is_empty(), "arrows must point inward only:\n{}", breaches.join("\n"));
}

#[test]
fn only_main_server_and_demo_read_the_configuration() {
    let allowed = |path: &str| {
        path == "main.rs"
            || path == "demo.rs"
            || path == "config.rs"
            || path.starts_with("server/")
            || path.starts_with("config/")
    };
    let readers: Vec<String> =
        rust_files(&src()).iter().filter(|f| names(f, "config")).map(|f| relative(f)).filter(|f| !allowed(f)).collect();
    assert!(readers.is_empty(), "config is imported only by main.rs, server and the demo; also by: {readers:?}");
}

#[test]
fn the_rule_reader_sees_an_import() {
    // The rules above are only as good as `names`: it must see real imports and
    // ignore look-alikes and comments.
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("sample.rs");
    std::fs::write(&file, "// crate::config in a comment\nuse crate::configuration::X;\nuse crate::config::Config;\n")
        .expect("write");
    assert!(names(&file, "config"));
    std::fs::write(&file, "// crate::config in a comment\nuse crate::configuration::X;\n").expect("write");
    assert!(!names(&file, "config"));
    std::fs::write(&file, "fn f() -> tonic::Status { todo!() }\n").expect("write");
    assert!(names(&file, "tonic"));
}

#[test]
fn no_source_file_is_longer_than_a_newcomer_reads() {
    const MAX_LINES: usize = 600;
    let long: Vec<String> = rust_files(&src())
        .iter()
        .filter_map(|file| {
            let lines = std::fs::read_to_string(file).ok()?.lines().count();
            (lines > MAX_LINES).then(|| format!("{}: {lines} lines", relative(file)))
        })
        .collect();
    assert!(long.is_empty(), "split these files (at most {MAX_LINES} lines each): {long:?}");
}
