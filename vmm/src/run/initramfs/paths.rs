//! Guest paths: normalized, split and joined as the archive needs them.

use super::*;

/// `path` as an absolute guest path with no `.`, `..` or empty components
/// (`..` at the root stays at the root); `/` for the root.
pub fn normalize_guest_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    let mut out = String::with_capacity(path.len() + 1);
    for p in &parts {
        out.push('/');
        out.push_str(p);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// The parent and last component of a normalized path other than `/`.
pub(super) fn split_path(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(0) => ("/", &path[1..]),
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("/", path),
    }
}

pub(super) fn join_path(parent: &str, name: &str) -> String {
    if parent == "/" {
        format!("/{name}")
    } else {
        format!("{parent}/{name}")
    }
}

pub(super) fn path_str(path: &Path) -> Result<&str, InitramfsError> {
    path.to_str().ok_or_else(|| InitramfsError::NotUtf8 {
        path: path.to_path_buf(),
    })
}
