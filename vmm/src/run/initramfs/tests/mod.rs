//! Tests of the initramfs: the plan, the archive, initrds, modules, libraries.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};

use super::*;

/// The test images of the repository (built by resources/, not always
/// there).
fn images() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/images")
}

fn image(name: &str) -> Option<PathBuf> {
    let p = images().join(name);
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "SKIPPED: {} is missing (build the test images)",
            p.display()
        );
        None
    }
}

/// One parsed archive entry: name, mode, rdev, data.
type Parsed = (String, u32, (u32, u32), Vec<u8>);

/// Every entry of an archive, with the cpio crate's reader; the trailer
/// last, nothing after it.
fn parse(archive: &[u8]) -> Vec<Parsed> {
    let mut out = Vec::new();
    let mut rest = archive;
    loop {
        let mut r = newc::Reader::new(rest).unwrap();
        let e = r.entry().clone();
        let mut data = Vec::new();
        r.read_to_end(&mut data).unwrap();
        rest = r.finish().unwrap();
        out.push((
            e.name().to_string(),
            e.mode(),
            (e.rdev_major(), e.rdev_minor()),
            data,
        ));
        if e.is_trailer() {
            break;
        }
    }
    assert!(rest.is_empty(), "{} bytes after the trailer", rest.len());
    out
}

fn find<'a>(parsed: &'a [Parsed], name: &str) -> &'a Parsed {
    parsed
        .iter()
        .find(|p| p.0 == name)
        .unwrap_or_else(|| panic!("no {name} in the archive"))
}

/// What `cpio -it` (`-itv` if `verbose`) lists of `archive`, or `None` if
/// the tool is not installed.
fn cpio_tool(archive: &[u8], verbose: bool) -> Option<Vec<String>> {
    let tool = Path::new("/usr/bin/cpio");
    if !tool.exists() {
        eprintln!("SKIPPED: /usr/bin/cpio is not installed; archive not checked with it");
        return None;
    }
    let mut child = Command::new(tool)
        .arg(if verbose { "-itv" } else { "-it" })
        .arg("--quiet")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = archive.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "cpio -it: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect(),
    )
}

/// Checks the archive rules: names unique, each parent directory before
/// what is in it, the trailer last.
fn check_order(parsed: &[Parsed]) {
    let mut seen: HashSet<&str> = HashSet::new();
    let mut dirs: HashSet<&str> = HashSet::new();
    let (last, entries) = parsed.split_last().unwrap();
    assert_eq!(last.0, "TRAILER!!!");
    for (name, mode, _, _) in entries {
        assert!(seen.insert(name), "{name} twice");
        if let Some((parent, _)) = name.rsplit_once('/') {
            assert!(dirs.contains(parent), "{name} before its directory");
        }
        if mode & S_IFMT == S_IFDIR {
            dirs.insert(name);
        }
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn sample_archive() -> Vec<u8> {
    let mut w = CpioWriter::new();
    let m = Meta::default();
    w.dir("etc", 0o755, m).unwrap();
    w.file("etc/hello", 0o640, b"hello\n", m).unwrap();
    w.file("init", 0o755, b"#!/bin/sh\necho theirs\n", m)
        .unwrap();
    w.symlink("etc/link", "hello", m).unwrap();
    w.finish().unwrap()
}

// ---- the cpio writer ----

#[test]
fn cpio_writer_round_trip() {
    let mut w = CpioWriter::new();
    let m = Meta {
        uid: 1,
        gid: 2,
        mtime: 3,
    };
    w.dir("etc", 0o755, m).unwrap();
    w.file("etc/hello", 0o640, b"hello\n", m).unwrap();
    w.file("etc/empty", 0o600, b"", m).unwrap();
    w.file("etc/odd", 0o4755, b"abcde", m).unwrap();
    w.symlink("etc/link", "hello", m).unwrap();
    w.dir("dev", 0o755, m).unwrap();
    w.device("dev/console", false, 0o600, (5, 1), m).unwrap();
    w.device("dev/vda", true, 0o660, (254, 0), m).unwrap();
    w.fifo("dev/pipe", 0o644, m).unwrap();
    let archive = w.finish().unwrap();
    assert_eq!(archive.len() % 4, 0);

    let parsed = parse(&archive);
    check_order(&parsed);
    let want: Vec<Parsed> = vec![
        ("etc".into(), S_IFDIR | 0o755, (0, 0), vec![]),
        (
            "etc/hello".into(),
            S_IFREG | 0o640,
            (0, 0),
            b"hello\n".to_vec(),
        ),
        ("etc/empty".into(), S_IFREG | 0o600, (0, 0), vec![]),
        (
            "etc/odd".into(),
            S_IFREG | 0o4755,
            (0, 0),
            b"abcde".to_vec(),
        ),
        (
            "etc/link".into(),
            S_IFLNK | 0o777,
            (0, 0),
            b"hello".to_vec(),
        ),
        ("dev".into(), S_IFDIR | 0o755, (0, 0), vec![]),
        ("dev/console".into(), S_IFCHR | 0o600, (5, 1), vec![]),
        ("dev/vda".into(), S_IFBLK | 0o660, (254, 0), vec![]),
        ("dev/pipe".into(), S_IFIFO | 0o644, (0, 0), vec![]),
        ("TRAILER!!!".into(), 0, (0, 0), vec![]),
    ];
    assert_eq!(parsed, want);
    let mut r = newc::Reader::new(&archive[..]).unwrap();
    r = newc::Reader::new(r.finish().unwrap()).unwrap();
    assert_eq!(
        (r.entry().uid(), r.entry().gid(), r.entry().mtime()),
        (1, 2, 3)
    );

    if let Some(listed) = cpio_tool(&archive, false) {
        let names: Vec<&str> = want[..want.len() - 1]
            .iter()
            .map(|p| p.0.as_str())
            .collect();
        assert_eq!(listed, names);
    }
    if let Some(listed) = cpio_tool(&archive, true) {
        let console = listed.iter().find(|l| l.ends_with("dev/console")).unwrap();
        assert!(console.starts_with("crw-------"), "{console}");
        assert!(console.contains("5,"), "{console}");
        let link = listed.iter().find(|l| l.contains("etc/link")).unwrap();
        assert!(
            link.starts_with('l') && link.ends_with("etc/link -> hello"),
            "{link}"
        );
    }
}

#[test]
fn cpio_writer_keeps_the_archive_rules() {
    let m = Meta::default();
    let mut w = CpioWriter::new();
    w.dir("a", 0o755, m).unwrap();
    let dup = w.file("a", 0o644, b"x", m).unwrap_err();
    assert!(matches!(dup, InitramfsError::BadEntry { .. }), "{dup}");
    let orphan = w.file("b/c", 0o644, b"x", m).unwrap_err();
    assert!(orphan.to_string().contains("parent directory"), "{orphan}");
    // A file is no parent.
    w.file("a/f", 0o644, b"x", m).unwrap();
    assert!(w.file("a/f/g", 0o644, b"x", m).is_err());
    for bad in ["", "/abs", "a//b", "a/../b", "TRAILER!!!"] {
        assert!(w.file(bad, 0o644, b"", m).is_err(), "{bad:?} taken");
    }
}

// ---- the plan ----

#[test]
fn normalize_paths() {
    assert_eq!(normalize_guest_path(""), "/");
    assert_eq!(normalize_guest_path("/"), "/");
    assert_eq!(normalize_guest_path("./bin//sh/"), "/bin/sh");
    assert_eq!(normalize_guest_path("/a/./b/../c"), "/a/c");
    assert_eq!(normalize_guest_path("/../../x"), "/x");
}

#[test]
fn plan_makes_parents_and_writes_them_first() {
    let mut plan = InitramfsPlan::new();
    plan.add_file("/z/y/x/file", 0o644, b"1".to_vec(), Origin::Add)
        .unwrap();
    plan.add_file("/a b", 0o644, b"2".to_vec(), Origin::Add)
        .unwrap();
    plan.add_file("/a/b", 0o644, b"3".to_vec(), Origin::Add)
        .unwrap();
    plan.add_file("/a-b", 0o644, b"4".to_vec(), Origin::Add)
        .unwrap();
    for dir in ["/z", "/z/y", "/z/y/x", "/a"] {
        assert_eq!(plan.get(dir).unwrap().kind, EntryKind::Dir, "{dir}");
        assert_eq!(plan.get(dir).unwrap().mode, 0o755);
    }
    let archive = plan.to_cpio().unwrap();
    let parsed = parse(&archive);
    check_order(&parsed);
    assert_eq!(find(&parsed, "z/y/x/file").3, b"1");
    assert_eq!(find(&parsed, "a/b").3, b"3");
    if let Some(listed) = cpio_tool(&archive, false) {
        assert_eq!(listed.len(), parsed.len() - 1);
    }
}

#[test]
fn plan_later_entries_replace_earlier_ones() {
    let mut plan = InitramfsPlan::new();
    plan.add_file("/etc/x", 0o644, b"old".to_vec(), Origin::Base)
        .unwrap();
    plan.add_file("/etc/x", 0o600, b"new".to_vec(), Origin::Add)
        .unwrap();
    let e = plan.get("/etc/x").unwrap();
    assert_eq!(e.kind, EntryKind::File(Contents::Bytes(b"new".to_vec())));
    assert_eq!(e.mode, 0o600);

    // A directory onto a directory keeps its contents (and takes the mode).
    plan.add_dir("/etc", 0o700, Origin::Add).unwrap();
    assert_eq!(plan.get("/etc").unwrap().mode, 0o700);
    assert!(plan.get("/etc/x").is_some());

    // A file onto a directory drops the directory's contents.
    plan.add_file("/etcetera", 0o644, vec![], Origin::Base)
        .unwrap();
    plan.add_file("/etc", 0o644, b"f".to_vec(), Origin::Add)
        .unwrap();
    assert!(plan.get("/etc/x").is_none());
    assert!(plan.get("/etcetera").is_some());

    // A file in the way of a directory is replaced by one.
    plan.add_file("/etc/y", 0o644, vec![], Origin::Add).unwrap();
    assert_eq!(plan.get("/etc").unwrap().kind, EntryKind::Dir);

    // A library found for an --add file does not replace an --add file.
    plan.add_file("/lib/libc.so.6", 0o755, b"mine".to_vec(), Origin::Add)
        .unwrap();
    plan.add_file(
        "/lib/libc.so.6",
        0o755,
        b"host".to_vec(),
        Origin::Dependency,
    )
    .unwrap();
    assert_eq!(
        plan.get("/lib/libc.so.6").unwrap().kind,
        EntryKind::File(Contents::Bytes(b"mine".to_vec()))
    );
    check_order(&parse(&plan.to_cpio().unwrap()));
}

#[test]
fn plan_follows_symlinked_parents() {
    let mut plan = InitramfsPlan::new();
    plan.add_dir("/usr/lib", 0o755, Origin::Base).unwrap();
    plan.add_symlink("/lib", "usr/lib", Origin::Base).unwrap();
    plan.add_symlink("/lib64", "/usr/lib64", Origin::Base)
        .unwrap();
    let at = plan
        .add_file(
            "/lib/x86_64-linux-gnu/libc.so.6",
            0o755,
            b"c".to_vec(),
            Origin::Dependency,
        )
        .unwrap();
    assert_eq!(at, "/usr/lib/x86_64-linux-gnu/libc.so.6");
    assert!(plan.get("/lib/x86_64-linux-gnu/libc.so.6").is_none());
    assert_eq!(
        plan.get("/lib").unwrap().kind,
        EntryKind::Symlink("usr/lib".into())
    );
    // The target of a link is made if missing.
    let at = plan
        .add_file("/lib64/ld.so", 0o755, vec![], Origin::Dependency)
        .unwrap();
    assert_eq!(at, "/usr/lib64/ld.so");
    // A directory onto a link goes where it points.
    let at = plan.add_dir("/lib", 0o700, Origin::Add).unwrap();
    assert_eq!(at, "/usr/lib");
    assert!(matches!(
        plan.get("/lib").unwrap().kind,
        EntryKind::Symlink(_)
    ));
    // Links through links, with `..`.
    plan.add_symlink("/usr/lib/up", "../share", Origin::Base)
        .unwrap();
    let at = plan
        .add_file("/lib/up/doc", 0o644, vec![], Origin::Add)
        .unwrap();
    assert_eq!(at, "/usr/share/doc");
    check_order(&parse(&plan.to_cpio().unwrap()));

    // Loops are an error, not a hang.
    plan.add_symlink("/a", "b", Origin::Base).unwrap();
    plan.add_symlink("/b", "/a", Origin::Base).unwrap();
    let err = plan
        .add_file("/a/x", 0o644, vec![], Origin::Add)
        .unwrap_err();
    assert!(matches!(err, InitramfsError::SymlinkLoop { .. }), "{err}");
}

mod add;
mod inputs;
